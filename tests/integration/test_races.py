"""Concurrent claims: the database guard decides, whatever the Redis lock says.

Threads are lined up on a Barrier so their claims overlap; the outcome is
asserted, never timed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import func, select

from scheduler import dispatcher, tasks
from scheduler.dispatcher import Decision
from scheduler.errors import ConcurrentChange
from scheduler.models import Task, TaskEvent
from scheduler.runtime import Runtime
from scheduler.states import ACTIVE_APPLY, TaskStatus, TaskType
from scheduler.transitions import transition
from tests.integration.helpers import handoffs, make_workspace

N = 8
T = TypeVar("T")


def race(n: int, fn: Callable[[int], T]) -> list[T | BaseException]:
    """Run ``fn(i)`` in ``n`` threads released together; results or errors."""
    barrier = threading.Barrier(n)
    results: list[T | BaseException | None] = [None] * n

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = fn(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


@pytest.fixture
def warm(rt: Runtime) -> Runtime:
    """Build the runtime's engine, sessionmaker and Redis client before threads share it."""
    assert rt.engine is not None and rt.sessions is not None
    rt.redis.ping()
    return rt


@pytest.fixture
def ws(warm: Runtime, tmp_path: Path) -> str:
    make_workspace(warm, "net", tmp_path / "src")
    return "net"


def _active(rt: Runtime) -> list[int]:
    with rt.sessions() as s:
        return list(
            s.scalars(
                select(Task.id).where(
                    Task.type == TaskType.PLAN_AND_APPLY,
                    Task.status.in_([str(x) for x in ACTIVE_APPLY]),
                )
            )
        )


def _claim_events(rt: Runtime) -> list[int]:
    with rt.sessions() as s:
        return list(
            s.scalars(
                select(TaskEvent.task_id).where(
                    TaskEvent.from_status == TaskStatus.PENDING,
                    TaskEvent.to_status == TaskStatus.PLANNING,
                )
            )
        )


def test_partial_index_admits_one_claim_among_concurrent_transactions(
    warm: Runtime, ws: str
) -> None:
    """N transactions each claim a *different* pending plan+apply of one
    workspace with no lock at all: the partial unique index lets one win."""
    rt = warm
    ids = [tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY).id for _ in range(N)]

    def claim(i: int) -> str:
        with rt.sessions() as s:
            try:
                with s.begin():
                    transition(s, ids[i], TaskStatus.PLANNING, actor=f"racer-{i}")
            except ConcurrentChange:
                return "lost"
        return "won"

    results = race(N, claim)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert sorted(results, key=str) == ["lost"] * (N - 1) + ["won"]
    winner = ids[results.index("won")]
    assert _active(rt) == [winner]
    assert _claim_events(rt) == [winner]
    for i, tid in enumerate(ids):
        view = tasks.get(rt, tid)
        if tid == winner:
            assert (view.status, view.fence) == (TaskStatus.PLANNING, 1)
        else:
            assert (view.status, view.fence) == (TaskStatus.PENDING, 0), f"racer {i}"


def test_concurrent_decides_without_the_lock_claim_the_head_once(warm: Runtime, ws: str) -> None:
    """N dispatcher decisions with the Redis lock bypassed (as if it lied)."""
    rt = warm
    ids = [tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY).id for _ in range(3)]

    def decide(_i: int) -> Decision | str:
        try:
            with rt.transaction() as s:
                decision, _handoff = dispatcher._decide(rt, s, ws)
        except ConcurrentChange:
            return "lost race"
        return decision

    results = race(N, decide)
    assert [r for r in results if isinstance(r, BaseException)] == []
    claimed = [r for r in results if isinstance(r, Decision) and r.claimed]
    assert len(claimed) == 1
    assert claimed[0].task_id == ids[0], "the head of the queue, nothing else"
    for r in results:
        if isinstance(r, Decision) and not r.claimed:
            assert r.action == "skipped" and "busy" in r.reason
    assert _active(rt) == [ids[0]]
    assert _claim_events(rt) == [ids[0]]


def test_concurrent_dispatch_under_the_redis_lock_claims_once(warm: Runtime, ws: str) -> None:
    """Dispatchers do not wait for the lock: one that finds it busy marks the
    workspace dirty and leaves (lock_busy); the holder re-runs for the mark.
    Exactly one claims, and no wake-up is left unanswered."""
    rt = warm
    ids = [tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY).id for _ in range(3)]

    results = race(N, lambda _i: dispatcher.dispatch(rt, ws))

    assert [r for r in results if isinstance(r, BaseException)] == []
    decisions = [r for r in results if isinstance(r, Decision)]
    assert [d.task_id for d in decisions if d.claimed] == [ids[0]]
    assert all(d.action in {"claimed_plan", "skipped", "lock_busy"} for d in decisions)
    assert _claim_events(rt) == [ids[0]]
    assert [h.task_id for h in handoffs(rt)] == [ids[0]], "handed off exactly once"
    assert [tasks.get(rt, i).status for i in ids] == [
        TaskStatus.PLANNING,
        TaskStatus.PENDING,
        TaskStatus.PENDING,
    ]
    assert not rt.redis.keys("runq:lock:*"), "every holder released the lock"
    assert not rt.redis.keys("runq:dirty:*"), "a holder answered every dirty mark"


def test_concurrent_claim_plan_of_one_plan_claims_once(warm: Runtime, ws: str) -> None:
    rt = warm
    plan = tasks.submit(rt, ws, TaskType.PLAN)

    results = race(N, lambda _i: dispatcher.claim_plan(rt, plan.id))

    assert [r for r in results if isinstance(r, BaseException)] == []
    decisions = [r for r in results if isinstance(r, Decision)]
    assert sum(d.claimed for d in decisions) == 1
    assert _claim_events(rt) == [plan.id]
    assert len(handoffs(rt)) == 1
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(TaskEvent)) == 2
