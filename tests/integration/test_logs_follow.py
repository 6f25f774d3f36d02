"""`runq logs ID --follow`: output streamed from the database as executors
store it, from any host, ending when the task settles."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from executors.base import LogWritten, Phase
from scheduler import artifacts, reports
from scheduler.runtime import Runtime
from tests.integration.helpers import PLAN_NO_CHANGES, begin, claimed, end, lapse
from tests.integration.test_cli import RUNQ, Cli, cli  # noqa: F401 - the cli fixture


def write(rt: Runtime, task_id: int, fence: int, offset: int, text: str) -> None:
    reply = reports.accept(rt, LogWritten(task_id, fence, Phase.PLAN, offset, text.encode()))
    assert reply.accepted, reply


def test_follow_streams_as_chunks_land_and_ends_with_the_task(rt: Runtime, ws: str) -> None:
    tid, fence = claimed(rt, ws)
    assert begin(rt, tid, fence).accepted
    got: list[tuple[float, str]] = []
    done = threading.Event()

    def reader() -> None:
        for piece in artifacts.follow(rt, tid, poll=0.02):
            got.append((time.monotonic(), piece.text.decode()))
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    write(rt, tid, fence, 0, "Refreshing state...\n")
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [text for _, text in got] == ["Refreshing state...\n"], (
        "the first line came while running"
    )
    assert not done.is_set(), "following goes on while the phase runs"
    write(rt, tid, fence, 0, "Refreshing state...\n")  # a retried chunk: shown once
    write(rt, tid, fence, 20, "Plan: 0 to add\n")
    assert end(rt, tid, fence, PLAN_NO_CHANGES).accepted
    assert done.wait(5), "following ends once the task is settled"
    assert "".join(text for _, text in got) == "Refreshing state...\nPlan: 0 to add\n"


def test_a_re_run_plan_shows_its_new_output_under_its_new_claim(rt: Runtime, ws: str) -> None:
    tid, fence = claimed(rt, ws)
    assert begin(rt, tid, fence).accepted
    write(rt, tid, fence, 0, "first try\n")
    lapse(rt, tid)
    from scheduler import reconciler

    reconciler.sweep(rt)  # the lease lapsed: the plan is re-claimed under a new fence
    from scheduler import tasks

    again = tasks.get(rt, tid).fence
    assert again == fence + 1
    assert begin(rt, tid, again).accepted
    write(rt, tid, again, 0, "second try\n")
    assert end(rt, tid, again, PLAN_NO_CHANGES).accepted
    pieces = list(artifacts.follow(rt, tid, poll=0.01))
    assert [(p.fence, p.text) for p in pieces] == [
        (fence, b"first try\n"),
        (again, b"second try\n"),
    ]


def test_the_cli_follows_from_another_process(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    cli.ok("db", "upgrade")
    cli.ok("workspace", "create", "net", "--dir", str(cli.source))
    task = cli.ok("submit", "net", "--type", "plan")
    proc = subprocess.Popen(
        [str(RUNQ), "logs", str(task["id"]), "--follow", "--json"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # This process plays the executor, on the same database.
        from scheduler.api import Client
        from scheduler.settings import Settings

        client = Client.from_env(Settings(_env_file=None, **_settings(cli.env)))
        rt = client.runtime
        from scheduler import dispatcher

        fence = dispatcher.claim_plan(rt, task["id"]).fence
        assert fence is not None
        assert begin(rt, task["id"], fence).accepted
        write(rt, task["id"], fence, 0, "hello from the executor\n")
        assert end(rt, task["id"], fence, PLAN_NO_CHANGES).accepted
        out, err = proc.communicate(timeout=30)
        client.close()
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [{"phase": "plan", "fence": fence, "text": "hello from the executor\n"}]


def _settings(env: dict[str, str]) -> dict[str, str]:
    return {
        "database_url": env["RUNQ_DATABASE_URL"],
        "redis_url": env["RUNQ_REDIS_URL"],
        "data_dir": env["RUNQ_DATA_DIR"],
    }
