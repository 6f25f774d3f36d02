"""One executor contract, three execution modes: local, agent and Kubernetes.

Each mode runs real terraform (with the null provider) through its own
path, end to end:

* ``local``: the launcher publishes ``execute(task, fence)``; a worker builds
  the bundle from the database and reports directly (``DirectReporter``);
* ``agent``: the launcher sends the signed bundle to the pool's queue; an
  agent (here: its task function, with an agent's settings: its own data
  directory and no database) verifies it and reports over a real Redis
  broker, signed, to the consumer a core worker runs;
* ``k8s``: the launcher creates a Job and its Secret in an API server
  emulator over real HTTP; the test plays the Job controller and runs the
  container's own command, ``runq run-phase``, on the mounted Secret, which
  reports like an agent.

The cases: a plan then its apply, a failing plan, a stale report, a
duplicate hand-off, and cancel (heard through a heartbeat).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from celery_app import agent as agent_app
from executors import remote
from executors.outcome import PhaseFailed
from scheduler import artifacts, dispatcher, local_runs, pools, tasks, workspaces
from scheduler import remote as server
from scheduler.messages import TASK_EXECUTE, RecordingPublisher
from scheduler.models import TaskEvent
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import TaskStatus
from scheduler.transitions import transition
from tests.integration.helpers import current_handoff, deliver_hint
from tests.workers import terraform_offline_env, write_slow_terraform

pytestmark = [pytest.mark.terraform, pytest.mark.redis, pytest.mark.postgres]

MODES = ["local", "agent", "k8s"]
NS = "runq-modes"

NULL = """\
terraform {
  required_providers {
    null = { source = "hashicorp/null", version = "2.1.2" }
  }
}
resource "null_resource" "r" {
  triggers = { at = timestamp() }
}
"""
BROKEN = 'resource "null_resource" "r" {\n  nonsense = \n}\n'


class Cluster:
    """One mode's executors, driven by the test: :meth:`pump` delivers every
    message (and, in k8s mode, runs every new Job) until none is left."""

    def __init__(
        self, mode: str, rt: Runtime, publisher: RecordingPublisher, root: Path, env: dict[str, str]
    ) -> None:
        self.mode = mode
        self.rt = rt
        self.publisher = publisher
        self.root = root
        self.env = env
        self.delivered = 0
        self.ran_jobs: set[str] = set()
        self.api: Any = None
        self.pool: str | None = None
        self.token = ""
        #: What each phase's Celery task ended with (Flower's result), or
        #: the PhaseFailed it raised; k8s Jobs report no such thing.
        self.outcomes: list[str | PhaseFailed] = []

    def workspace(self, name: str, config: str, *, auto_apply: bool = True) -> str:
        src = self.root / "src" / name
        src.mkdir(parents=True)
        (src / "main.tf").write_text(config)
        extra: dict[str, Any] = {}
        if self.mode == "agent":
            extra["agent_pool"] = self.pool
        workspaces.create(
            self.rt, name, mode=self.mode, source_dir=str(src), auto_apply=auto_apply, **extra
        )
        return name

    # -- executors ------------------------------------------------------------

    def agent_settings(self, n: int) -> Settings:
        # An agent's own settings: its own disk, no database it could reach.
        return self.rt.settings.model_copy(
            update={
                "data_dir": self.root / f"agent-{n}",
                "database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none",
                "agent_token": self.token,
            }
        )

    def run_agent_message(self, args: tuple[Any, ...]) -> None:
        # The task's own function, as an agent's pool process calls it
        # (Celery's call wrapper keeps per-thread state this test lacks).
        self.outcome(lambda: agent_app.run.run(*args))

    def outcome(self, call: Callable[[], str]) -> None:
        try:
            self.outcomes.append(call())
        except PhaseFailed as exc:
            self.outcomes.append(exc)

    def jobs(self) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        try:
            items = self.api.batch.list_namespaced_job(NS).items
        except ApiException as exc:
            if exc.status != 404:
                raise
            return []
        return sorted(j.metadata.name for j in items)

    def run_job(self, name: str) -> None:
        from tests.k8s_harness import run_job

        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "RUNQ_BROKER_URL": self.rt.settings.resolved_broker_url,
            "RUNQ_TERRAFORM_BIN": self.rt.settings.terraform_bin,
            "RUNQ_HEARTBEAT_INTERVAL": str(self.rt.settings.heartbeat_interval),
            **self.env,
        }
        from kubernetes.client.exceptions import ApiException

        self.ran_jobs.add(name)
        try:
            run = run_job(self.api, NS, name, self.root / "pods" / name, env=env)
        except ApiException as exc:
            # Deleted while it ran (a cancel deletes the Job): nothing left
            # to mark finished, as for a real controller.
            if exc.status != 404:
                raise
            return
        assert run.returncode == 0, run.output

    def step(self) -> bool:
        """Deliver one message or run one Job; False if there was nothing."""
        if self.delivered < len(self.publisher.sent):
            message = self.publisher.sent[self.delivered]
            self.delivered += 1
            if deliver_hint(self.rt, message):
                pass
            elif message.task == TASK_EXECUTE:
                self.outcome(local_runs.execute(self.rt, *message.args).outcome)
            elif message.task == remote.TASK_AGENT_RUN:
                self.run_agent_message(message.args)
            return True
        if self.mode == "k8s":
            new = [j for j in self.jobs() if j not in self.ran_jobs]
            if new:
                self.run_job(new[0])
                return True
        return False

    def pump(self) -> None:
        while self.step():
            pass

    def hand_off_again(self, task_id: int) -> None:
        """Send the current claim's hand-off once more (a duplicate)."""
        dispatcher.hand_off(self.rt, current_handoff(self.rt, task_id))


@pytest.fixture
def db_url(pg_url: str) -> str:
    """PostgreSQL only: SQLite runs the same code, and the suite's time is
    better spent on three modes than on two databases."""
    return pg_url


@pytest.fixture(params=MODES)
def cluster(
    request: pytest.FixtureRequest,
    tune: Callable[..., Runtime],
    publisher: RecordingPublisher,
    tmp_path: Path,
    terraform_bin: str,
) -> Iterator[Cluster]:
    mode = request.param
    invocations = tmp_path / "terraform.log"
    wrapper = write_slow_terraform(tmp_path, terraform_bin, invocations)
    env = terraform_offline_env(tmp_path / "tf")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    overrides: dict[str, Any] = {
        "terraform_bin": str(wrapper),
        "heartbeat_interval": 0.5,
        "lease_ttl": 5.0,
        "report_timeout": 5.0,
    }
    stack: list[Callable[[], None]] = []
    if mode == "k8s":
        from tests.k8s_harness import emulator

        cm = emulator()
        emu = cm.__enter__()
        stack.append(lambda: cm.__exit__(None, None, None))
        overrides.update(
            k8s_kubeconfig=str(emu.kubeconfig(tmp_path / "kubeconfig")),
            k8s_namespace=NS,
            k8s_image="runq:test",
        )
    rt = tune(**overrides)
    c = Cluster(mode, rt, publisher, tmp_path, env)
    c.invocations = invocations  # type: ignore[attr-defined]
    if mode == "k8s":
        c.api = emu.api()
    if mode == "agent":
        c.pool = "modes"
        _, c.token = pools.create(rt, c.pool)
        agent_app._state.update(settings=c.agent_settings(0), pool=c.pool, capacity=2, id="agent-0")
    stop = threading.Event()
    consumer = threading.Thread(target=server.serve, args=(rt, stop), kwargs={"poll": 0.1})
    consumer.start()
    try:
        yield c
    finally:
        stop.set()
        consumer.join(10)
        agent_app._state.clear()
        for undo in reversed(stack):
            undo()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def runs_of(c: Cluster, command: str) -> list[list[str]]:
    """The terraform ``command`` invocations that started, per the wrapper's log."""
    path: Path = c.invocations  # type: ignore[attr-defined]
    lines = path.read_text().splitlines() if path.is_file() else []
    return [ln.split() for ln in lines if ln.split()[1] == "start" and ln.split()[5] == command]


def events(rt: Runtime, task_id: int) -> list[tuple[str | None, str]]:
    with rt.sessions() as s:
        return [
            (e.from_status, e.to_status)
            for e in s.scalars(
                select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
            )
        ]


def test_plan_then_apply(cluster: Cluster) -> None:
    ws = cluster.workspace("net", NULL)
    t = tasks.submit(cluster.rt, ws, "plan_and_apply")
    cluster.pump()
    done = tasks.get(cluster.rt, t.id)
    assert done.status is TaskStatus.APPLIED, done.error
    assert events(cluster.rt, t.id) == [
        (None, "pending"),
        ("pending", "planning"),
        ("planning", "apply_queued"),
        ("apply_queued", "applying"),
        ("applying", "applied"),
    ]
    with cluster.rt.sessions() as s:
        [version] = artifacts.state_versions(s, ws)
        assert version.task_id == t.id
        assert artifacts.plan_of(s, t.id) is not None
    logs = {p: artifacts_log(cluster.rt, t.id, p) for p in ("plan", "apply")}
    assert "Plan: 1 to add" in logs["plan"]
    assert "Apply complete! Resources: 1 added" in logs["apply"]
    # Handles name where each phase ran, by mode.
    prefix = {"local": "local:", "agent": "agent:agent-0", "k8s": "k8s:"}[cluster.mode]
    assert (done.executor_handle or "").startswith(prefix), done.executor_handle
    if cluster.mode != "k8s":  # each phase's Celery task says what it did
        assert cluster.outcomes == ["fence 1: planned, +1 ~0 -0", "fence 2: applied"]


def artifacts_log(rt: Runtime, task_id: int, phase: str) -> str:
    with rt.sessions() as s:
        return artifacts.log_text(s, task_id, phase).decode()


def test_a_failing_plan(cluster: Cluster) -> None:
    ws = cluster.workspace("broken", BROKEN)
    t = tasks.submit(cluster.rt, ws, "plan_and_apply")
    cluster.pump()
    done = tasks.get(cluster.rt, t.id)
    assert done.status is TaskStatus.FAILED
    assert "terraform init exited 1" in (done.error or ""), done.error
    assert runs_of(cluster, "apply") == []
    if cluster.mode != "k8s":  # the phase's Celery task failed too, saying why
        (failed,) = cluster.outcomes
        assert isinstance(failed, PhaseFailed), failed
        assert str(failed).startswith(f"task {t.id}: plan in broken, fence 1: failed: ")
        assert "terraform init exited 1" in str(failed)


def test_a_stale_report_is_refused_and_runs_nothing(cluster: Cluster) -> None:
    ws = cluster.workspace("net", NULL)
    t = tasks.submit(cluster.rt, ws, "plan")
    # Claim and hand off, but hold the hand-off back: then the claim is
    # superseded (as the reconciler does after a lost lease).
    cluster.step()  # claim_plan -> the hand-off is published (or a Job made)
    old = current_handoff(cluster.rt, t.id)
    with cluster.rt.transaction() as s:
        transition(
            s,
            t.id,
            TaskStatus.PLANNING,
            actor="test",
            reason="re-claimed",
            expect={TaskStatus.PLANNING},
            fence=old.fence,
        )
    new = current_handoff(cluster.rt, t.id)
    assert new.fence == old.fence + 1
    cluster.pump()  # the old executor: its Started is refused as stale
    assert runs_of(cluster, "init") == []
    assert tasks.get(cluster.rt, t.id).executor_handle is None
    cluster.hand_off_again(t.id)  # the new claim's hand-off
    cluster.pump()
    done = tasks.get(cluster.rt, t.id)
    assert done.status is TaskStatus.SUCCESS, done.error
    assert [r[4] for r in runs_of(cluster, "plan")] == [str(new.fence)]


def test_a_duplicate_hand_off_runs_once(cluster: Cluster) -> None:
    ws = cluster.workspace("net", NULL)
    t = tasks.submit(cluster.rt, ws, "plan")
    cluster.step()  # claimed, handed off
    cluster.hand_off_again(t.id)  # and again (a re-send whose first send was slow)
    deliveries = 2
    if cluster.mode == "k8s":
        assert len(cluster.jobs()) == 1  # the second create got 409 AlreadyExists
        deliveries = 1
    # Both deliveries at once, where there are two.
    threads = [threading.Thread(target=cluster.step) for _ in range(deliveries)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    cluster.pump()
    assert tasks.get(cluster.rt, t.id).status is TaskStatus.SUCCESS
    assert len(runs_of(cluster, "plan")) == 1


def test_cancel_reaches_the_running_phase(cluster: Cluster) -> None:
    os.environ["SLOW_TF_PLAN_SECONDS"] = "60"
    try:
        ws = cluster.workspace("net", NULL)
        t = tasks.submit(cluster.rt, ws, "plan")
        cluster.step()  # claimed
        runner = threading.Thread(target=cluster.pump)
        runner.start()
        deadline = time.monotonic() + 60
        while tasks.get(cluster.rt, t.id).executor_handle is None or not runs_of(cluster, "plan"):
            assert time.monotonic() < deadline, "the plan never started"
            time.sleep(0.1)
        cancelled_at = time.monotonic()
        tasks.cancel(cluster.rt, t.id)
        runner.join(60)
        assert not runner.is_alive()
        done = tasks.get(cluster.rt, t.id)
        assert done.status is TaskStatus.CANCELLED, done.error
        # Heard at a heartbeat (every 0.5 s), not after the 60 s plan.
        assert time.monotonic() - cancelled_at < 20
    finally:
        os.environ.pop("SLOW_TF_PLAN_SECONDS", None)


def test_the_apply_needs_nothing_the_plan_left_on_disk(cluster: Cluster) -> None:
    """Every data directory (the worker's, the agent's, the pods') is wiped
    between the plan and its apply, as if the apply ran on a new host."""
    import shutil

    ws = cluster.workspace("net", NULL, auto_apply=False)
    t = tasks.submit(cluster.rt, ws, "plan_and_apply")
    cluster.pump()
    assert tasks.get(cluster.rt, t.id).status is TaskStatus.APPLY_PENDING
    for path in (
        cluster.rt.settings.work_dir,
        cluster.rt.settings.logs_dir,
        cluster.root / "agent-0",
        cluster.root / "pods",
    ):
        shutil.rmtree(path, ignore_errors=True)
    tasks.confirm(cluster.rt, t.id)
    cluster.pump()
    done = tasks.get(cluster.rt, t.id)
    assert done.status is TaskStatus.APPLIED, done.error
    assert "Apply complete! Resources: 1 added" in artifacts_log(cluster.rt, t.id, "apply")
