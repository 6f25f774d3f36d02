"""Unstarted hand-offs: re-sent under the same fence with backoff, failed
after RUNQ_HANDOFF_ATTEMPTS sends; a failed publish is not fatal."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from executors.base import Started
from scheduler import dispatcher, messages, reconciler, reports, tasks
from scheduler.messages import Message, RecordingPublisher
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_NO_CHANGES,
    ago,
    applying,
    begin,
    claimed,
    end,
    everything,
    executes,
    is_stale,
    recorder,
    set_task,
    task_events,
)

S = TaskStatus
PA = TaskType.PLAN_AND_APPLY


class BrokerDown(RecordingPublisher):
    """Records what gets through; raises like redis-py while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.refused: list[Message] = []

    def publish(self, message: Message) -> str:
        if self.down:
            self.refused.append(message)
            raise RedisConnectionError(
                "Error 111 connecting to 127.0.0.1:6379. Connection refused."
            )
        return super().publish(message)


def sent_at(rt: Runtime, task_id: int, seconds_ago: float) -> None:
    """The current hand-off was last sent ``seconds_ago``."""
    set_task(rt, task_id, handoff_at=ago(seconds_ago))


def test_unstarted_handoff_is_resent_under_the_same_fence_with_backoff(
    rt: Runtime, ws: str
) -> None:
    tid, f = claimed(rt, ws)
    events = task_events(rt, tid)
    recorder(rt).sent.clear()
    resend_after = rt.settings.resend_after  # 60 s: waits of 60, 120, 240 s

    assert reconciler.sweep(rt).resent == [], "a fresh hand-off is not re-sent"
    for attempts, wait in [(1, 60), (2, 120), (3, 240)]:
        assert wait == resend_after * 2 ** (attempts - 1)
        sent_at(rt, tid, wait - 2)
        assert reconciler.sweep(rt).resent == [], f"re-sent before its {wait}s backoff"
        assert tasks.get(rt, tid).handoff_attempts == attempts
        sent_at(rt, tid, wait + 1)
        assert reconciler.sweep(rt).resent == [tid]
        view = tasks.get(rt, tid)
        assert (view.status, view.fence, view.handoff_attempts) == (S.PLANNING, f, attempts + 1)

    assert executes(rt) == [(tid, f)] * 3
    assert task_events(rt, tid) == events, "a re-send is not a status change"

    # One of the copies starts it; every other copy finds it started.
    assert begin(rt, tid, f).accepted
    other_copy = reports.accept(rt, Started(tid, f, Phase.PLAN, "exec:another-run"))
    assert is_stale(other_copy)
    sent_at(rt, tid, 3600)
    out = reconciler.sweep(rt)
    assert (out.resent, out.handoff_failed) == ([], [])
    assert end(rt, tid, f, PLAN_NO_CHANGES).accepted


def test_handoff_fails_after_its_attempts(
    rt: Runtime, ws: str, tune: Callable[..., Runtime]
) -> None:
    r = tune(handoff_attempts=3)
    tid, f = claimed(r, ws, PA)
    recorder(r).sent.clear()
    for _ in range(2):
        sent_at(r, tid, 3601)
        assert reconciler.sweep(r).resent == [tid]
    assert tasks.get(r, tid).handoff_attempts == 3
    assert executes(r) == [(tid, f)] * 2

    sent_at(r, tid, 3601)
    out = reconciler.sweep(r)

    assert (out.resent, out.handoff_failed) == ([], [tid])
    view = tasks.get(r, tid)
    assert (view.status, view.fence) == (S.FAILED, f)
    assert view.error == ("hand-off failed: no local executor started the plan after 3 sends")
    ev = task_events(r, tid)[-1]
    assert (ev.from_status, ev.to_status, ev.reason, ev.fence, ev.actor) == (
        S.PLANNING,
        S.FAILED,
        "hand-off failed",
        f,
        r.actor,
    )
    assert executes(r) == [(tid, f)] * 2, "no send after the last attempt"
    assert messages.dispatch(ws) in recorder(r).sent, "the workspace is woken"
    # A copy that arrives after all is refused.
    assert is_stale(begin(r, tid, f))


def test_apply_handoff_failure_frees_the_workspace(
    rt: Runtime, ws: str, tune: Callable[..., Runtime]
) -> None:
    r = tune(handoff_attempts=2)
    tid, f = applying(r, ws)
    nxt = tasks.submit(r, ws, PA)
    set_task(r, tid, handoff_attempts=2, handoff_at=ago(3601))
    recorder(r).sent.clear()

    assert reconciler.sweep(r).handoff_failed == [tid]

    view = tasks.get(r, tid)
    assert (view.status, view.fence) == (S.FAILED, f)
    assert view.error == "hand-off failed: no local executor started the apply after 2 sends"
    assert executes(r) == []
    assert dispatcher.dispatch(r, ws).task_id == nxt.id


def test_a_failed_publish_leaves_the_claim_for_the_reconciler(
    rt: Runtime, ws: str, caplog: Any
) -> None:
    broker = BrokerDown()
    down = Runtime(settings=rt.settings, publisher=broker, actor="worker")
    try:
        plan = tasks.submit(rt, ws, TaskType.PLAN)
        pa = tasks.submit(rt, ws, PA)
        caplog.set_level(logging.ERROR, logger="scheduler.dispatcher")

        p = dispatcher.claim_plan(down, plan.id)
        d = dispatcher.dispatch(down, ws)

        assert (p.action, d.action, d.task_id) == ("claimed_plan", "claimed_plan", pa.id)
        assert [m.task for m in broker.refused] == [messages.TASK_EXECUTE] * 2
        failed = [r for r in caplog.records if getattr(r, "action", None) == "handoff_failed"]
        assert sorted(getattr(r, "task_id", None) for r in failed) == sorted([plan.id, pa.id])
        assert all("the reconciler will re-send it" in r.getMessage() for r in failed)
        for tid in (plan.id, pa.id):
            view = tasks.get(rt, tid)
            assert (view.status, view.fence, view.handoff_attempts) == (S.PLANNING, 1, 1)
            assert view.executor_handle is None and view.error is None

        # Still down at the first re-send: counted, not fatal.
        for tid in (plan.id, pa.id):
            sent_at(rt, tid, 61)
        assert sorted(reconciler.sweep(down).resent) == sorted([plan.id, pa.id])
        assert tasks.get(rt, plan.id).status is S.PLANNING
        assert broker.sent == []

        # The broker is back: the next due re-send gets through, same fence.
        broker.down = False
        for tid in (plan.id, pa.id):
            sent_at(rt, tid, 121)
        assert sorted(reconciler.sweep(down).resent) == sorted([plan.id, pa.id])
        assert sorted(executes(down)) == sorted([(plan.id, 1), (pa.id, 1)])
        for tid in (plan.id, pa.id):
            assert tasks.get(rt, tid).handoff_attempts == 3
            assert begin(rt, tid, 1).accepted
    finally:
        down.close()


def test_a_started_phase_is_never_resent(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    assert begin(rt, tid, f, Phase.PLAN).accepted
    sent_at(rt, tid, 86_400)
    before = everything(rt)
    recorder(rt).sent.clear()
    out = reconciler.sweep(rt)
    assert (out.resent, out.handoff_failed) == ([], [])
    assert executes(rt) == []
    assert everything(rt) == before
