"""The dispatcher: lock-free plan claims, FIFO plan+apply under the workspace
lock, the manual lock, apply claims, wake-ups and failed hand-offs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis

from executors import remote
from executors.base import Handoff, PhaseResult
from executors.fake import FakeLauncher
from scheduler import dispatcher, pools, reconciler, tasks, workspaces
from scheduler.locks import dirty_key, lock_key
from scheduler.runtime import Runtime
from scheduler.states import DispatchMode, ExecutionMode, Phase, TaskStatus, TaskType
from tests.integration.helpers import (
    APPLY_OK,
    PLAN_FAILED,
    PLAN_NO_CHANGES,
    PLAN_WITH_CHANGES,
    ago,
    chain,
    dispatches,
    executes,
    fence,
    finish,
    handoffs,
    interfere_before_claim,
    last_handoff,
    make_workspace,
    recorder,
    run_phase,
    set_task,
    snapshot,
    start,
    status,
)

S = TaskStatus
PA = TaskType.PLAN_AND_APPLY


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    client.close()


def variant(rt: Runtime, **changes: object) -> Runtime:
    """Another runtime on the same database and publisher, other settings."""
    return Runtime(
        settings=rt.settings.model_copy(update=changes), publisher=rt.publisher, actor="test2"
    )


# ---------------------------------------------------------------- plan+apply FIFO


def test_dispatch_claims_the_oldest_pending_plan_and_apply(rt: Runtime, ws: str) -> None:
    ids = [tasks.submit(rt, ws, PA).id for _ in range(3)]
    recorder(rt).sent.clear()

    d = dispatcher.dispatch(rt, ws)

    assert (d.action, d.task_id, d.fence, d.claimed) == ("claimed_plan", ids[0], 1, True)
    assert status(rt, ids[0]) is S.PLANNING
    assert fence(rt, ids[0]) == 1
    assert [status(rt, i) for i in ids[1:]] == [S.PENDING, S.PENDING]
    assert handoffs(rt) == [
        Handoff(
            task_id=ids[0],
            workspace=ws,
            phase=Phase.PLAN,
            fence=1,
            speculative=False,
            mode=ExecutionMode.LOCAL,
            source_dir=workspaces.get(rt, ws).source_dir,
            timeout=rt.settings.plan_timeout,
        )
    ]
    # Only the id and the fence travel; the worker reads the rest.
    assert executes(rt) == [(ids[0], 1)]
    # A claimed phase starts with no executor yet.
    assert tasks.get(rt, ids[0]).executor_handle is None


def test_second_dispatch_while_one_is_active_skips(rt: Runtime, ws: str) -> None:
    ids = [tasks.submit(rt, ws, PA).id for _ in range(2)]
    assert dispatcher.dispatch(rt, ws).task_id == ids[0]
    n = len(handoffs(rt))
    before = snapshot(rt)

    d = dispatcher.dispatch(rt, ws)

    assert d.action == "skipped" and not d.claimed
    assert "busy" in d.reason and str(ids[0]) in d.reason
    assert snapshot(rt) == before
    assert len(handoffs(rt)) == n
    # Busy through apply_pending too: the workspace is held until confirm/discard.
    run_phase(rt, ids[0], PLAN_WITH_CHANGES)
    assert status(rt, ids[0]) is S.APPLY_PENDING
    assert dispatcher.dispatch(rt, ws).action == "skipped"
    assert status(rt, ids[1]) is S.PENDING


def test_fifo_skips_cancelled_and_follows_queue_order(rt: Runtime, ws: str) -> None:
    ids = [tasks.submit(rt, ws, PA).id for _ in range(3)]
    tasks.cancel(rt, ids[0])
    assert dispatcher.dispatch(rt, ws).task_id == ids[1]
    run_phase(rt, ids[1], PLAN_NO_CHANGES)
    assert status(rt, ids[1]) is S.SUCCESS
    assert dispatcher.dispatch(rt, ws).task_id == ids[2]
    run_phase(rt, ids[2], PLAN_FAILED)
    d = dispatcher.dispatch(rt, ws)
    assert (d.action, d.reason) == ("skipped", "queue empty")


def test_dispatch_of_unknown_workspace_does_nothing(rt: Runtime) -> None:
    d = dispatcher.dispatch(rt, "nope")
    assert (d.action, d.reason) == ("skipped", "no such workspace")


def test_plans_never_go_through_dispatch_in_new_mode(rt: Runtime, ws: str) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    d = dispatcher.dispatch(rt, ws)
    assert (d.action, d.reason) == ("skipped", "queue empty")
    assert status(rt, plan.id) is S.PENDING


def test_dispatch_with_lock_held_elsewhere_is_lock_busy(rt: Runtime, ws: str, redis: Redis) -> None:
    """A dispatcher never waits for the lock: it marks the workspace dirty
    for the holder (who looks again after releasing) and leaves at once."""
    t = tasks.submit(rt, ws, PA)
    other = redis.lock(lock_key(ws), timeout=60)
    assert other.acquire(blocking=False)
    try:
        began = time.monotonic()
        d = dispatcher.dispatch(rt, ws)
        assert time.monotonic() - began < 1.0, "dispatch waited for the lock"
        assert (d.action, d.claimed) == ("lock_busy", False)
        assert status(rt, t.id) is S.PENDING
        assert handoffs(rt) == []
        # Our lock is untouched: the dispatcher did not steal or release it...
        assert other.owned()
        # ...and its wake-up is left for us, the holder.
        assert redis.exists(dirty_key(ws))
        ttl = redis.pttl(dirty_key(ws))
        assert 0 < ttl <= 2 * rt.settings.lock_ttl * 1000, "the mark expires"
    finally:
        other.release()
    # Lock free again: the same call claims, and answers the mark.
    assert dispatcher.dispatch(rt, ws).task_id == t.id
    assert not redis.exists(lock_key(ws)), "dispatch releases the lock when done"
    assert not redis.exists(dirty_key(ws))


# ---------------------------------------------------------------- plans: no lock


def test_claim_plan_takes_no_lock(rt: Runtime, ws: str, redis: Redis) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    other = redis.lock(lock_key(ws), timeout=60)
    assert other.acquire(blocking=False)
    try:
        d = dispatcher.claim_plan(rt, plan.id)
        assert (d.action, d.task_id, d.fence) == ("claimed_plan", plan.id, 1)
        assert other.owned()
    finally:
        other.release()
    assert status(rt, plan.id) is S.PLANNING
    h = last_handoff(rt, plan.id)
    assert (h.phase, h.fence, h.speculative) == (Phase.PLAN, 1, True)


def test_claim_plan_needs_no_redis_at_all(rt: Runtime, ws: str, redis: Redis) -> None:
    """With Redis unreachable, claim_plan still claims: it never touches it."""
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    no_redis = variant(rt, redis_url="redis://127.0.0.1:1/0")
    try:
        assert dispatcher.claim_plan(no_redis, plan.id).action == "claimed_plan"
    finally:
        no_redis.close()
    assert status(rt, plan.id) is S.PLANNING
    assert redis.keys("runq:lock:*") == []


def test_claim_plan_beside_a_running_plan_and_apply(rt: Runtime, ws: str) -> None:
    pa = tasks.submit(rt, ws, PA)
    assert dispatcher.dispatch(rt, ws).claimed
    run_phase(rt, pa.id, PLAN_WITH_CHANGES)
    tasks.confirm(rt, pa.id)
    assert dispatcher.dispatch(rt, ws).action == "claimed_apply"
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    assert dispatcher.claim_plan(rt, plan.id).claimed
    assert (status(rt, pa.id), status(rt, plan.id)) == (S.APPLYING, S.PLANNING)


def test_duplicate_claim_plan_does_nothing(rt: Runtime, ws: str) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    assert dispatcher.claim_plan(rt, plan.id).claimed
    before = snapshot(rt)
    n = len(handoffs(rt))
    again = dispatcher.claim_plan(rt, plan.id)
    assert again.action == "skipped" and "already planning" in again.reason
    assert snapshot(rt) == before
    assert len(handoffs(rt)) == n
    assert chain(rt, plan.id) == [(None, "pending"), ("pending", "planning")]


def test_claim_plan_refuses_unknown_and_plan_and_apply(rt: Runtime, ws: str) -> None:
    pa = tasks.submit(rt, ws, PA)
    assert dispatcher.claim_plan(rt, 987654).action == "skipped"
    d = dispatcher.claim_plan(rt, pa.id)
    assert (d.action, d.reason) == ("skipped", "not a plan task")
    assert status(rt, pa.id) is S.PENDING


# ---------------------------------------------------------------- manual lock


def test_manual_lock_holds_plan_and_apply_but_not_plans(rt: Runtime, ws: str) -> None:
    workspaces.lock(rt, ws, holder="alice", reason="maintenance")
    pa = tasks.submit(rt, ws, PA)
    plan = tasks.submit(rt, ws, TaskType.PLAN)

    d = dispatcher.dispatch(rt, ws)
    assert d.action == "skipped" and "locked by alice" in d.reason
    assert status(rt, pa.id) is S.PENDING
    assert dispatcher.claim_plan(rt, plan.id).claimed
    assert status(rt, plan.id) is S.PLANNING

    recorder(rt).sent.clear()
    view = workspaces.unlock(rt, ws)
    assert not view.locked
    assert dispatches(rt) == [ws]
    assert dispatcher.dispatch(rt, ws).task_id == pa.id


def test_manual_lock_holds_a_confirmed_apply(rt: Runtime, ws: str) -> None:
    pa = tasks.submit(rt, ws, PA)
    dispatcher.dispatch(rt, ws)
    run_phase(rt, pa.id, PLAN_WITH_CHANGES)
    workspaces.lock(rt, ws, holder="bob")
    tasks.confirm(rt, pa.id)
    d = dispatcher.dispatch(rt, ws)
    assert d.action == "skipped" and "held by lock of bob" in d.reason
    assert status(rt, pa.id) is S.APPLY_QUEUED
    workspaces.unlock(rt, ws)
    assert dispatcher.dispatch(rt, ws).action == "claimed_apply"


# ---------------------------------------------------------------- applies


def test_confirm_then_dispatch_claims_the_apply_with_a_new_fence(
    rt: Runtime, ws: str, caplog: pytest.LogCaptureFixture
) -> None:
    pa = tasks.submit(rt, ws, PA)
    dispatcher.dispatch(rt, ws)
    plan_handoff = run_phase(rt, pa.id, PLAN_WITH_CHANGES)
    view = tasks.get(rt, pa.id)
    assert (view.status, view.add, view.change, view.destroy, view.has_changes) == (
        S.APPLY_PENDING,
        2,
        1,
        0,
        True,
    )

    recorder(rt).sent.clear()
    assert tasks.confirm(rt, pa.id).status is S.APPLY_QUEUED
    assert dispatches(rt) == [ws], "confirm wakes the dispatcher"

    d = dispatcher.dispatch(rt, ws)
    assert (d.action, d.task_id, d.fence) == ("claimed_apply", pa.id, 2)
    assert status(rt, pa.id) is S.APPLYING
    apply_handoff = last_handoff(rt, pa.id)
    assert (apply_handoff.phase, apply_handoff.fence) == (Phase.APPLY, 2)

    # The plan executor's token is dead: its reports change nothing.
    before = snapshot(rt)
    caplog.set_level(logging.WARNING, logger="scheduler.reports")
    assert not start(rt, plan_handoff)
    assert not finish(rt, plan_handoff, PLAN_FAILED)
    assert not finish(rt, apply_handoff, PLAN_FAILED, fence=plan_handoff.fence)
    assert snapshot(rt) == before
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 3

    run_phase(rt, pa.id, APPLY_OK)
    view = tasks.get(rt, pa.id)
    assert view.status is S.APPLIED and view.finished_at is not None
    # The plan summary survives the apply.
    assert (view.add, view.change, view.destroy) == (2, 1, 0)
    assert chain(rt, pa.id) == [
        (None, "pending"),
        ("pending", "planning"),
        ("planning", "apply_pending"),
        ("apply_pending", "apply_queued"),
        ("apply_queued", "applying"),
        ("applying", "applied"),
    ]


def test_auto_apply_goes_from_planning_to_apply_queued(rt: Runtime, src: Path) -> None:
    make_workspace(rt, "auto", src, auto_apply=True)
    pa = tasks.submit(rt, "auto", PA)
    dispatcher.dispatch(rt, "auto")
    h = last_handoff(rt, pa.id)
    recorder(rt).sent.clear()
    run_phase(rt, h, PLAN_WITH_CHANGES)
    assert status(rt, pa.id) is S.APPLY_QUEUED
    assert chain(rt, pa.id)[-1] == ("planning", "apply_queued")
    assert dispatches(rt) == ["auto"]
    assert dispatcher.dispatch(rt, "auto").action == "claimed_apply"
    run_phase(rt, pa.id, APPLY_OK)
    assert status(rt, pa.id) is S.APPLIED


def test_auto_apply_plan_without_changes_is_success(rt: Runtime, src: Path) -> None:
    make_workspace(rt, "auto", src, auto_apply=True)
    pa = tasks.submit(rt, "auto", PA)
    dispatcher.dispatch(rt, "auto")
    run_phase(rt, pa.id, PLAN_NO_CHANGES)
    view = tasks.get(rt, pa.id)
    assert (view.status, view.has_changes, view.add) == (S.SUCCESS, False, 0)


# ---------------------------------------------------------------- wake-ups


def _through_plan(rt: Runtime, ws: str, result: object = PLAN_WITH_CHANGES) -> int:
    t = tasks.submit(rt, ws, PA)
    assert dispatcher.dispatch(rt, ws).task_id == t.id
    run_phase(rt, t.id, result)  # type: ignore[arg-type]
    return t.id


Setup = Callable[[Runtime, str], tuple[int, Handoff | None]]
End = Callable[[Runtime, int, Handoff | None], object]


def _plan_claimed(rt: Runtime, ws: str) -> tuple[int, Handoff | None]:
    t = tasks.submit(rt, ws, PA).id
    dispatcher.dispatch(rt, ws)
    return t, last_handoff(rt, t)


def _planned(rt: Runtime, ws: str) -> tuple[int, Handoff | None]:
    return _through_plan(rt, ws), None


def _apply_claimed(rt: Runtime, ws: str) -> tuple[int, Handoff | None]:
    t = _through_plan(rt, ws)
    tasks.confirm(rt, t)
    dispatcher.dispatch(rt, ws)
    return t, last_handoff(rt, t)


def _report(result: PhaseResult) -> End:
    def end(rt: Runtime, _t: int, h: Handoff | None) -> None:
        assert h is not None
        run_phase(rt, h, result)

    return end


#: How each way a plan+apply can end is reached, and the status it ends in.
ENDINGS: dict[str, tuple[Setup, End, TaskStatus]] = {
    "plan_failed": (_plan_claimed, _report(PLAN_FAILED), S.FAILED),
    "success": (_plan_claimed, _report(PLAN_NO_CHANGES), S.SUCCESS),
    "discarded": (_planned, lambda rt, t, _h: tasks.discard(rt, t, reason="no"), S.DISCARDED),
    "cancelled": (_planned, lambda rt, t, _h: tasks.cancel(rt, t), S.CANCELLED),
    "applied": (_apply_claimed, _report(APPLY_OK), S.APPLIED),
    "apply_failed": (_apply_claimed, _report(PLAN_FAILED), S.FAILED),
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_plan_and_apply_end_wakes_the_dispatcher(rt: Runtime, ws: str, ending: str) -> None:
    setup, end, expected = ENDINGS[ending]
    t, handoff = setup(rt, ws)
    recorder(rt).sent.clear()
    end(rt, t, handoff)
    assert status(rt, t) is expected
    assert dispatches(rt) == [ws]


def test_cancelling_a_pending_plan_and_apply_wakes_the_dispatcher(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, PA)
    recorder(rt).sent.clear()
    tasks.cancel(rt, t.id)
    assert dispatches(rt) == [ws]


@pytest.mark.parametrize("ending", ["success", "failed", "cancelled"])
def test_plan_end_does_not_wake_the_dispatcher_in_new_mode(
    rt: Runtime, ws: str, ending: str
) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    if ending == "cancelled":
        recorder(rt).sent.clear()
        tasks.cancel(rt, plan.id)
    else:
        dispatcher.claim_plan(rt, plan.id)
        h = last_handoff(rt, plan.id)
        recorder(rt).sent.clear()
        run_phase(rt, h, PLAN_WITH_CHANGES if ending == "success" else PLAN_FAILED)
    assert status(rt, plan.id) == ending
    assert recorder(rt).sent == []


def test_plan_with_changes_is_success_not_apply_pending(rt: Runtime, ws: str) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    dispatcher.claim_plan(rt, plan.id)
    run_phase(rt, plan.id, PLAN_WITH_CHANGES)
    view = tasks.get(rt, plan.id)
    assert (view.status, view.has_changes, view.add, view.change) == (S.SUCCESS, True, 2, 1)


# ---------------------------------------------------------------- legacy mode


def test_legacy_mode_serializes_plans_behind_plan_and_apply(legacy_rt: Runtime, src: Path) -> None:
    rt = legacy_rt
    make_workspace(rt, "net", src)
    pa = tasks.submit(rt, "net", PA)
    plan = tasks.submit(rt, "net", TaskType.PLAN)
    assert dispatcher.dispatch(rt, "net").task_id == pa.id
    assert dispatcher.dispatch(rt, "net").action == "skipped"
    assert status(rt, plan.id) is S.PENDING
    run_phase(rt, pa.id, PLAN_NO_CHANGES)
    assert dispatcher.dispatch(rt, "net").task_id == plan.id
    # A running plan holds the workspace in legacy mode, and its end wakes it.
    pa2 = tasks.submit(rt, "net", PA)
    assert dispatcher.dispatch(rt, "net").action == "skipped"
    h = last_handoff(rt, plan.id)
    recorder(rt).sent.clear()
    run_phase(rt, h, PLAN_NO_CHANGES)
    assert dispatches(rt) == ["net"]
    assert dispatcher.dispatch(rt, "net").task_id == pa2.id


def test_legacy_mode_manual_lock_lets_plans_through(legacy_rt: Runtime, src: Path) -> None:
    rt = legacy_rt
    make_workspace(rt, "net", src)
    workspaces.lock(rt, "net", holder="carol")
    pa = tasks.submit(rt, "net", PA)
    plan = tasks.submit(rt, "net", TaskType.PLAN)
    assert dispatcher.dispatch(rt, "net").task_id == plan.id
    assert status(rt, pa.id) is S.PENDING


# ---------------------------------------------------------------- failed hand-off
# A failed hand-off is not fatal (issue 5): the claim stays, unstarted, under
# its fence, and the reconciler re-sends it with backoff; only after
# RUNQ_HANDOFF_ATTEMPTS sends does the task fail (tests/integration/
# test_handoff_retry.py covers the backoff and the limit).


def _unstarted_claim(rt: Runtime, task_id: int, status_: TaskStatus, fence_: int) -> None:
    view = tasks.get(rt, task_id)
    assert (view.status, view.fence, view.executor_handle, view.error) == (
        status_,
        fence_,
        None,
        None,
    )
    assert (view.handoff_attempts, view.lease_expires_at) == (1, None)


def test_failed_handoff_keeps_the_claim_and_the_reconciler_resends_it(
    rt: Runtime, ws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tasks.submit(rt, ws, PA)
    second = tasks.submit(rt, ws, PA)
    broken = FakeLauncher(fail_with=ConnectionError("broker unreachable"))
    monkeypatch.setattr(dispatcher, "launcher_for", lambda rt, mode: broken)
    recorder(rt).sent.clear()

    d = dispatcher.dispatch(rt, ws)

    assert (d.action, d.task_id, d.fence) == ("claimed_plan", first.id, 1)
    _unstarted_claim(rt, first.id, S.PLANNING, 1)
    assert chain(rt, first.id)[-1] == ("pending", "planning")
    # The claim still holds the workspace: nothing is woken, nothing overtakes.
    assert dispatches(rt) == []
    assert dispatcher.dispatch(rt, ws).action == "skipped"
    assert status(rt, second.id) is S.PENDING

    # Not yet due: the reconciler leaves it alone.
    working = FakeLauncher()
    monkeypatch.setattr(dispatcher, "launcher_for", lambda rt, mode: working)
    assert reconciler.sweep(rt).resent == []
    assert working.launched == []
    # Due: re-sent under the same fence, to the same executor mode.
    set_task(rt, first.id, handoff_at=ago(rt.settings.resend_after + 1))
    assert reconciler.sweep(rt).resent == [first.id]
    [h] = working.launched
    assert (h.task_id, h.phase, h.fence, h.speculative) == (first.id, Phase.PLAN, 1, False)
    view = tasks.get(rt, first.id)
    assert (view.status, view.fence, view.handoff_attempts) == (S.PLANNING, 1, 2)
    assert status(rt, second.id) is S.PENDING

    # The re-sent hand-off runs; the plan's end frees the workspace.
    run_phase(rt, h, PLAN_NO_CHANGES)
    assert status(rt, first.id) is S.SUCCESS
    assert dispatcher.dispatch(rt, ws).task_id == second.id
    assert [x.task_id for x in working.launched] == [first.id, second.id]


def test_failed_handoff_of_a_plan_keeps_the_claim(
    rt: Runtime, ws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    broken = FakeLauncher(fail_with=RuntimeError("no route"))
    monkeypatch.setattr(dispatcher, "launcher_for", lambda rt, mode: broken)
    d = dispatcher.claim_plan(rt, plan.id)
    assert (d.action, d.fence) == ("claimed_plan", 1)
    _unstarted_claim(rt, plan.id, S.PLANNING, 1)
    # A duplicate claim message does not claim it again.
    assert dispatcher.claim_plan(rt, plan.id).action == "skipped"
    assert fence(rt, plan.id) == 1

    working = FakeLauncher()
    monkeypatch.setattr(dispatcher, "launcher_for", lambda rt, mode: working)
    set_task(rt, plan.id, handoff_at=ago(rt.settings.resend_after + 1))
    assert reconciler.sweep(rt).resent == [plan.id]
    [h] = working.launched
    assert (h.task_id, h.phase, h.fence, h.speculative) == (plan.id, Phase.PLAN, 1, True)


def test_an_agent_handoff_waits_while_its_pool_has_no_live_agent(rt: Runtime, src: Path) -> None:
    """The bundle goes to the pool's queue; with no live agent to take it,
    the reconciler neither re-sends it (it would only queue again) nor
    counts it towards RUNQ_HANDOFF_ATTEMPTS: the task waits, as on TFC."""
    pools.create(rt, "pool-1")
    workspaces.create(rt, "remote", mode="agent", agent_pool="pool-1", source_dir=str(src))
    task_id = tasks.submit(rt, "remote", PA).id

    d = dispatcher.dispatch(rt, "remote")

    assert d.task_id == task_id
    _unstarted_claim(rt, task_id, S.PLANNING, 1)
    [sent] = [m for m in recorder(rt).sent if m.queue == remote.pool_queue("pool-1")]
    assert sent.task == remote.TASK_AGENT_RUN
    for _ in range(rt.settings.handoff_attempts + 1):
        set_task(rt, task_id, handoff_at=ago(3601))
        out = reconciler.sweep(rt)
        assert (out.resent, out.handoff_failed, out.waiting_for_agents) == ([], [], [task_id])
    _unstarted_claim(rt, task_id, S.PLANNING, 1)
    assert handoffs(rt) == []  # nothing went to the local runs queue


def test_hand_off_after_the_task_moved_on_changes_nothing(rt: Runtime, ws: str) -> None:
    """A failed hand-off with a superseded fence must not fail the task."""
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    dispatcher.claim_plan(rt, plan.id)
    run_phase(rt, plan.id, PLAN_NO_CHANGES)
    before = snapshot(rt)
    stale = Handoff(plan.id, ws, Phase.PLAN, 0, True, ExecutionMode.AGENT)
    dispatcher.hand_off(rt, stale)
    assert snapshot(rt) == before


# ---------------------------------------------------------------- moved under our feet


def _move_before_transition_reads(rt: Runtime, task_id: int, to: TaskStatus) -> list[int]:
    """Arrange for ``task_id`` to be moved to ``to`` (as by another actor)
    after the dispatcher read it, just before its claim's conditional UPDATE."""
    return interfere_before_claim(rt, task_id, f"status = '{to}', fence = fence + 1")


def test_claim_plan_of_a_task_claimed_meanwhile_is_a_lost_race(rt: Runtime, ws: str) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    fired = _move_before_transition_reads(rt, plan.id, S.PLANNING)
    d = dispatcher.claim_plan(rt, plan.id)
    assert fired == [plan.id]
    assert (d.action, d.claimed) == ("skipped", False)
    assert "lost race" in d.reason
    assert handoffs(rt) == []
    assert chain(rt, plan.id) == [(None, "pending")], "the loser wrote no event"


def test_dispatch_of_a_head_cancelled_meanwhile_is_a_lost_race(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, PA)
    fired = _move_before_transition_reads(rt, t.id, S.CANCELLED)
    d = dispatcher.dispatch(rt, ws)
    assert fired == [t.id]
    assert (d.action, d.claimed) == ("skipped", False)
    assert "lost race" in d.reason
    assert handoffs(rt) == []
    # The whole decision rolled back, the interloper's write with it.
    assert status(rt, t.id) is S.PENDING


# ---------------------------------------------------------------- mode switches, start times


def test_claim_plan_in_legacy_mode_waits_its_turn_via_the_dispatcher(rt: Runtime, ws: str) -> None:
    """A claim message sent before a switch to legacy must not jump the queue:
    with a plan+apply active, the plan stays pending."""
    first = tasks.submit(rt, ws, PA)
    assert dispatcher.dispatch(rt, ws).task_id == first.id
    plan = tasks.submit(rt, ws, TaskType.PLAN)

    legacy = variant(rt, dispatch_mode=DispatchMode.LEGACY)
    decision = dispatcher.claim_plan(legacy, plan.id)

    assert decision.action == "skipped"
    assert decision.reason.startswith("busy")
    assert status(rt, plan.id) is S.PENDING


def test_a_task_cancelled_while_pending_never_started(rt: Runtime, ws: str) -> None:
    task = tasks.submit(rt, ws, PA)
    cancelled = tasks.cancel(rt, task.id)
    assert cancelled.status is S.CANCELLED
    assert cancelled.started_at is None
    assert cancelled.finished_at is not None
