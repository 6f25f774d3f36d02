"""Plan start latency and plan throughput, runq against bare Celery.

Latency, one at a time: submit a plan, wait until it settles, take
``tasks.phase_started_at`` (the executor's Started) minus the submit time;
bare Celery: ``send_task`` of the no-op minus the time the task recorded at
its start. Throughput: N plans submitted (round robin over W workspaces),
then N / (last ``tasks.finished_at`` - first submit); bare Celery: N no-ops
sent, N / (last start - first send). Run on the worker pool the caller
started; see :mod:`bench.run` for shapes and repetitions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis
from sqlalchemy import func, select

from bench import floor_plan
from bench.bare import STARTED
from bench.harness import Bench, pg_url
from celery_app.runtime import private_app
from scheduler import tasks, workspaces
from scheduler.api import wait
from scheduler.models import Task
from scheduler.runtime import Runtime
from scheduler.states import DispatchMode, TaskStatus, TaskType


def samples(one: Callable[[], float], n: int, warmup: int) -> list[float]:
    """``n`` latencies in ms after ``warmup`` unrecorded ones."""
    for _ in range(warmup):
        one()
    return [1000 * one() for _ in range(n)]


def runq_latency(bench: Bench, rt: Runtime, n: int, warmup: int) -> list[float]:
    [name] = bench.names("lat", 1)
    workspaces.create(rt, name, source_dir=bench.source_dir)

    def one_plan() -> float:
        began = time.time()
        task = tasks.submit(rt, name, TaskType.PLAN)
        [done] = wait(rt, [task.id], timeout=60, poll=0.005)
        assert done.status is TaskStatus.SUCCESS, done
        assert done.phase_started_at is not None
        return done.phase_started_at.timestamp() - began

    return samples(one_plan, n, warmup)


def runq_throughput(bench: Bench, rt: Runtime, plans: int, spread: int) -> float:
    names = bench.names("tput", spread)
    for name in names:
        workspaces.create(rt, name, source_dir=bench.source_dir)
    began = time.time()
    ids = [tasks.submit(rt, names[i % len(names)], TaskType.PLAN).id for i in range(plans)]
    views = wait(rt, ids, timeout=900, poll=0.1)
    assert all(v.status is TaskStatus.SUCCESS for v in views)
    with rt.sessions() as s:
        last = s.scalar(select(func.max(Task.finished_at)).where(Task.id.in_(ids)))
    assert last is not None
    return plans / (last.timestamp() - began)


class BareClient:
    """Sends the no-op on runq's Celery configuration and reads its starts;
    and, on the same workers, :mod:`bench.floor_plan`'s durable plans."""

    def __init__(self, bench: Bench) -> None:
        self.app = private_app(bench.settings(DispatchMode.NEW), "bench-client")
        self.redis = Redis.from_url(bench.redis.url)
        self.floor = floor_plan.Client(pg_url(bench.database_url), self.app)

    def close(self) -> None:
        self.floor.close()
        self.redis.close()
        self.app.close()

    def floor_latency(self, n: int, warmup: int) -> list[float]:
        return samples(self.floor.latency, n, warmup)

    def floor_throughput(self, n: int) -> float:
        return self.floor.throughput(n)

    def latency(self, n: int, warmup: int) -> list[float]:
        def one_task() -> float:
            self.redis.delete(STARTED)
            began = time.time()
            self.app.send_task("bench.noop")
            while not (got := self.redis.lrange(STARTED, 0, -1)):
                time.sleep(0.001)
            return float(got[0]) - began

        return samples(one_task, n, warmup)

    def throughput(self, n: int) -> float:
        self.redis.delete(STARTED)
        began = time.time()
        for _ in range(n):
            self.app.send_task("bench.noop")
        deadline = time.monotonic() + 600
        while self.redis.llen(STARTED) < n:
            assert time.monotonic() < deadline, "bare Celery did not drain"
            time.sleep(0.02)
        last = max(float(t) for t in self.redis.lrange(STARTED, 0, -1))
        return n / (last - began)
