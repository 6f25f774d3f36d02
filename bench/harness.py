"""Shared plumbing of the benchmark: the private Redis, the bench databases,
worker pools per system, runtimes, and small statistics helpers.

A :class:`Bench` owns one ``ExitStack``: the private ``redis-server``, every
database it created (dropped ``WITH (FORCE)``) and every worker pool are
released through it, on success, failure or Ctrl-C alike.

Systems: ``new`` (runq's default ``RUNQ_DISPATCH_MODE``), ``legacy`` (every
task of a workspace serialized) and ``celery`` (:mod:`bench.bare`, a no-op
task on runq's Celery configuration). Every pool gets the same worker flags
(:class:`scheduler.supervise.WorkerPool`, run from this checkout by
:class:`tests.workers.WorkerPool`), only the app differs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from redis import Redis
from sqlalchemy import select

from celery_app.runtime import build_runtime, private_app
from scheduler.messages import Publisher
from scheduler.models import TaskEvent
from scheduler.runtime import Runtime
from scheduler.settings import ExecutorKind, Settings
from scheduler.states import DispatchMode
from scheduler.supervise import RedisServer
from tests.conftest import PG_ADMIN_URL, create_database, drop_database
from tests.workers import WorkerPool

SYSTEMS = ("new", "legacy", "celery")
RUNQ = ("new", "legacy")

T = TypeVar("T")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rotate(items: Sequence[T], rep: int) -> list[T]:
    """``items`` rotated by ``rep``: who goes first alternates between reps."""
    k = rep % len(items)
    return [*items[k:], *items[:k]]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds() * 1000


@dataclass(frozen=True)
class Shape:
    """A pool shape: ``workers`` celery workers of ``concurrency`` processes."""

    workers: int
    concurrency: int

    @property
    def processes(self) -> int:
        return self.workers * self.concurrency

    @property
    def label(self) -> str:
        return f"{self.workers}x{self.concurrency}"


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    stack: ExitStack
    redis: RedisServer
    database_url: str
    names_made: int = 0
    #: Bench databases made beside the main one (the scale figure's).
    extra_dbs: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, args: argparse.Namespace, stack: ExitStack, root: Path) -> Bench:
        redis = RedisServer(root)
        redis.start()
        stack.callback(redis.stop)
        name, url = create_database("runq_bench")
        stack.callback(drop_database, name)
        (root / "src").mkdir()
        (root / "src" / "main.tf").write_text("# bench\n")
        return cls(args, root, stack, redis, url)

    @property
    def source_dir(self) -> str:
        return str(self.root / "src")

    def new_database(self, prefix: str) -> str:
        name, url = create_database(prefix)
        self.stack.callback(drop_database, name)
        self.extra_dbs.append(name)
        return url

    def names(self, prefix: str, n: int) -> list[str]:
        """``n`` workspace names never used before in this run."""
        self.names_made += 1
        return [f"{prefix}-{self.names_made}-{i}" for i in range(n)]

    def settings(self, mode: DispatchMode, database_url: str | None = None) -> Settings:
        return Settings(
            database_url=database_url or self.database_url,
            redis_url=self.redis.url,
            data_dir=self.root / "client",
            dispatch_mode=mode,
            executor=ExecutorKind.FAKE,
        )

    def env(self, mode: DispatchMode, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            "RUNQ_DATABASE_URL": self.database_url,
            "RUNQ_REDIS_URL": self.redis.url,
            "RUNQ_DATA_DIR": str(self.root / "workers"),
            "RUNQ_DISPATCH_MODE": str(mode),
            "RUNQ_EXECUTOR": "fake",
            "RUNQ_FAKE_PLAN_SECONDS": "0",
            "RUNQ_FAKE_APPLY_SECONDS": "0",
            **(extra or {}),
        }

    def flush_redis(self) -> None:
        client = Redis.from_url(self.redis.url)
        try:
            client.flushdb()
        finally:
            client.close()

    @contextmanager
    def workers(
        self, system: str, shape: Shape, extra: dict[str, str] | None = None
    ) -> Iterator[WorkerPool]:
        """A started pool for ``system`` on an empty broker; stopped on exit."""
        self.flush_redis()
        mode = DispatchMode.NEW if system == "celery" else DispatchMode(system)
        logdir = self.root / "logs" / f"{system}-{shape.label}-{self.names_made}"
        self.names_made += 1
        pool = WorkerPool(
            shape.workers,
            self.env(mode, extra),
            logdir,
            concurrency=shape.concurrency,
            # Workers of bench.bare get every flag runq's workers get.
            app="bench.bare" if system == "celery" else "celery_app",
        )
        try:
            pool.start()
            yield pool
        finally:
            pool.stop()

    @contextmanager
    def runtime(self, mode: DispatchMode) -> Iterator[Runtime]:
        """A client runtime publishing through a private Celery app."""
        settings = self.settings(mode)
        app = private_app(settings, f"bench-{mode}")
        rt = build_runtime(app, settings, actor="bench")
        try:
            yield rt
        finally:
            rt.close()
            app.close()

    @contextmanager
    def local_runtime(
        self, mode: DispatchMode, publisher: Publisher, database_url: str | None = None
    ) -> Iterator[Runtime]:
        """An in-process runtime with ``publisher`` (no workers involved)."""
        rt = Runtime(self.settings(mode, database_url), publisher, actor="bench")
        try:
            yield rt
        finally:
            rt.close()


@dataclass(frozen=True)
class Event:
    task_id: int
    from_status: str | None
    to_status: str
    at: datetime


def events_of(rt: Runtime, task_ids: Sequence[int]) -> list[Event]:
    """The transitions of ``task_ids``, in the order they were recorded."""
    with rt.sessions() as s:
        rows = s.execute(
            select(TaskEvent.task_id, TaskEvent.from_status, TaskEvent.to_status, TaskEvent.at)
            .where(TaskEvent.task_id.in_(list(task_ids)))
            .order_by(TaskEvent.id)
        ).all()
    return [Event(r[0], r[1], r[2], r[3]) for r in rows]


def pg_url(sqlalchemy_url: str) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as libpq takes it."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def host_info(redis_url: str) -> dict[str, Any]:
    with psycopg.connect(PG_ADMIN_URL) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    client = Redis.from_url(redis_url)
    try:
        redis_version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgresql": row[0] if row else "?",
        "redis": redis_version,
        "loadavg_at_start": os.getloadavg(),
    }


def timed(start: float) -> float:
    return round(time.monotonic() - start, 1)
