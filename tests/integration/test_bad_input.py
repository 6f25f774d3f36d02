"""Bad requests: each a clear error of the right class, and nothing changed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from scheduler import dispatcher, tasks, workspaces
from scheduler.api import Client, WaitTimeout, wait
from scheduler.errors import (
    IllegalTransition,
    InvalidInput,
    SchedulerError,
    TaskNotFound,
    WorkspaceExists,
    WorkspaceNotFound,
)
from scheduler.runtime import Runtime
from scheduler.states import TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_NO_CHANGES,
    counts,
    last_handoff,
    recorder,
    run_phase,
    snapshot,
    start,
)


def unchanged(rt: Runtime, action: Callable[[], object], error: type[SchedulerError]) -> str:
    """Run ``action``, expect ``error``, and check that it wrote and sent nothing."""
    before = (counts(rt), snapshot(rt), workspaces.list_all(rt), len(recorder(rt).sent))
    with pytest.raises(error) as info:
        action()
    after = (counts(rt), snapshot(rt), workspaces.list_all(rt), len(recorder(rt).sent))
    assert after == before
    return str(info.value)


def test_submit_to_unknown_workspace(rt: Runtime, ws: str) -> None:
    msg = unchanged(rt, lambda: tasks.submit(rt, "nope", "plan"), WorkspaceNotFound)
    assert "'nope'" in msg


@pytest.mark.parametrize("bad", ["apply", "", "PLAN", "plan-and-apply"])
def test_submit_unknown_type(rt: Runtime, ws: str, bad: str) -> None:
    msg = unchanged(rt, lambda: tasks.submit(rt, ws, bad), InvalidInput)
    assert repr(bad) in msg and "plan_and_apply" in msg


def test_confirm_or_discard_a_plan_task(rt: Runtime, ws: str) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    dispatcher.claim_plan(rt, plan.id)
    run_phase(rt, plan.id, PLAN_NO_CHANGES)
    msg = unchanged(rt, lambda: tasks.confirm(rt, plan.id), IllegalTransition)
    assert "plan task" in msg
    unchanged(rt, lambda: tasks.discard(rt, plan.id), IllegalTransition)
    # Also while it is pending.
    pending = tasks.submit(rt, ws, TaskType.PLAN)
    unchanged(rt, lambda: tasks.confirm(rt, pending.id), IllegalTransition)


def test_confirm_a_plan_and_apply_that_is_not_waiting(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    msg = unchanged(rt, lambda: tasks.confirm(rt, t.id), IllegalTransition)
    assert "pending" in msg and "apply_pending" in msg


def test_cancel_a_finished_task(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    dispatcher.dispatch(rt, ws)
    run_phase(rt, t.id, PLAN_NO_CHANGES)
    assert tasks.get(rt, t.id).status is TaskStatus.SUCCESS
    msg = unchanged(rt, lambda: tasks.cancel(rt, t.id), IllegalTransition)
    assert "success" in msg
    cancelled = tasks.submit(rt, ws, TaskType.PLAN)
    tasks.cancel(rt, cancelled.id)
    unchanged(rt, lambda: tasks.cancel(rt, cancelled.id), IllegalTransition)


def test_cancel_a_running_task_is_a_request_not_a_refusal(rt: Runtime, ws: str) -> None:
    """Since issue 5 a running phase can be cancelled: not refused, and not
    ended here either. The request is recorded for its executor, which hears
    of it in a heartbeat reply (tests/integration/test_cancel.py); until then
    no status, event or message changes."""
    t = tasks.submit(rt, ws, TaskType.PLAN_AND_APPLY)
    dispatcher.dispatch(rt, ws)
    assert start(rt, last_handoff(rt, t.id))
    before = (counts(rt), snapshot(rt), len(recorder(rt).sent))
    view = tasks.cancel(rt, t.id)
    assert (counts(rt), snapshot(rt), len(recorder(rt).sent)) == before
    assert (view.status, view.cancel_requested_by, view.cancel_force) == (
        TaskStatus.PLANNING,
        "test",
        False,
    )
    assert view.cancel_requested_at is not None


@pytest.mark.parametrize("verb", ["get", "confirm", "discard", "cancel"])
def test_missing_task_id(rt: Runtime, ws: str, verb: str) -> None:
    fn = getattr(tasks, verb)
    msg = unchanged(rt, lambda: fn(rt, 999999), TaskNotFound)
    assert "999999" in msg


def test_wait_for_a_missing_task_fails_at_once(rt: Runtime, ws: str) -> None:
    with pytest.raises(TaskNotFound):
        wait(rt, [999999], timeout=30)


def test_wait_times_out_on_a_pending_task(rt: Runtime, ws: str) -> None:
    t = tasks.submit(rt, ws, TaskType.PLAN)
    with pytest.raises(WaitTimeout, match=f"{t.id} \\(pending\\)"):
        wait(rt, [t.id], timeout=0.05, poll=0.01)


def test_duplicate_workspace(rt: Runtime, ws: str, src: Path) -> None:
    msg = unchanged(rt, lambda: workspaces.create(rt, ws, source_dir=str(src)), WorkspaceExists)
    assert "exists" in msg


@pytest.mark.parametrize(
    "name", ["", "-leading-dash", "has space", "slash/name", "x" * 201, "semi;colon", "ünï"]
)
def test_invalid_workspace_name(rt: Runtime, src: Path, name: str) -> None:
    msg = unchanged(rt, lambda: workspaces.create(rt, name, source_dir=str(src)), InvalidInput)
    assert "invalid workspace name" in msg


def test_local_workspace_needs_an_existing_dir(rt: Runtime, tmp_path: Path) -> None:
    msg = unchanged(rt, lambda: workspaces.create(rt, "net"), InvalidInput)
    assert "--dir" in msg
    msg = unchanged(
        rt, lambda: workspaces.create(rt, "net", source_dir=str(tmp_path / "missing")), InvalidInput
    )
    assert "not a directory" in msg


def test_unknown_mode_and_agent_without_pool(rt: Runtime, src: Path) -> None:
    d = str(src)
    unchanged(rt, lambda: workspaces.create(rt, "w", mode="ssh", source_dir=d), InvalidInput)
    msg = unchanged(
        rt, lambda: workspaces.create(rt, "w", mode="agent", source_dir=d), InvalidInput
    )
    assert "--agent-pool" in msg
    # Every mode needs the directory: it is snapshotted at submit.
    msg = unchanged(
        rt, lambda: workspaces.create(rt, "w", mode="agent", agent_pool="p"), InvalidInput
    )
    assert "--dir" in msg


def test_lock_and_unlock_misuse(rt: Runtime, ws: str) -> None:
    unchanged(rt, lambda: workspaces.unlock(rt, ws), InvalidInput)
    workspaces.lock(rt, ws, holder="alice", reason="upgrade")
    msg = unchanged(rt, lambda: workspaces.lock(rt, ws, holder="bob"), InvalidInput)
    assert "alice" in msg and "upgrade" in msg
    unchanged(rt, lambda: workspaces.lock(rt, "nope", holder="bob"), WorkspaceNotFound)
    unchanged(rt, lambda: workspaces.unlock(rt, "nope"), WorkspaceNotFound)


def test_list_with_bad_filters(rt: Runtime, ws: str) -> None:
    with pytest.raises(WorkspaceNotFound):
        tasks.list_tasks(rt, workspace="nope")
    with pytest.raises(InvalidInput, match="'bogus'"):
        tasks.parse_status("bogus")


def test_client_reports_the_same_errors(rt: Runtime, ws: str) -> None:
    client = Client(rt)
    unchanged(rt, lambda: client.submit("nope", "plan"), WorkspaceNotFound)
    unchanged(rt, lambda: client.submit(ws, "deploy"), InvalidInput)
    unchanged(rt, lambda: client.confirm(424242), TaskNotFound)


def test_get_many_keeps_the_callers_order_and_names_a_missing_id(rt: Runtime, ws: str) -> None:
    a, b = tasks.submit(rt, ws, "plan"), tasks.submit(rt, ws, "plan")
    assert [v.id for v in tasks.get_many(rt, [b.id, a.id, b.id])] == [b.id, a.id, b.id]
    with pytest.raises(TaskNotFound, match="task 424242 does not exist"):
        tasks.get_many(rt, [a.id, 424242])
