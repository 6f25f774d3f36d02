"""A running runq: real workers, a private broker, the test's own client.

:func:`start_cluster` starts two ``celery -A celery_app worker`` processes in
one dispatch mode against the session's PostgreSQL database (or an SQLite
file), with a private ``redis-server`` database as broker and lock, and the
slow terraform wrapper as ``RUNQ_TERRAFORM_BIN``. The test process submits
through its own :class:`Runtime`, publishing through a separate Celery app
object pointed at the same private broker (the global ``celery_app.app`` is
left alone).

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
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from celery import Celery
from redis import Redis

from celery_app.config import broker_kind, celery_config
from celery_app.runtime import CeleryPublisher
from scheduler import messages, tasks, workspaces
from scheduler.api import wait
from scheduler.messages import RecordingPublisher
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import TERMINAL, DispatchMode, TaskStatus
from scheduler.views import EventView, TaskView
from tests.workers import WorkerPool, write_slow_terraform

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

    def workspace(
        self,
        name: str,
        *,
        auto_apply: bool = False,
        plan_seconds: float = 0.0,
        apply_seconds: float = 0.0,
        config: str = ALWAYS_CHANGES,
    ) -> str:
        """A fresh workspace whose terraform pauses before plan and apply."""
        full = f"{self.prefix}-{name}"
        src = self.src_root / full
        src.mkdir(parents=True)
        (src / "main.tf").write_text(config)
        (src / "slow.env").write_text(
            f"SLOW_TF_PLAN_SECONDS={plan_seconds}\nSLOW_TF_APPLY_SECONDS={apply_seconds}\n"
        )
        workspaces.create(self.rt, full, source_dir=str(src), auto_apply=auto_apply)
        return full

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
) -> Iterator[Cluster]:
    """Start ``workers`` real Celery workers and a client; stop them after.

    ``redis_url`` must name a Redis database no one else uses: it is flushed,
    then holds the workspace lock and, unless ``broker_url`` names another
    (a RabbitMQ vhost no one else uses), serves as the broker.
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
    pool = WorkerPool(workers, env, root / "logs", concurrency=concurrency)
    app = Celery(f"runq-scenario-{mode}", set_as_current=False)
    app.conf.update(celery_config(settings))
    rt = Runtime(settings=settings, publisher=CeleryPublisher(app), actor="scenario-test")
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
    )
    started = time.monotonic()
    pool.start()
    print(
        f"\n{workers} {mode}-mode workers on {broker_kind(settings.resolved_broker_url)} "
        f"ready in {time.monotonic() - started:.1f}s"
    )
    try:
        yield cluster
    finally:
        pool.stop()
        rt.close()
        quiet.close()
        app.close()
