"""A running runq: real workers, a private broker, the test's own client.

:func:`start_cluster` starts two ``celery -A celery_app worker`` processes in
one dispatch mode against the session's PostgreSQL database (or an SQLite
file), with a private ``redis-server`` database as broker and lock, and the
slow terraform wrapper as ``RUNQ_TERRAFORM_BIN``. The test process submits
through its own :class:`Runtime`, publishing through a separate Celery app
object pointed at the same private broker (the global ``celery_app.app`` is
left alone).

With ``separate_hosts`` every worker is a host of its own, as a container
would be: its own ``RUNQ_DATA_DIR`` and its own terraform wrapper, which logs
every command it runs to that host's ``terraform.log``
(:meth:`Cluster.invocations` says which host ran what). With ``agents``, that
many ``runq agent`` processes serve the cluster's agent pool, each a host of
its own too, with no database URL that works; ``execution_mode`` is the mode
of the workspaces :meth:`Cluster.workspace` makes unless told otherwise.

Verdicts come from ``task_events``: :class:`Life` is one task's record (its
claims, ``pending -> planning``, and its terminal event), read back from the
database after the fact. Workers stay up for a whole module, so every test
makes its own workspaces (names carry a per-cluster prefix) instead of
truncating tables under running workers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from celery import Celery
from redis import Redis

from celery_app.config import broker_kind
from celery_app.runtime import CeleryPublisher, build_runtime, private_app
from scheduler import messages, pools, tasks, workspaces
from scheduler.api import wait
from scheduler.messages import RecordingPublisher
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import TERMINAL, DispatchMode, ExecutionMode, TaskStatus
from scheduler.views import EventView, TaskView
from tests.workers import NO_DATABASE, AgentPool, WorkerPool, write_slow_terraform

#: Every plan has changes (a trigger unknown until apply), so every
#: plan+apply goes on to an apply; real null_resources land in real state.
ALWAYS_CHANGES = """\
terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "2.1.2"
    }
  }
}

resource "null_resource" "r" {
  triggers = {
    at = timestamp()
  }
}
"""

#: Generous deadlines: they bound a hang, they are not what is asserted.
DEADLINE = 180.0


@dataclass(frozen=True)
class Life:
    """One task's record, from its events."""

    task: TaskView
    events: tuple[EventView, ...]

    @property
    def id(self) -> int:
        return self.task.id

    @property
    def claims(self) -> list[datetime]:
        return [
            e.at
            for e in self.events
            if e.from_status is TaskStatus.PENDING and e.to_status is TaskStatus.PLANNING
        ]

    @property
    def claimed(self) -> datetime:
        """The claim (``pending -> planning``); there must be exactly one."""
        [at] = self.claims
        return at

    @property
    def ended(self) -> datetime:
        """The terminal event."""
        [at] = [e.at for e in self.events if e.to_status in TERMINAL]
        return at

    def entered(self, status: TaskStatus) -> datetime:
        [at] = [e.at for e in self.events if e.to_status is status]
        return at

    @property
    def actors(self) -> set[str]:
        return {e.actor for e in self.events}

    def describe(self, origin: datetime) -> str:
        steps = ", ".join(
            f"{e.to_status}@{(e.at - origin).total_seconds():.2f}s" for e in self.events
        )
        return f"task {self.id} ({self.task.type}, seq {self.task.queue_seq}): {steps}"


def describe(lives: Iterable[Life]) -> str:
    """A timeline for assertion messages."""
    lives = list(lives)
    origin = min(e.at for life in lives for e in life.events)
    return "\n".join(life.describe(origin) for life in lives)


@dataclass(frozen=True)
class Invocation:
    """One terraform command, from a host's wrapper log (its start line)."""

    host: str
    at: float
    task_id: int
    phase: str
    fence: int
    command: str


@dataclass
class Cluster:
    mode: DispatchMode
    pool: WorkerPool
    settings: Settings
    #: Publishes to the private broker, as `runq submit` would.
    rt: Runtime
    #: Same database, messages kept in a list: submits no worker hears of.
    quiet: Runtime
    app: Celery
    src_root: Path
    prefix: str
    #: The mode of the workspaces :meth:`workspace` makes by default.
    execution_mode: ExecutionMode = ExecutionMode.LOCAL
    #: The ``runq agent`` processes, and the pool they serve.
    agents: AgentPool | None = None
    agent_pool: str | None = None
    #: Process name (``w1``, ``a1``, ...) -> its own directory, with
    #: separate hosts; empty when the workers share one data directory.
    hosts: dict[str, Path] = field(default_factory=dict)

    def workspace(
        self,
        name: str,
        *,
        auto_apply: bool = False,
        plan_seconds: float = 0.0,
        apply_seconds: float = 0.0,
        config: str = ALWAYS_CHANGES,
        mode: ExecutionMode | None = None,
    ) -> str:
        """A fresh workspace whose terraform pauses before plan and apply."""
        full = f"{self.prefix}-{name}"
        src = self.src_root / full
        src.mkdir(parents=True)
        (src / "main.tf").write_text(config)
        (src / "slow.env").write_text(
            f"SLOW_TF_PLAN_SECONDS={plan_seconds}\nSLOW_TF_APPLY_SECONDS={apply_seconds}\n"
        )
        mode = mode or self.execution_mode
        workspaces.create(
            self.rt,
            full,
            source_dir=str(src),
            auto_apply=auto_apply,
            mode=mode,
            agent_pool=self.agent_pool if mode is ExecutionMode.AGENT else None,
        )
        return full

    def invocations(self) -> list[Invocation]:
        """Every terraform command the hosts ran so far, oldest first (needs
        ``separate_hosts``)."""
        found: list[Invocation] = []
        for host, directory in self.hosts.items():
            log = directory / "terraform.log"
            if not log.is_file():
                continue
            for line in log.read_text().splitlines():
                at, what, task, phase, fence, command, _pid, _rc = line.split(" ")
                if what == "start" and task != "-":
                    found.append(Invocation(host, float(at), int(task), phase, int(fence), command))
        return sorted(found, key=lambda i: i.at)

    def logs(self) -> dict[str, str]:
        """Every worker's and agent's log tail."""
        out = self.pool.logs()
        if self.agents is not None:
            out.update(self.agents.logs())
        return out

    def submit(self, workspace: str, task_type: str) -> TaskView:
        return tasks.submit(self.rt, workspace, task_type, created_by="scenario-test")

    def submit_quietly(self, workspace: str, task_type: str) -> TaskView:
        """Queue a task in the database without publishing its hint."""
        return tasks.submit(self.quiet, workspace, task_type, created_by="scenario-test")

    def send_dispatch(self, workspace: str, times: int) -> None:
        publisher = CeleryPublisher(self.app)
        for _ in range(times):
            publisher.publish(messages.dispatch(workspace))

    def wait(self, ids: Iterable[int], until: frozenset[TaskStatus] = TERMINAL) -> list[TaskView]:
        return wait(self.rt, ids, timeout=DEADLINE, until=until, poll=0.1)

    def wait_status(self, task_id: int, statuses: set[TaskStatus]) -> TaskView:
        [view] = self.wait([task_id], until=frozenset(statuses))
        return view

    def lives(self, ids: Iterable[int]) -> dict[int, Life]:
        ids = list(ids)
        events = tasks.events(self.rt, ids)
        return {
            i: Life(tasks.get(self.rt, i), tuple(e for e in events if e.task_id == i)) for i in ids
        }

    def all_lives(self) -> list[Life]:
        """Every task in this cluster's workspaces."""
        views = [
            t
            for t in tasks.list_tasks(self.rt, limit=10_000)
            if t.workspace.startswith(f"{self.prefix}-")
        ]
        return list(self.lives(t.id for t in views).values())


def redis_db(url: str, db: int) -> str:
    """``url`` with its database number replaced: one private broker per cluster."""
    return f"{url.rsplit('/', 1)[0]}/{db}"


@contextmanager
def start_cluster(
    *,
    mode: DispatchMode,
    database_url: str,
    redis_url: str,
    root: Path,
    terraform_bin: str,
    terraform_env: dict[str, str],
    workers: int = 2,
    broker_url: str = "",
    concurrency: int = 3,
    separate_hosts: bool = False,
    agents: int = 0,
    agent_capacity: int = 2,
    execution_mode: ExecutionMode = ExecutionMode.LOCAL,
) -> Iterator[Cluster]:
    """Start ``workers`` real Celery workers and a client; stop them after.

    ``redis_url`` must name a Redis database no one else uses: it is flushed,
    then holds the workspace lock and, unless ``broker_url`` names another
    (a RabbitMQ vhost no one else uses), serves as the broker.
    ``separate_hosts`` gives each worker its own data directory and terraform
    wrapper (always so for agents); ``agents`` starts that many ``runq agent
    --capacity agent_capacity`` processes for a pool made for the cluster.
    """
    flush = Redis.from_url(redis_url)
    flush.flushdb()
    flush.close()
    data_dir = root / "data"
    (root / "src").mkdir(parents=True)
    slow = write_slow_terraform(root, terraform_bin)
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        broker_url=broker_url,
        data_dir=data_dir,
        terraform_bin=str(slow),
        dispatch_mode=mode,
    )
    env = {
        **terraform_env,
        "RUNQ_DATABASE_URL": database_url,
        "RUNQ_REDIS_URL": redis_url,
        "RUNQ_BROKER_URL": broker_url,
        "RUNQ_DATA_DIR": str(data_dir),
        "RUNQ_TERRAFORM_BIN": str(slow),
        "RUNQ_DISPATCH_MODE": str(mode),
        # Workspaces set their own pauses in slow.env; these are defaults.
        "SLOW_TF_PLAN_SECONDS": "0",
        "SLOW_TF_APPLY_SECONDS": "0",
    }
    hosts: dict[str, Path] = {}

    def own_host(name: str) -> dict[str, str]:
        """A host directory of ``name``'s own: data, wrapper, its log."""
        directory = root / "hosts" / name
        if name not in hosts:
            directory.mkdir(parents=True)
            hosts[name] = directory
        wrapper = write_slow_terraform(directory, terraform_bin, directory / "terraform.log")
        return {"RUNQ_DATA_DIR": str(directory / "data"), "RUNQ_TERRAFORM_BIN": str(wrapper)}

    pool = WorkerPool(
        workers,
        env,
        root / "logs",
        concurrency=concurrency,
        env_for=own_host if separate_hosts else None,
    )
    app = private_app(settings, f"runq-scenario-{mode}")
    rt = build_runtime(app, settings, actor="scenario-test")
    quiet = Runtime(settings=settings, publisher=RecordingPublisher(), actor="scenario-test")
    cluster = Cluster(
        mode=mode,
        pool=pool,
        settings=settings,
        rt=rt,
        quiet=quiet,
        app=app,
        src_root=root / "src",
        prefix=f"{mode}-{broker_kind(settings.resolved_broker_url)}-{secrets.token_hex(3)}",
        hosts=hosts,
        execution_mode=execution_mode,
    )
    started = time.monotonic()
    with ExitStack() as stack:
        stack.callback(app.close)
        stack.callback(quiet.close)
        stack.callback(rt.close)
        stack.callback(pool.stop)
        pool.start()
        print(
            f"\n{workers} {mode}-mode workers on {broker_kind(settings.resolved_broker_url)} "
            f"ready in {time.monotonic() - started:.1f}s"
        )
        if agents:
            started = time.monotonic()
            cluster.agent_pool = f"{cluster.prefix}-pool"
            _view, token = pools.create(rt, cluster.agent_pool)
            agent_env = {
                **terraform_env,
                # A broker and a token; no database (nothing listens there).
                "RUNQ_REDIS_URL": redis_url,
                "RUNQ_BROKER_URL": broker_url,
                "RUNQ_AGENT_TOKEN": token,
                "RUNQ_DATABASE_URL": NO_DATABASE,
                "SLOW_TF_PLAN_SECONDS": "0",
                "SLOW_TF_APPLY_SECONDS": "0",
            }
            cluster.agents = AgentPool(
                agents,
                agent_env,
                root / "logs",
                env_for=own_host,
                pool=cluster.agent_pool,
                capacity=agent_capacity,
            )
            stack.callback(cluster.agents.stop)
            cluster.agents.start()
            wait_for_agents(cluster, agents)
            print(
                f"{agents} agents (capacity {agent_capacity} each) ready in "
                f"{time.monotonic() - started:.1f}s"
            )
        yield cluster


def wait_for_agents(c: Cluster, count: int, timeout: float = 30.0) -> None:
    """Until the scheduler counts ``count`` live agents in the cluster's pool
    (their signed beats reached a core worker)."""
    assert c.agent_pool is not None and c.agents is not None
    deadline = time.monotonic() + timeout
    while len([a for a in pools.agents(c.rt, c.agent_pool) if a.live]) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{count} agents not live in pool {c.agent_pool} after {timeout}s:\n"
                + "\n".join(f"--- {n}\n{t}" for n, t in c.agents.logs().items())
            )
        time.sleep(0.2)
