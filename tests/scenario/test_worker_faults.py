"""Workers killed, stopped and shut down mid-phase, with real processes.

Three ``celery -A celery_app worker`` processes and a real ``celery beat``
(the reconciler every second), on a PostgreSQL database of this module's own
and a private Redis, with short settings: a 4 s lease, heartbeats every
0.5 s, hand-offs re-sent after 2 s. Phases run the real terraform (through
the slow wrapper), and applies run :data:`tests.runner_harness.CHAIN`, which
writes state between its three resources.

Verdicts come from ``task_events`` and the recorded timestamps (the workers
and this process share a clock); the waits only bound a hang. The measured
recovery times are printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from sqlalchemy import select

from celery_app.runtime import CeleryPublisher, private_app
from executors.local import STATE_FILE
from scheduler import tasks
from scheduler.messages import RecordingPublisher
from scheduler.models import StateVersion, utcnow
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import TERMINAL, DispatchMode, TaskStatus
from scheduler.supervise import RedisServer, descendants
from scheduler.views import EventView, TaskView
from tests.conftest import create_database, drop_database
from tests.runner_harness import (
    CHAIN,
    NAMES,
    alive,
    chain,
    created,
    latest_working_copy,
    pids_with_env,
    wait_for,
)
from tests.scenario.cluster import DEADLINE, Cluster, redis_db
from tests.workers import Beat, WorkerPool, clean_env, write_slow_terraform

pytestmark = [pytest.mark.scenario, pytest.mark.postgres, pytest.mark.terraform]

CLUSTER_REDIS_DB = 9

LEASE_TTL = 4.0
HEARTBEAT = 0.5
RECONCILE = 1.0
SHORT = {
    "lease_ttl": LEASE_TTL,
    "heartbeat_interval": HEARTBEAT,
    "reconcile_interval": RECONCILE,
    "resend_after": 2.0,
    "shutdown_grace": 3.0,
    "kill_grace": 5.0,
    # A process stopped inside a transaction frees its row locks quickly.
    "db_lock_timeout": 2.0,
    "db_idle_in_transaction_timeout": 3.0,
}
#: From a lapsed lease to the task moved: one reconciler interval, plus beat's
#: and a worker's latency, plus slack for a busy two-CPU machine.
RECOVERY_BOUND = RECONCILE + 4.0


@dataclass
class FaultCluster(Cluster):
    beat: Beat | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: (what, seconds) measured by the tests, printed at the end.
    measured: list[tuple[str, float]] = field(default_factory=list)

    def get(self, task_id: int) -> TaskView:
        return tasks.get(self.rt, task_id)

    def until(self, what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
        return wait_for(what, check, timeout)

    def running(self, task_id: int, status: TaskStatus, *, stored: bool = False) -> TaskView:
        """Wait until the task's ``status`` phase has started on an executor
        (and, with ``stored``, stored a state with a resource in it)."""

        def check() -> TaskView | None:
            view = self.get(task_id)
            assert view.status not in TERMINAL, f"task {task_id} ended: {view}"
            if view.status is not status or view.executor_handle is None:
                return None
            if stored and not any(created(v.content) for v in self.versions(task_id)):
                return None
            return view

        view: TaskView = self.until(f"task {task_id} {status} on an executor", check)
        return view

    def versions(self, task_id: int) -> list[StateVersion]:
        with self.rt.sessions() as s:
            rows = list(
                s.scalars(
                    select(StateVersion)
                    .where(StateVersion.task_id == task_id)
                    .order_by(StateVersion.id)
                )
            )
            s.expunge_all()
        return rows

    def events(self, task_id: int) -> list[EventView]:
        return tasks.events(self.rt, [task_id])

    def ended(self, task_id: int) -> TaskView:
        [view] = self.wait([task_id])
        return view

    def work_state(self, task_id: int) -> dict[str, Any]:
        """The state terraform left in the apply's (kept) working copy."""
        path = latest_working_copy(self.settings, task_id, "apply") / STATE_FILE
        return dict(json.loads(path.read_text()))

    def phase_pids(self, task_id: int, fence: int) -> list[int]:
        """Live processes of this cluster running (task, fence): terraform,
        the slow wrapper, provisioner commands, provider plugins."""
        return pids_with_env(
            TEST_RUNQ_CLUSTER=self.env["TEST_RUNQ_CLUSTER"],
            RUNQ_TASK_ID=str(task_id),
            RUNQ_FENCE=str(fence),
        )

    def terraform_pids(self, task_id: int, fence: int, command: str | None = None) -> list[int]:
        """Only terraform (or the wrapper about to exec it); with ``command``,
        only those running that subcommand."""
        names = {"terraform", "slow-terraform"}
        found = []
        for pid in self.phase_pids(task_id, fence):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() not in names:
                    continue
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                if command is None or command in argv[1:3]:
                    found.append(pid)
        return found

    def measure(self, what: str, seconds: float) -> float:
        self.measured.append((what, seconds))
        print(f"\n{what}: {seconds:.2f}s")
        return seconds


def executor_pid(view: TaskView) -> int:
    """The pool process in ``local:host:pid:run``."""
    assert view.executor_handle is not None
    return int(view.executor_handle.split(":")[2])


def seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def only(events: list[EventView], src: TaskStatus, dst: TaskStatus) -> EventView:
    [event] = [e for e in events if e.from_status is src and e.to_status is dst]
    return event


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A database of this module's own: its reconciler sweeps everything in
    it, and must not touch what other modules' clusters left behind."""
    name, url = create_database("runq_faults")
    yield url
    drop_database(name)


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest,
    database_url: str,
    private_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    terraform_bin: str,
    terraform_env: dict[str, str],
) -> Iterator[FaultCluster]:
    root = Path(tmp_path_factory.mktemp("cluster-faults"))
    redis_url = redis_db(private_redis.url, CLUSTER_REDIS_DB)
    flush = Redis.from_url(redis_url)
    flush.flushdb()
    flush.close()
    (root / "src").mkdir()
    # Beat keeps its schedule file there, and does not create the directory.
    (root / "data").mkdir()
    slow = write_slow_terraform(root, terraform_bin)
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        data_dir=root / "data",
        terraform_bin=str(slow),
        # Kept, to compare what terraform left with what runq stored.
        keep_workdirs=True,
        **SHORT,  # type: ignore[arg-type]
    )
    env = {
        **terraform_env,
        "RUNQ_DATABASE_URL": database_url,
        "RUNQ_REDIS_URL": redis_url,
        "RUNQ_DATA_DIR": str(settings.data_dir),
        "RUNQ_TERRAFORM_BIN": str(slow),
        "RUNQ_KEEP_WORKDIRS": "1",
        **{f"RUNQ_{key.upper()}": str(value) for key, value in SHORT.items()},
        # Tells this cluster's processes (terraform included) from others
        # (not RUNQ_*: runq keeps its own settings from terraform).
        "TEST_RUNQ_CLUSTER": secrets.token_hex(6),
        "SLOW_TF_PLAN_SECONDS": "0",
        "SLOW_TF_APPLY_SECONDS": "0",
    }
    pool = WorkerPool(3, env, root / "logs", concurrency=2)
    beat = Beat(env, root / "logs")
    app = private_app(settings, "runq-faults")
    c = FaultCluster(
        mode=DispatchMode.NEW,
        pool=pool,
        settings=settings,
        rt=Runtime(settings=settings, publisher=CeleryPublisher(app), actor="fault-test"),
        quiet=Runtime(settings=settings, publisher=RecordingPublisher(), actor="fault-test"),
        app=app,
        src_root=root / "src",
        prefix=f"faults-{secrets.token_hex(3)}",
        beat=beat,
        env=env,
    )
    started = time.monotonic()
    try:
        pool.start()
        beat.start()
        print(f"\n3 workers and beat ready in {time.monotonic() - started:.1f}s")
        yield c
    finally:
        beat.stop()
        pool.stop()
        # Provider plugins of a killed worker's terraform outlive it (see the
        # report of test 10): end every process of this cluster's.
        for pid in pids_with_env(TEST_RUNQ_CLUSTER=env["TEST_RUNQ_CLUSTER"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        c.rt.close()
        c.quiet.close()
        app.close()
        show_measured(request.config, c.measured)


def show_measured(config: pytest.Config, measured: list[tuple[str, float]]) -> None:
    """Print the recovery times on the terminal, even under ``-q``."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not measured:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_line("recovery times (tests/scenario/test_worker_faults.py):")
        for what, secs in measured:
            reporter.write_line(f"  {what}: {secs:.2f}s")


@pytest.fixture
def whole(cluster: FaultCluster) -> Iterator[FaultCluster]:
    """The cluster, with every worker brought back after the test if it
    killed or shut one down."""
    yield cluster
    for worker in list(cluster.pool.workers):
        assert worker.proc is not None
        if worker.proc.poll() is not None:
            cluster.pool.restart(worker.name)


# ---------------------------------------------------------------- (10)


def test_worker_killed_mid_apply(whole: FaultCluster) -> None:
    """SIGKILL of a whole worker (a lost host) mid-apply: the apply fails
    within about a lease, and the plan+apply queued behind it runs."""
    c = whole
    ws = c.workspace("kill-worker", auto_apply=True, config=CHAIN)
    a = c.submit(ws, "plan_and_apply")
    b = c.submit(ws, "plan_and_apply")

    view = c.running(a.id, TaskStatus.APPLYING, stored=True)
    name = c.pool.worker_of(executor_pid(view))
    assert name is not None
    worker = c.pool.named(name)
    terraform = c.terraform_pids(a.id, view.fence)
    assert terraform
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool processes
    killed = utcnow()
    assert worker.proc is not None
    worker.proc.wait(10)
    # Terraform dies with its pool process.
    c.until("terraform to die", lambda: not any(alive(p) for p in terraform), timeout=2)
    lapse = c.get(a.id).lease_expires_at  # no heartbeat can move it now
    assert lapse is not None

    failed = c.ended(a.id)
    done = c.ended(b.id)
    assert failed.status is TaskStatus.FAILED
    assert failed.error is not None and failed.error.startswith("executor lost"), failed.error
    event = only(c.events(a.id), TaskStatus.APPLYING, TaskStatus.FAILED)
    assert event.reason is not None and event.reason.startswith("executor lost")
    assert event.actor.startswith("reconciler@")  # beat's reconciler thread
    moved = c.measure(
        "(10) worker SIGKILL mid-apply: lease lapse -> failed", seconds(event.at, lapse)
    )
    c.measure("(10) worker SIGKILL mid-apply: kill -> failed", seconds(event.at, killed))
    assert 0 <= moved < RECOVERY_BOUND
    assert seconds(event.at, killed) < LEASE_TTL + RECOVERY_BOUND

    leftovers = sorted(
        Path(f"/proc/{pid}/comm").read_text().strip() for pid in c.phase_pids(a.id, view.fence)
    )
    print(f"left behind by the killed apply: {leftovers or 'nothing'}")
    assert "terraform" not in leftovers

    # The next plan+apply ran after it, over the state it left.
    made = created(c.versions(a.id)[-1].content)
    assert 1 <= len(made) < len(NAMES)
    assert done.status is TaskStatus.APPLIED, done.error
    b_events = c.events(b.id)
    assert only(b_events, TaskStatus.PENDING, TaskStatus.PLANNING).at >= event.at
    assert done.add == len(NAMES) - len(made)
    assert created(c.versions(b.id)[-1].content) == set(NAMES)


# ---------------------------------------------------------------- (11)


def test_pool_process_killed_mid_plan(whole: FaultCluster) -> None:
    """SIGKILL of the pool process running a plan: re-claimed, then succeeds."""
    c = whole
    ws = c.workspace("kill-child", plan_seconds=4)
    p = c.submit(ws, "plan")

    view = c.running(p.id, TaskStatus.PLANNING)
    pid = executor_pid(view)
    os.kill(pid, signal.SIGKILL)
    c.until("the pool process to die", lambda: not alive(pid), timeout=5)
    lapse = c.get(p.id).lease_expires_at
    assert lapse is not None

    final = c.ended(p.id)
    assert final.status is TaskStatus.SUCCESS, final.error
    assert final.plan_attempts == 2
    assert final.fence == view.fence + 1
    assert executor_pid(final) != pid
    events = c.events(p.id)
    reclaim = only(events, TaskStatus.PLANNING, TaskStatus.PLANNING)
    assert reclaim.fence == view.fence + 1
    assert reclaim.reason is not None and reclaim.reason.startswith("executor lost")
    moved = c.measure(
        "(11) pool process SIGKILL mid-plan: lease lapse -> re-claimed", seconds(reclaim.at, lapse)
    )
    assert 0 <= moved < RECOVERY_BOUND
    assert events[-1].to_status is TaskStatus.SUCCESS and events[-1].fence == final.fence
    # The reconciler's log names the lost executor, not the new claim's (none).
    # (beat's reconciler thread logs to beat's log.)
    assert c.beat is not None
    said = [
        line for line in c.beat.tail(5000).splitlines() if f"task {p.id}: executor lost" in line
    ]
    assert said and all(f"({view.executor_handle})" in line for line in said), said


# ---------------------------------------------------------------- (12)


def test_worker_sigterm_mid_apply(whole: FaultCluster) -> None:
    """``docker stop`` (SIGTERM) mid-apply: terraform is interrupted, its
    state is saved, and the apply fails "worker shut down" within seconds,
    well before Docker's SIGKILL 10 s later."""
    c = whole
    ws = c.workspace("sigterm", auto_apply=True, config=CHAIN)
    a = c.submit(ws, "plan_and_apply")

    view = c.running(a.id, TaskStatus.APPLYING, stored=True)
    name = c.pool.worker_of(executor_pid(view))
    assert name is not None
    worker = c.pool.named(name)
    assert worker.proc is not None
    sent = utcnow()
    began = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(30)
    exited = time.monotonic() - began

    final = c.ended(a.id)
    assert final.status is TaskStatus.FAILED, final
    assert final.error is not None
    assert "worker shut down during the apply" in final.error, final.error
    event = only(c.events(a.id), TaskStatus.APPLYING, TaskStatus.FAILED)
    c.measure("(12) worker SIGTERM mid-apply: SIGTERM -> failed", seconds(event.at, sent))
    c.measure("(12) worker SIGTERM mid-apply: SIGTERM -> worker exited", exited)
    assert seconds(event.at, sent) < 10
    assert exited < 10, worker.tail()
    # Terraform saved its state on the interrupt, and runq stored it.
    stored = c.versions(a.id)[-1]
    assert json.loads(stored.content) == c.work_state(a.id)
    assert 1 <= len(created(stored.content)) < len(NAMES)
    assert not c.terraform_pids(a.id, view.fence)


# ---------------------------------------------------------------- (13)


def test_worker_stopped_past_its_lease(whole: FaultCluster) -> None:
    """SIGSTOP of a worker's whole process tree mid-plan, past its lease, then
    SIGCONT: the plan was re-claimed and ran elsewhere; the resumed executor's
    reports are refused and its terraform is killed."""
    c = whole
    ws = c.workspace("sigstop", plan_seconds=6)
    p = c.submit(ws, "plan")

    view = c.running(p.id, TaskStatus.PLANNING)
    name = c.pool.worker_of(executor_pid(view))
    assert name is not None
    worker = c.pool.named(name)
    # Stopped inside `terraform plan` (the wrapper's pause before it). Not in
    # `init`: the re-claimed run replaces the working copy that a stopped
    # init is using, and the resumed init then fails on its own (see
    # test_supervision's shared working copy test) before it heartbeats.
    old = c.until(
        "its terraform plan", lambda: c.terraform_pids(p.id, view.fence, "plan"), timeout=30
    )
    tree = [worker.pid, *descendants(worker.pid)]
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    stopped = utcnow()
    lapse = c.get(p.id).lease_expires_at  # no heartbeat can move it now
    assert lapse is not None
    try:
        moved = c.until("the re-claim", lambda: c.get(p.id).fence > view.fence)
    finally:
        for pid in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    c.until("the resumed executor's terraform to die", lambda: not any(alive(x) for x in old))
    c.measure("(13) SIGCONT -> stale terraform killed", time.monotonic() - resumed)
    assert moved

    final = c.ended(p.id)
    assert final.status is TaskStatus.SUCCESS, final.error
    assert final.fence == view.fence + 1
    assert c.pool.worker_of(executor_pid(final)) != name  # it ran elsewhere
    events = c.events(p.id)
    reclaim = only(events, TaskStatus.PLANNING, TaskStatus.PLANNING)
    assert reclaim.reason is not None and reclaim.reason.startswith("executor lost")
    # Nothing from the old fence was accepted after the re-claim.
    assert all(e.fence == final.fence for e in events if e.at >= reclaim.at)
    log = c.until(
        "the refusal in the stopped worker's log",
        lambda: (
            f"rejected heartbeat report for task {p.id} (fence {view.fence})" in worker.tail(400)
            and worker.tail(400)
        ),
        timeout=10,
    )
    assert f"task {p.id} plan stopped" in log, log
    after = c.measure(
        "(13) worker SIGSTOP mid-plan: lease lapse -> re-claimed", seconds(reclaim.at, lapse)
    )
    c.measure("(13) worker SIGSTOP mid-plan: stop -> re-claimed", seconds(reclaim.at, stopped))
    assert 0 <= after < RECOVERY_BOUND


# ---------------------------------------------------------------- (14)


def test_runq_cancel_of_a_running_apply(whole: FaultCluster) -> None:
    """``runq cancel ID`` (the CLI, in its own process) on a running apply."""
    c = whole
    # Slower resources: the CLI's own start-up (a second or two) must not
    # let the apply run to its end before the cancel is recorded.
    ws = c.workspace("cli-cancel", auto_apply=True, config=chain(5))
    a = c.submit(ws, "plan_and_apply")
    view = c.running(a.id, TaskStatus.APPLYING, stored=True)

    runq = Path(sys.executable).parent / "runq"
    began = time.monotonic()
    out = subprocess.run(
        [str(runq), "cancel", "--json", "--timeout", "60", str(a.id)],
        env=clean_env(c.env),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    took = time.monotonic() - began
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["status"] == "cancelled", shown
    event = only(c.events(a.id), TaskStatus.APPLYING, TaskStatus.CANCELLED)
    assert event.actor.startswith("cli:"), event
    asked = c.get(a.id).cancel_requested_at
    assert asked is not None
    c.measure("(14) runq cancel of a running apply: request -> cancelled", seconds(event.at, asked))
    c.measure("(14) runq cancel of a running apply: whole command", took)
    assert seconds(event.at, asked) < 5
    stored = c.versions(a.id)[-1]
    assert json.loads(stored.content) == c.work_state(a.id)
    assert 1 <= len(created(stored.content)) < len(NAMES)
    assert not c.terraform_pids(a.id, view.fence)
