"""transition(): the one compare-and-set that changes a task's status."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from scheduler import tasks
from scheduler.errors import ConcurrentChange, IllegalTransition, StaleFence, TaskNotFound
from scheduler.models import Task, TaskEvent
from scheduler.runtime import Runtime
from scheduler.states import ACTIVE_APPLY, TaskStatus, TaskType
from scheduler.transitions import transition
from tests.integration.helpers import chain, counts, fence, interfere_before_claim, snapshot, status

S = TaskStatus


def test_claim_moves_status_bumps_fence_and_writes_one_event(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    assert t.started_at is None
    with rt.transaction() as s:
        done = transition(s, t.id, S.PLANNING, actor="tester", reason="claim")
    assert (done.from_status, done.to_status, done.fence) == (S.PENDING, S.PLANNING, 1)
    assert done.workspace == ws and done.type is TaskType.PLAN_AND_APPLY

    view = tasks.get(rt, t.id)
    assert view.status is S.PLANNING
    assert view.fence == 1
    assert view.started_at is not None and view.finished_at is None
    evs = tasks.events(rt, [t.id])
    assert [(e.from_status, e.to_status) for e in evs] == [
        (None, S.PENDING),
        (S.PENDING, S.PLANNING),
    ]
    assert (evs[1].actor, evs[1].reason, evs[1].fence) == ("tester", "claim", 1)

    # A terminal move stamps finished_at; only a claim changes the token.
    with rt.transaction() as s:
        transition(s, t.id, S.FAILED, actor="tester", fence=1, values={"error": "it broke"})
    view = tasks.get(rt, t.id)
    assert (view.status, view.fence, view.error) == (S.FAILED, 1, "it broke")
    assert view.finished_at is not None
    assert view.started_at is not None and view.finished_at >= view.started_at
    assert chain(rt, t.id)[-1] == ("planning", "failed")


def test_event_row_is_in_the_same_transaction(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, TaskType.PLAN)
    before = counts(rt)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), rt.transaction() as s:
        transition(s, t.id, S.PLANNING, actor="tester")
        # Inside the transaction both the change and its event are visible...
        assert s.scalar(select(Task.status).where(Task.id == t.id)) == S.PLANNING
        n = s.scalar(select(func.count()).select_from(TaskEvent).where(TaskEvent.task_id == t.id))
        assert n == 2
        raise Boom
    # ...and after the rollback neither is.
    assert status(rt, t.id) is S.PENDING
    assert fence(rt, t.id) == 0
    assert counts(rt) == before
    assert chain(rt, t.id) == [(None, "pending")]


def test_stale_fence_changes_nothing(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, TaskType.PLAN)
    with rt.transaction() as s:
        transition(s, t.id, S.PLANNING, actor="claimer")
    before, n = snapshot(rt), counts(rt)
    with pytest.raises(StaleFence), rt.transaction() as s:
        transition(s, t.id, S.SUCCESS, actor="old executor", fence=0)
    assert snapshot(rt) == before
    assert counts(rt) == n
    # The current fence is accepted.
    with rt.transaction() as s:
        transition(s, t.id, S.SUCCESS, actor="executor", fence=1)
    assert status(rt, t.id) is S.SUCCESS


@pytest.mark.parametrize(
    ("task_type", "to", "expect"),
    [
        (TaskType.PLAN, S.APPLY_PENDING, None),
        (TaskType.PLAN, S.SUCCESS, None),
        (TaskType.PLAN_AND_APPLY, S.APPLYING, None),
        (TaskType.PLAN_AND_APPLY, S.APPLIED, None),
        (TaskType.PLAN_AND_APPLY, S.PENDING, None),
        # legal from pending, but the caller expected another status
        (TaskType.PLAN_AND_APPLY, S.CANCELLED, {S.APPLY_PENDING}),
    ],
)
def test_illegal_move_changes_nothing(
    rt: Runtime, ws: str, task_type: TaskType, to: TaskStatus, expect: set[TaskStatus] | None
) -> None:
    t = tasks.submit(rt, ws, task_type)
    before, n = snapshot(rt), counts(rt)
    with pytest.raises(IllegalTransition), rt.transaction() as s:
        transition(s, t.id, to, actor="tester", expect=expect)
    assert snapshot(rt) == before
    assert counts(rt) == n


def test_terminal_task_never_moves(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    tasks.cancel(rt, t.id)
    before = snapshot(rt)
    for to in S:
        with pytest.raises(IllegalTransition), rt.transaction() as s:
            transition(s, t.id, to, actor="tester")
    assert snapshot(rt) == before


def test_unknown_task(rt: Runtime, ws: str) -> None:
    with pytest.raises(TaskNotFound), rt.transaction() as s:
        transition(s, 424242, S.PLANNING, actor="tester")


def test_compare_and_set_refuses_a_row_changed_after_it_was_read(rt: Runtime, ws: str) -> None:
    """Another actor moves the task between transition()'s read and its UPDATE:
    the conditional UPDATE matches no row, ConcurrentChange, no event written."""
    t = tasks.submit(rt, ws, TaskType.PLAN)
    with rt.sessions() as s:
        # Another claimer won in between: same status, new fence.
        interfered = interfere_before_claim(rt, t.id, "fence = fence + 7")
        with s.begin():
            with pytest.raises(ConcurrentChange) as info:
                transition(s, t.id, S.PLANNING, actor="slow claimer")
            assert not isinstance(info.value, StaleFence)
            assert interfered == [t.id]
            # The caller's transaction is still usable; only the interloper wrote.
            assert s.scalar(select(Task.fence).where(Task.id == t.id)) == 7
            assert s.scalar(select(Task.status).where(Task.id == t.id)) == S.PENDING
    assert status(rt, t.id) is S.PENDING
    assert chain(rt, t.id) == [(None, "pending")]


def _active_apply_count(s: Session, workspace_id: int) -> int:
    return (
        s.scalar(
            select(func.count())
            .select_from(Task)
            .where(
                Task.workspace_id == workspace_id,
                Task.type == TaskType.PLAN_AND_APPLY,
                Task.status.in_([str(x) for x in ACTIVE_APPLY]),
            )
        )
        or 0
    )


def test_partial_unique_index_refuses_a_second_active_plan_and_apply(rt: Runtime, ws: str) -> None:
    first = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    second = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    with rt.transaction() as s:
        transition(s, first.id, S.PLANNING, actor="a")
    with rt.transaction() as s:
        # Straight to planning, bypassing the dispatcher and its lock.
        with pytest.raises(ConcurrentChange):
            transition(s, second.id, S.PLANNING, actor="b")
        # The refusal rolled back only its savepoint: the transaction goes on.
        transition(s, plan.id, S.PLANNING, actor="b")
        ws_id = s.scalar(select(Task.workspace_id).where(Task.id == first.id))
        assert ws_id is not None
        assert _active_apply_count(s, ws_id) == 1
    assert status(rt, first.id) is S.PLANNING
    assert status(rt, second.id) is S.PENDING
    assert fence(rt, second.id) == 0
    assert chain(rt, second.id) == [(None, "pending")]
    assert status(rt, plan.id) is S.PLANNING  # plans are not in the index

    # Once the first ends, the second may go.
    with rt.transaction() as s:
        transition(s, first.id, S.FAILED, actor="a", fence=1)
    with rt.transaction() as s:
        transition(s, second.id, S.PLANNING, actor="b")
    assert status(rt, second.id) is S.PLANNING


def test_index_holds_through_every_active_status(rt: Runtime, ws: str) -> None:
    """apply_pending / apply_queued / applying hold the workspace just like planning."""
    first = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    second = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    path: list[tuple[TaskStatus, dict[str, Any]]] = [
        (S.PLANNING, {}),
        (S.APPLY_PENDING, {}),
        (S.APPLY_QUEUED, {}),
        (S.APPLYING, {}),
    ]
    for to, kw in path:
        with rt.transaction() as s:
            transition(s, first.id, to, actor="a", **kw)
        with pytest.raises(ConcurrentChange), rt.transaction() as s:
            transition(s, second.id, S.PLANNING, actor="b")
        assert status(rt, second.id) is S.PENDING
    with rt.transaction() as s:
        transition(s, first.id, S.APPLIED, actor="a")
    with rt.transaction() as s:
        transition(s, second.id, S.PLANNING, actor="b")
    assert chain(rt, first.id) == [
        (None, "pending"),
        ("pending", "planning"),
        ("planning", "apply_pending"),
        ("apply_pending", "apply_queued"),
        ("apply_queued", "applying"),
        ("applying", "applied"),
    ]
    assert fence(rt, first.id) == 2


def test_wakeup_of_a_transition_is_published_at_the_root_commit_only(rt: Runtime, ws: str) -> None:
    """transition() runs its UPDATE in a SAVEPOINT; releasing that must not
    publish anything: only the commit of the caller's transaction does."""
    from tests.integration.helpers import dispatches

    t = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    assert dispatches(rt) == [ws]
    with rt.transaction() as s:
        transition(s, t.id, S.CANCELLED, actor="tester")
        assert dispatches(rt) == [ws]
    assert dispatches(rt) == [ws, ws]
