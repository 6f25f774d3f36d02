"""Flower, as an operator sees it: a real worker, real terraform, and
``celery flower`` on loopback behind basic auth, configured as
docker-compose.yml configures it. A plan, a plan+apply and a plan that fails
run; then Flower's HTTP API, and its task list rendered by headless
Chromium, must show each runq task by what it is (task id, workspace, phase
or action) with its true state: the failed plan as a FAILURE saying why.

The browser half is skipped, with the reason, where Debian's ``chromium`` is
missing (``make test`` installs it where it can). Set
``RUNQ_FLOWER_SCREENSHOT=path.png`` to keep the page's screenshot
(``make flower-screenshot`` makes the README's picture so).
"""

from __future__ import annotations

import base64
import html.parser
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.api import Client
from scheduler.browser import HEADLESS_FLAGS, find_chromium
from scheduler.states import DispatchMode, TaskStatus, TaskType
from scheduler.supervise import Proc, free_port, stop, tail, wait_ready
from tests.scenario.cluster import Cluster
from tests.workers import REPO_ROOT, clean_env

pytestmark = [pytest.mark.scenario, pytest.mark.terraform]

CLUSTER_MODE = DispatchMode.NEW
CLUSTER_REDIS_DB = 6
CLUSTER_WORKERS = 1
CLUSTER_CONCURRENCY = 2

NULL = 'resource "null_resource" "r" {}\n'
BROKEN = 'resource "null_resource" "r" {\n  nonsense = \n}\n'
USER = "operator"

#: Virtual time runs the page's timers and its AJAX table fill without
#: waiting for them in real time: 20 s of page time is plenty.
CHROMIUM_FLAGS = [*HEADLESS_FLAGS, "--virtual-time-budget=20000"]


def compose_flower_environment() -> dict[str, str]:
    """The flower service's settings in docker-compose.yml that this test
    must honour too (its address, port and password are the test's own)."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["flower"]["environment"]
    return {k: str(v) for k, v in env.items() if k == "FLOWER_TASKS_COLUMNS"}


@dataclass
class Flower:
    url: str
    password: str
    log: Path

    def get(self, path: str, *, auth: bool = True) -> Any:
        request = urllib.request.Request(self.url + path)
        if auth:
            token = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def tail(self) -> str:
        return tail(self.log, 40)


@pytest.fixture(scope="module")
def flower(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    root = tmp_path_factory.mktemp("flower")
    port, password = free_port(), secrets.token_hex(12)
    s = cluster.settings
    env = clean_env(
        {
            "RUNQ_DATABASE_URL": s.database_url,
            "RUNQ_REDIS_URL": s.redis_url,
            "RUNQ_BROKER_URL": s.broker_url,
            **compose_flower_environment(),
            # Basic auth and loopback, through the environment as in compose:
            # a password on a command line shows in `ps`.
            "FLOWER_BASIC_AUTH": f"{USER}:{password}",
            "FLOWER_ADDRESS": "127.0.0.1",
            "FLOWER_PORT": str(port),
        }
    )
    proc = Proc("flower", root / "flower.log")
    proc.start(["celery", "-A", "celery_app", "flower"], env=env, cwd=REPO_ROOT)
    f = Flower(f"http://127.0.0.1:{port}", password, proc.log)
    try:
        wait_ready([proc], lambda: {"flower"} if healthy(f) else set(), timeout=60, poll=0.2)
        yield f
    finally:
        stop([proc], timeout=15)


def healthy(f: Flower) -> bool:
    try:
        with urllib.request.urlopen(f.url + "/healthcheck", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class Ran:
    plan: int
    plan_and_apply: int
    failing: int
    workspace: str
    broken: str


@pytest.fixture(scope="module")
def ran(cluster: Cluster, flower: Flower) -> Ran:
    """A plan, an auto-applied plan+apply and a failing plan, run to the end
    while Flower watches. They are submitted as applications and `runq
    submit` do, through the Python API, whose publisher sends Celery's task
    message without Celery (scheduler.brokers.KombuPublisher) and so without
    Celery's `task-sent` event: Flower must know each task from the
    worker's events alone."""
    ws = cluster.workspace("net", auto_apply=True, config=NULL)
    broken = cluster.workspace("broken", config=BROKEN)
    client = Client.from_env(cluster.settings, actor="flower-test")
    try:
        plan = client.submit(ws, TaskType.PLAN).id
        pa = client.submit(ws, TaskType.PLAN_AND_APPLY).id
        failing = client.submit(broken, TaskType.PLAN).id
    finally:
        client.close()
    views = {v.id: v for v in cluster.wait([plan, pa, failing])}
    assert views[plan].status is TaskStatus.SUCCESS, views[plan].error
    assert views[pa].status is TaskStatus.APPLIED, views[pa].error
    assert views[failing].status is TaskStatus.FAILED
    return Ran(plan, pa, failing, ws, broken)


def flower_tasks(flower: Flower, expected: int) -> dict[str, dict[str, Any]]:
    """Flower's task list once it holds ``expected`` finished runq tasks
    (it learns of them from worker events, a moment after they happen)."""
    deadline = time.monotonic() + 30
    while True:
        found = flower.get("/api/tasks")
        done = [t for t in found.values() if t["state"] in ("SUCCESS", "FAILURE")]
        if len(done) >= expected or time.monotonic() > deadline:
            return {t["args"]: t for t in found.values()}
        time.sleep(0.3)


def test_flower_refuses_a_request_without_its_password(flower: Flower) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        flower.get("/api/tasks", auth=False)
    assert refused.value.code == 401


def test_flower_api_shows_each_task_by_what_it_is_with_its_state(flower: Flower, ran: Ran) -> None:
    # claim_plan x2 (the plan and the failing plan run in one hop each),
    # dispatch x1 and execute x2 (the plan+apply's plan and apply) at least.
    by_args = flower_tasks(flower, expected=5)
    ws, pa = ran.workspace, ran.plan_and_apply
    expect = {
        f"task {ran.plan}: plan in {ws}": ("runq.claim_plan", "SUCCESS"),
        f"task {pa}: plan in {ws}, fence 1": ("runq.execute", "SUCCESS"),
        f"task {pa}: apply in {ws}, fence 2": ("runq.execute", "SUCCESS"),
        f"task {ran.failing}: plan in {ran.broken}": ("runq.claim_plan", "FAILURE"),
        f"workspace {ws}": ("runq.dispatch", "SUCCESS"),
    }
    for args, (name, state) in expect.items():
        assert args in by_args, (args, sorted(by_args), flower.tail())
        task = by_args[args]
        assert (task["name"], task["state"]) == (name, state), task
    # The results say what happened: planned, applied, or why it failed.
    results = {args: by_args[args]["result"] for args in expect}
    assert results[f"task {ran.plan}: plan in {ws}"] == "'fence 1: planned, +1 ~0 -0'", results
    assert results[f"task {pa}: plan in {ws}, fence 1"] == "'fence 1: planned, +1 ~0 -0'", results
    assert results[f"task {pa}: apply in {ws}, fence 2"] == "'fence 2: applied'", results
    assert results[f"task {ran.failing}: plan in {ran.broken}"] is None, results
    failed = by_args[f"task {ran.failing}: plan in {ran.broken}"]
    assert failed["exception"].startswith("PhaseFailed("), failed["exception"]
    assert "failed: terraform init exited 1" in failed["exception"], failed["exception"]
    assert failed["traceback"], "a FAILURE carries Celery's traceback field"
    # Flower's Failed filter (and count) holds the failed phase, and only it.
    failures = flower.get("/api/tasks?state=FAILURE")
    assert [t["args"] for t in failures.values()] == [failed["args"]], failures


class _Rows(html.parser.HTMLParser):
    """The task table's rows in a rendered page: uuid -> cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self._row: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self._row = dict(attrs).get("id")
            if self._row:
                self.rows[self._row] = []
        elif tag == "td" and self._row:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row and self._cell is not None:
            self.rows[self._row].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_flower_task_list_in_a_browser(flower: Flower, ran: Ran, tmp_path: Path) -> None:
    browser = find_chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    by_args = flower_tasks(flower, expected=5)
    # Credentials in the URL: the top-level request authenticates, and the
    # page's AJAX requests reuse them from the browser's auth cache.
    page = flower.url.replace("://", f"://{USER}:{flower.password}@") + "/tasks"
    argv = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*argv, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    parser = _Rows()
    parser.feed(dom)
    columns = compose_flower_environment()["FLOWER_TASKS_COLUMNS"].split(",")
    ws = ran.workspace
    shown = {
        f"task {ran.plan}: plan in {ws}": "SUCCESS",
        f"task {ran.plan_and_apply}: plan in {ws}, fence 1": "SUCCESS",
        f"task {ran.plan_and_apply}: apply in {ws}, fence 2": "SUCCESS",
        f"task {ran.failing}: plan in {ran.broken}": "FAILURE",
    }
    for args, state in shown.items():
        uuid = by_args[args]["uuid"]
        assert uuid in parser.rows, (args, f"not in the rendered table; page:\n{dom[-3000:]}")
        cells = dict(zip(columns, parser.rows[uuid], strict=False))
        assert (cells["args"], cells["state"]) == (args, state), cells
    failed_uuid = by_args[f"task {ran.failing}: plan in {ran.broken}"]["uuid"]
    failed = dict(zip(columns, parser.rows[failed_uuid], strict=False))
    assert "failed: terraform init exited 1" in failed["exception"], failed

    shot = tmp_path / "flower-tasks.png"
    subprocess.run(
        [*argv, "--window-size=1800,560", "--hide-scrollbars", f"--screenshot={shot}", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if keep := os.environ.get("RUNQ_FLOWER_SCREENSHOT"):
        shutil.copy(shot, keep)
