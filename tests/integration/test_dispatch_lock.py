"""The workspace lock: nobody waits for it, and no wake-up is lost.

A dispatcher that finds the lock busy leaves a dirty mark and returns at
once; the holder reads the mark after it releases and looks again. Real
Redis; the holder is either a bare ``workspace_lock`` or a dispatch paused
inside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from scheduler import dispatcher, tasks
from scheduler.dispatcher import Decision
from scheduler.locks import dirty_key, lock_key, workspace_lock
from scheduler.runtime import Runtime
from scheduler.states import TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_NO_CHANGES,
    begin,
    claimed,
    end,
    everything,
    make_workspace,
)

S = TaskStatus
PA = TaskType.PLAN_AND_APPLY


@pytest.fixture
def elsewhere(rt: Runtime) -> Iterator[Redis]:
    """Another process's connection to the same Redis."""
    client = Redis.from_url(rt.settings.redis_url)
    yield client
    client.close()


def test_a_busy_lock_is_marked_dirty_not_waited_for(rt: Runtime, ws: str, elsewhere: Redis) -> None:
    t = tasks.submit(rt, ws, PA)
    assert rt.settings.lock_ttl == 30
    before = everything(rt)

    with workspace_lock(elsewhere, ws, ttl=30) as held:
        assert held and not held.was_dirty
        t0 = time.monotonic()
        decision = dispatcher.dispatch(rt, ws)
        took = time.monotonic() - t0
        assert (decision.action, decision.task_id) == ("lock_busy", None)
        assert took < 0.5, f"dispatch waited {took:.2f}s for a busy lock"
        assert elsewhere.get(dirty_key(ws)) == b"1"
        assert 0 < elsewhere.ttl(dirty_key(ws)) <= 60
        assert everything(rt) == before

    # The holder learns of the mark after it let go, and the mark is consumed.
    assert held.was_dirty
    assert elsewhere.exists(dirty_key(ws), lock_key(ws)) == 0
    # The holder's second look is what claims the task.
    assert dispatcher.dispatch(rt, ws).task_id == t.id


def test_a_holder_nobody_bothered_is_not_dirty(rt: Runtime, ws: str, elsewhere: Redis) -> None:
    with workspace_lock(elsewhere, ws, ttl=30) as held:
        assert held
    assert not held.was_dirty


def test_a_wakeup_while_the_holder_is_inside_is_not_lost(
    rt: Runtime, ws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, f = claimed(rt, ws, PA)
    begin(rt, first, f)
    second = tasks.submit(rt, ws, PA)
    real = dispatcher._dispatch_held
    inside, resume = threading.Event(), threading.Event()
    passes: list[Decision] = []

    def held_then_paused(r: Runtime, workspace: str) -> Decision:
        decision = real(r, workspace)
        passes.append(decision)
        if len(passes) == 1:
            inside.set()  # decided, still holding the lock
            assert resume.wait(10)
        return decision

    monkeypatch.setattr(dispatcher, "_dispatch_held", held_then_paused)
    out: list[Decision] = []
    holder = threading.Thread(target=lambda: out.append(dispatcher.dispatch(rt, ws)))
    holder.start()
    try:
        assert inside.wait(10)
        assert passes[0].action == "skipped" and "busy" in passes[0].reason
        # The running plan+apply ends; its wake-up reaches another dispatcher
        # while the holder is still inside.
        assert end(rt, first, f, PLAN_NO_CHANGES).accepted
        assert dispatcher.dispatch(rt, ws).action == "lock_busy"
        assert tasks.get(rt, second.id).status is S.PENDING
    finally:
        resume.set()
        holder.join(10)

    assert [d.action for d in passes] == ["skipped", "claimed_plan"]
    assert (out[0].action, out[0].task_id) == ("claimed_plan", second.id)
    assert tasks.get(rt, second.id).status is S.PLANNING


def test_racing_wakeups_are_never_lost(rt: Runtime, src: Path) -> None:
    """A dispatch and a phase end with its wake-up, started together, many
    times: the queued plan+apply is always claimed, without the reconciler.

    A stress check (about half the rounds find the lock busy); the test above
    pins the one interleaving that would lose the wake-up."""
    errors: list[BaseException] = []

    def run(fn: Any, barrier: threading.Barrier) -> None:
        try:
            barrier.wait(10)
            fn()
        except BaseException as exc:
            errors.append(exc)

    for i in range(10):
        ws = f"race{i}"
        make_workspace(rt, ws, src)
        first, f = claimed(rt, ws, PA)
        begin(rt, first, f)
        second = tasks.submit(rt, ws, PA)

        def wake(ws: str = ws, first: int = first, f: int = f) -> None:
            assert end(rt, first, f, PLAN_NO_CHANGES).accepted
            dispatcher.dispatch(rt, ws)  # the wake-up the commit published

        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=run, args=(lambda ws=ws: dispatcher.dispatch(rt, ws), barrier)),
            threading.Thread(target=run, args=(wake, barrier)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        view = tasks.get(rt, second.id)
        assert (view.status, view.fence) == (S.PLANNING, 1), f"round {i}: the wake-up was lost"
