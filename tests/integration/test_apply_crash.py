"""A real terraform apply, killed, cancelled or superseded part-way through.

The configuration is :data:`tests.runner_harness.CHAIN`: three
``null_resource``s created one by one, 2 s each, with a state write after
each. The apply runs in a runner process (:func:`tests.runner_harness.worker`:
what a runq worker does with an ``execute`` message) against the session's
PostgreSQL database; the test process claims, confirms, runs the
reconciler's sweep and the plans.

What must hold: every state terraform wrote while runq still trusted the
apply is the workspace's state; nothing it wrote after is; and terraform does
not outlive its runner. The rig keeps working copies (``keep_workdirs``), so
a test can compare what terraform left on disk with what runq stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from executors.local import STATE_FILE
from scheduler import artifacts, local_runs, reconciler, tasks, workspaces
from scheduler.messages import TASK_EXECUTE, RecordingPublisher
from scheduler.models import StateVersion, Task, TaskEvent, utcnow
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import TaskStatus
from scheduler.supervise import RedisServer
from scheduler.views import TaskView
from tests.integration.helpers import deliver_hint
from tests.runner_harness import (
    CHAIN,
    NAMES,
    alive,
    created,
    latest_working_copy,
    pids_with_env,
    start_worker,
    wait_for,
)
from tests.workers import real_terraform

pytestmark = [pytest.mark.terraform, pytest.mark.postgres, pytest.mark.redis]

LEASE_TTL = 3.0
HEARTBEAT = 0.5


@dataclass
class Rig:
    rt: Runtime
    publisher: RecordingPublisher
    root: Path
    #: RUNQ_* and terraform settings for runner processes.
    env: dict[str, str]
    delivered: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.rt.settings

    def workspace(self, name: str) -> str:
        src = self.root / "src" / name
        src.mkdir(parents=True)
        (src / "main.tf").write_text(CHAIN)
        workspaces.create(self.rt, name, source_dir=str(src))
        return name

    def pump(self) -> list[tuple[int, int]]:
        """Deliver recorded claim and dispatch hints; return the (task,
        fence) of the execute messages they led to."""
        runs = []
        while self.delivered < len(self.publisher.sent):
            message = self.publisher.sent[self.delivered]
            self.delivered += 1
            if not deliver_hint(self.rt, message) and message.task == TASK_EXECUTE:
                task_id, fence = message.args
                runs.append((int(task_id), int(fence)))
        return runs

    def run_here(self, task_id: int, fence: int) -> TaskView:
        ran = local_runs.execute(self.rt, task_id, fence)
        assert isinstance(ran, local_runs.Ran), ran
        return tasks.get(self.rt, task_id)

    def output(self, task_id: int, phase: str) -> str:
        """A phase's output, as runq stored it (``runq logs``)."""
        with self.rt.sessions() as s:
            return artifacts.log_text(s, task_id, phase).decode()

    def planned(self, workspace: str) -> tuple[TaskView, int]:
        """Submit a plan+apply, plan it here, confirm it: return the task
        and the fence its apply was claimed under."""
        task = tasks.submit(self.rt, workspace, "plan_and_apply")
        [(task_id, fence)] = self.pump()
        assert task_id == task.id
        planned = self.run_here(task_id, fence)
        assert planned.status is TaskStatus.APPLY_PENDING, planned.error
        tasks.confirm(self.rt, task.id)
        [(task_id, apply_fence)] = self.pump()
        assert task_id == task.id and apply_fence > fence
        return planned, apply_fence

    def start_apply(self, task_id: int, fence: int) -> subprocess.Popen[bytes]:
        proc = start_worker(task_id, fence, env=self.env, log=self.log_of(task_id))
        self.procs.append(proc)
        return proc

    def log_of(self, task_id: int) -> Path:
        return self.root / f"worker-{task_id}.log"

    def versions(self, task_id: int | None = None) -> list[StateVersion]:
        with self.rt.sessions() as s:
            q = select(StateVersion).order_by(StateVersion.id)
            if task_id is not None:
                q = q.where(StateVersion.task_id == task_id)
            rows = list(s.scalars(q))
            s.expunge_all()
        return rows

    def events_since(self, task_id: int, at: datetime) -> list[TaskEvent]:
        with self.rt.sessions() as s:
            rows = list(
                s.scalars(
                    select(TaskEvent)
                    .where(TaskEvent.task_id == task_id, TaskEvent.at >= at)
                    .order_by(TaskEvent.id)
                )
            )
            s.expunge_all()
        return rows

    def work_state(self, task_id: int) -> dict[str, Any]:
        """The state file terraform left in the apply's (kept) working copy."""
        path = latest_working_copy(self.settings, task_id, "apply") / STATE_FILE
        return dict(json.loads(path.read_text()))


def ids(state: bytes) -> dict[str, str]:
    doc = json.loads(state)
    return {
        r["name"]: r["instances"][0]["attributes"]["id"] for r in doc["resources"] if r["instances"]
    }


def will_be_created(plan_log: str) -> set[str]:
    return set(re.findall(r"# null_resource\.(\w+) will be created", plan_log))


def apply_pids(rig: Rig, task_id: int, fence: int) -> dict[int, str]:
    """Live processes of ``task_id``'s apply under ``fence`` (terraform, its
    provider plugins, provisioner commands): pid -> command name."""
    found = {}
    for pid in pids_with_env(
        TEST_RUNQ_RIG=rig.env["TEST_RUNQ_RIG"], RUNQ_TASK_ID=str(task_id), RUNQ_FENCE=str(fence)
    ):
        with contextlib.suppress(OSError):
            found[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
    return found


def terraform_pids(rig: Rig, task_id: int, fence: int) -> list[int]:
    """Live terraform processes running ``task_id``'s apply under ``fence``."""
    return [pid for pid, name in apply_pids(rig, task_id, fence).items() if name == "terraform"]


def until_some_state_stored(rig: Rig, task_id: int) -> StateVersion:
    """Wait until the apply has stored a state with at least one resource."""

    def partial() -> StateVersion | None:
        return next((v for v in rig.versions(task_id) if created(v.content)), None)

    version: StateVersion = wait_for("a stored state with a resource", partial, timeout=60)
    return version


@pytest.fixture
def rig(
    pg_url: str,
    private_redis: RedisServer,
    tmp_path: Path,
    terraform_bin: str,
    terraform_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Rig]:
    for key, value in terraform_env.items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("RUNQ_")]:
        monkeypatch.delenv(key)
    binary = real_terraform(terraform_bin)
    settings = Settings(
        database_url=pg_url,
        redis_url=private_redis.url,
        data_dir=tmp_path / "data",
        terraform_bin=binary,
        lease_ttl=LEASE_TTL,
        heartbeat_interval=HEARTBEAT,
        kill_grace=10,
        keep_workdirs=True,
    )
    env = {
        **terraform_env,
        # Tells this test's processes from other test runs' on the machine
        # (not RUNQ_*: runq keeps its own settings from terraform).
        "TEST_RUNQ_RIG": secrets.token_hex(6),
        "RUNQ_DATABASE_URL": pg_url,
        "RUNQ_REDIS_URL": private_redis.url,
        "RUNQ_DATA_DIR": str(settings.data_dir),
        "RUNQ_TERRAFORM_BIN": binary,
        "RUNQ_LEASE_TTL": str(LEASE_TTL),
        "RUNQ_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        "RUNQ_KILL_GRACE": "10",
        "RUNQ_KEEP_WORKDIRS": "1",
    }
    publisher = RecordingPublisher()
    rt = Runtime(settings=settings, publisher=publisher, actor="test")
    r = Rig(rt, publisher, tmp_path, env)
    yield r
    for proc in r.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rt.close()


@pytest.fixture
def reap(rig: Rig) -> Iterator[list[tuple[int, int]]]:
    """(task, fence) pairs whose leftover processes the test must not leave
    behind, whatever it asserted."""
    pairs: list[tuple[int, int]] = []
    yield pairs
    for task_id, fence in pairs:
        for pid in apply_pids(rig, task_id, fence):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------ (7) SIGKILL


def test_apply_killed_mid_way_loses_no_state(rig: Rig, reap: list[tuple[int, int]]) -> None:
    ws = rig.workspace("killed")
    planned, fence = rig.planned(ws)
    task_id = planned.id
    reap.append((task_id, fence))
    proc = rig.start_apply(task_id, fence)

    until_some_state_stored(rig, task_id)
    running = terraform_pids(rig, task_id, fence)
    assert running, "no terraform process found for the apply"
    proc.kill()  # the worker is gone: OOM, a lost host
    proc.wait(10)
    killed = time.monotonic()

    # Terraform dies with its runner: no orphaned apply runs on unrecorded.
    wait_for(
        "terraform to die with its runner",
        lambda: not any(alive(pid) for pid in running),
        timeout=2.0,
    )
    print(f"\nterraform gone {time.monotonic() - killed:.2f}s after its worker was SIGKILLed")

    # The lease lapses; the reconciler fails the apply (it is never re-run).
    def swept() -> TaskView | None:
        reconciler.sweep(rig.rt)
        view = tasks.get(rig.rt, task_id)
        return view if view.status is not TaskStatus.APPLYING else None

    lapsed = tasks.get(rig.rt, task_id).lease_expires_at
    failed = wait_for("the lease to lapse", swept, timeout=LEASE_TTL + 10)
    assert lapsed is not None
    late = (utcnow() - lapsed).total_seconds()
    print(f"lease lapse -> failed: {late:.2f}s (sweeping back to back)")
    leftovers = sorted(apply_pids(rig, task_id, fence).values())
    # Known: provider plugins (terraform's children) have no parent-death
    # signal and stay behind, idle; the reap fixture ends them.
    print(f"left behind by the killed apply: {leftovers or 'nothing'}")
    assert "terraform" not in leftovers
    assert failed.status is TaskStatus.FAILED
    assert failed.error is not None and failed.error.startswith("executor lost"), failed.error
    assert "the apply was not re-run" in failed.error
    [event] = rig.events_since(task_id, lapsed)
    assert event.to_status == TaskStatus.FAILED and event.actor == "test"
    assert event.reason is not None and event.reason.startswith("executor lost")

    # What the killed apply wrote is the workspace's state, and it wrote
    # nothing after it died (its working copy agrees with the database).
    stored = rig.versions()[-1]
    assert stored.task_id == task_id and stored.fence == fence
    made = created(stored.content)
    assert 1 <= len(made) < len(NAMES), made
    assert made == set(NAMES[: len(made)])  # in dependency order
    left = rig.work_state(task_id)
    assert (left["serial"], created(left)) == (stored.serial, made)
    before = ids(stored.content)

    # The next plan+apply plans only what was not created, and applies it.
    nxt, nxt_fence = rig.planned(ws)
    plan_log = rig.output(nxt.id, "plan")
    assert will_be_created(plan_log) == set(NAMES) - made, plan_log
    assert (nxt.add, nxt.change, nxt.destroy) == (len(NAMES) - len(made), 0, 0)
    applied = rig.run_here(nxt.id, nxt_fence)
    assert applied.status is TaskStatus.APPLIED, applied.error
    final = rig.versions()[-1]
    assert created(final.content) == set(NAMES)
    after = ids(final.content)
    assert {k: after[k] for k in before} == before  # the first ones were kept


# ------------------------------------------------------------ (8) cancel


def test_cancelled_apply_ends_cancelled_with_its_partial_state(
    rig: Rig, reap: list[tuple[int, int]]
) -> None:
    ws = rig.workspace("cancelled")
    planned, fence = rig.planned(ws)
    task_id = planned.id
    reap.append((task_id, fence))
    proc = rig.start_apply(task_id, fence)

    until_some_state_stored(rig, task_id)
    asked = time.monotonic()
    tasks.cancel(rig.rt, task_id, actor="cli:alice")
    assert proc.wait(30) == 0, rig.log_of(task_id).read_text()
    view = tasks.get(rig.rt, task_id)
    print(f"\ncancel -> {view.status}: {time.monotonic() - asked:.2f}s")

    assert view.status is TaskStatus.CANCELLED, view.error
    [event] = [e for e in tasks.events(rig.rt, [task_id]) if e.to_status is TaskStatus.CANCELLED]
    assert event.actor == "cli:alice"
    assert event.from_status is TaskStatus.APPLYING
    # Terraform saved its state on SIGINT, and runq stored that last write:
    # the working copy's state is the workspace's newest version.
    stored = rig.versions()[-1]
    assert stored.task_id == task_id
    assert json.loads(stored.content) == rig.work_state(task_id)
    made = created(stored.content)
    assert 1 <= len(made) < len(NAMES), made
    apply_log = rig.output(task_id, "apply")
    assert "Interrupt received" in apply_log, apply_log
    assert not terraform_pids(rig, task_id, fence)


# ------------------------------------------------------------ (9) stale


@pytest.mark.parametrize(
    ("heartbeat", "told_by"),
    # Heard at the next heartbeat, or (heartbeats far apart) when terraform's
    # next state write is refused: either way it is killed and stores nothing.
    [(HEARTBEAT, "Heartbeat"), (20.0, "StateWritten")],
    ids=["heartbeat", "state-write"],
)
def test_superseded_apply_writes_nothing_more(
    rig: Rig, reap: list[tuple[int, int]], heartbeat: float, told_by: str
) -> None:
    rig.env["RUNQ_HEARTBEAT_INTERVAL"] = str(heartbeat)
    rig.env["RUNQ_LEASE_TTL"] = str(max(LEASE_TTL, 3 * heartbeat))
    ws = rig.workspace("stale")
    planned, fence = rig.planned(ws)
    task_id = planned.id
    reap.append((task_id, fence))
    proc = rig.start_apply(task_id, fence)

    first = until_some_state_stored(rig, task_id)
    running = terraform_pids(rig, task_id, fence)
    # The phase is taken from this executor under it (as a re-claim does).
    with rig.rt.transaction() as s:
        s.execute(update(Task).where(Task.id == task_id).values(fence=Task.fence + 1))
    bumped = utcnow()
    stored_then = [v.id for v in rig.versions(task_id)]

    assert proc.wait(30) == 0, rig.log_of(task_id).read_text()
    took = (utcnow() - bumped).total_seconds()
    log = rig.log_of(task_id).read_text()
    print(f"\nsuperseded apply stopped {took:.2f}s after the fence moved ({told_by})")
    assert f"rejected {told_by.lower()} report for task {task_id}" in log, log
    assert "apply stopped" in log, log  # run_superseded: no Finished was sent
    wait_for("terraform to die", lambda: not any(alive(pid) for pid in running), timeout=2.0)

    # Nothing it wrote after the fence moved was stored, and no event.
    assert [v.id for v in rig.versions(task_id)] == stored_then
    assert all(v.created_at <= bumped for v in rig.versions(task_id))
    assert rig.events_since(task_id, bumped) == []
    view = tasks.get(rig.rt, task_id)
    assert (view.status, view.fence) == (TaskStatus.APPLYING, fence + 1)
    left = rig.work_state(task_id)
    if told_by == "StateWritten":
        # Terraform did write again, to its private copy; runq refused it.
        assert left["serial"] > first.serial
        assert took < heartbeat - 5, "stopped by a heartbeat, not by the refused write"
    assert created(left) != set(NAMES), "the superseded apply ran to its end"
