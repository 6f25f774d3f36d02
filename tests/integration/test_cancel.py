"""Cancel: at once when nothing runs; through the heartbeat reply when an
executor runs the phase; forced past a silent executor."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from executors.base import Directive, PhaseResult, Reply, StateWritten, StopReason
from executors.fake import FakeRunner, bundle_of
from scheduler import artifacts, dispatcher, leases, messages, reconciler, reports, tasks
from scheduler.errors import IllegalTransition, TaskNotFound
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from scheduler.views import TaskView
from scheduler.workspaces import load as load_workspace
from tests.integration.helpers import (
    APPLY_OK,
    PLAN_NO_CHANGES,
    PLAN_WITH_CHANGES,
    applying,
    beat,
    begin,
    claimed,
    end,
    everything,
    executes,
    is_stale,
    lapse,
    recorder,
    task_events,
)

S = TaskStatus
PA = TaskType.PLAN_AND_APPLY
CANCELLED_BY_EXECUTOR = PhaseResult(ok=False, error="interrupted", stopped=StopReason.CANCEL)


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def in_thread(fn: Callable[[], TaskView]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def last_event(rt: Runtime, task_id: int) -> tuple[object, ...]:
    ev = task_events(rt, task_id)[-1]
    return (ev.from_status, ev.to_status, ev.actor, ev.reason)


# ---------------------------------------------------------------- nothing running


def _pending(rt: Runtime, ws: str) -> int:
    return tasks.submit(rt, ws, PA).id


def _apply_pending(rt: Runtime, ws: str) -> int:
    tid, f = claimed(rt, ws, PA)
    begin(rt, tid, f)
    end(rt, tid, f, PLAN_WITH_CHANGES)
    return tid


def _apply_queued(rt: Runtime, ws: str) -> int:
    tid = _apply_pending(rt, ws)
    tasks.confirm(rt, tid)
    return tid


def _planning_unstarted(rt: Runtime, ws: str) -> int:
    return claimed(rt, ws, PA)[0]


def _applying_unstarted(rt: Runtime, ws: str) -> int:
    return applying(rt, ws)[0]


@pytest.mark.parametrize(
    ("make", "seen"),
    [
        (_pending, S.PENDING),
        (_apply_pending, S.APPLY_PENDING),
        (_apply_queued, S.APPLY_QUEUED),
        (_planning_unstarted, S.PLANNING),
        (_applying_unstarted, S.APPLYING),
    ],
    ids=["pending", "apply_pending", "apply_queued", "planning", "applying"],
)
def test_cancel_ends_at_once_when_no_executor_runs_it(
    rt: Runtime, ws: str, make: Callable[[Runtime, str], int], seen: TaskStatus
) -> None:
    tid = make(rt, ws)
    nxt = tasks.submit(rt, ws, PA)
    fence = tasks.get(rt, tid).fence
    assert tasks.get(rt, tid).status is seen
    recorder(rt).sent.clear()

    view = tasks.cancel(rt, tid, actor="alice", reason="wrong branch")

    assert (view.status, view.fence) == (S.CANCELLED, fence)
    assert view.finished_at is not None and view.cancel_requested_at is None
    assert last_event(rt, tid) == (seen, S.CANCELLED, "alice", "wrong branch")
    assert task_events(rt, tid)[-1].fence == fence
    assert recorder(rt).sent == [messages.dispatch(ws)], "the workspace is woken"
    assert dispatcher.dispatch(rt, ws).task_id == nxt.id
    if seen in (S.PLANNING, S.APPLYING):
        # The hand-off still on its way finds nothing to run.
        phase = Phase.PLAN if seen is S.PLANNING else Phase.APPLY
        assert is_stale(begin(rt, tid, fence, phase))
    assert tasks.get(rt, tid).status is S.CANCELLED


def test_cancel_of_a_final_task_is_a_clear_error(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    begin(rt, tid, f)
    end(rt, tid, f, PLAN_NO_CHANGES)
    before = everything(rt)
    with pytest.raises(IllegalTransition, match=rf"cannot cancel task {tid}: it is success.*final"):
        tasks.cancel(rt, tid, actor="alice")
    with pytest.raises(IllegalTransition, match="final"):
        tasks.cancel(rt, tid, actor="alice", force=True)
    with pytest.raises(TaskNotFound, match="task 424242 does not exist"):
        tasks.cancel(rt, 424242)
    assert everything(rt) == before


# ---------------------------------------------------------------- a running executor


def test_cancel_of_a_started_phase_goes_through_the_heartbeat(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws, PA)
    begin(rt, tid, f)
    events = task_events(rt, tid)

    view = tasks.cancel(rt, tid, actor="alice")

    # Recorded, not yet done: the executor must stop terraform first.
    assert (view.status, view.fence, view.cancel_requested_by, view.cancel_force) == (
        S.PLANNING,
        f,
        "alice",
        False,
    )
    assert view.cancel_requested_at is not None
    assert task_events(rt, tid) == events
    assert beat(rt, tid, f) == Reply(
        True, Directive.INTERRUPT, "cancelled by alice", StopReason.CANCEL
    )
    # Still interrupting at every beat until the executor reports.
    assert beat(rt, tid, f).directive is Directive.INTERRUPT

    assert end(rt, tid, f, CANCELLED_BY_EXECUTOR).accepted

    view = tasks.get(rt, tid)
    assert (view.status, view.fence, view.error) == (S.CANCELLED, f, None)
    assert last_event(rt, tid) == (S.PLANNING, S.CANCELLED, "alice", "cancelled: plan stopped")
    assert is_stale(beat(rt, tid, f))


def test_a_cancelled_plan_ends_cancelled_even_if_terraform_finished_it(
    rt: Runtime, ws: str
) -> None:
    tid, f = claimed(rt, ws, PA)
    begin(rt, tid, f)
    tasks.cancel(rt, tid, actor="alice")
    assert end(rt, tid, f, PLAN_WITH_CHANGES).accepted
    assert tasks.get(rt, tid).status is S.CANCELLED


def test_a_runner_obeys_the_cancel(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    with rt.sessions() as s:
        handoff = leases.load_handoff(s, rt.settings, tid, f)
    runner = FakeRunner(duration=30, heartbeat=0.05)
    thread = threading.Thread(
        target=runner.run, args=(bundle_of(handoff), reports.DirectReporter(rt))
    )
    thread.start()
    until(lambda: tasks.get(rt, tid).executor_handle is not None, "the runner started")
    tasks.cancel(rt, tid, actor="alice")
    thread.join(10)
    assert not thread.is_alive(), "the runner did not stop on the cancel"
    assert tasks.get(rt, tid).status is S.CANCELLED
    assert last_event(rt, tid)[1:3] == (S.CANCELLED, "alice")
    assert runner.ran == [handoff]


def test_force_cancel_kills_through_the_heartbeat(
    rt: Runtime, ws: str, tune: Callable[..., Runtime]
) -> None:
    r = tune(heartbeat_interval=1.0)
    tid, f = claimed(r, ws, PA)
    begin(r, tid, f)
    thread, out = in_thread(lambda: tasks.cancel(r, tid, actor="alice", force=True))
    until(lambda: tasks.get(r, tid).cancel_force, "the forced cancel is recorded")

    reply = beat(r, tid, f)
    assert reply == Reply(True, Directive.KILL, "cancelled by alice", StopReason.CANCEL)
    assert end(r, tid, f, CANCELLED_BY_EXECUTOR).accepted
    thread.join(10)

    assert len(out) == 1 and isinstance(out[0], TaskView)
    assert (out[0].status, out[0].fence) == (S.CANCELLED, f)
    assert last_event(r, tid) == (
        S.PLANNING,
        S.CANCELLED,
        "alice",
        "cancelled (forced): plan stopped",
    )
    assert [e.to_status for e in task_events(r, tid)].count(S.CANCELLED) == 1


def test_force_cancel_ends_a_silent_executors_task_itself(
    rt: Runtime, ws: str, tune: Callable[..., Runtime]
) -> None:
    r = tune(heartbeat_interval=0.1)
    tid, f = applying(r, ws)
    nxt = tasks.submit(r, ws, PA)
    begin(r, tid, f, Phase.APPLY)
    recorder(r).sent.clear()

    t0 = time.monotonic()
    view = tasks.cancel(r, tid, actor="alice", force=True)
    took = time.monotonic() - t0

    assert 3 * 0.1 <= took < 5, took
    assert (view.status, view.fence) == (S.CANCELLED, f)
    assert last_event(r, tid) == (
        S.APPLYING,
        S.CANCELLED,
        "alice",
        "force-cancelled; the executor did not answer",
    )
    assert view.lease_expires_at is None
    # The executor, if it wakes, is told to stop and changes nothing.
    before = everything(r)
    assert is_stale(beat(r, tid, f, Phase.APPLY))
    assert is_stale(end(r, tid, f, APPLY_OK, Phase.APPLY))
    assert everything(r) == before
    assert messages.dispatch(ws) in recorder(r).sent
    assert dispatcher.dispatch(r, ws).task_id == nxt.id


def test_a_cancelled_apply_stores_the_state_it_wrote(rt: Runtime, ws: str) -> None:
    tid, f = applying(rt, ws)
    begin(rt, tid, f, Phase.APPLY)
    tasks.cancel(rt, tid, actor="alice")
    assert beat(rt, tid, f, Phase.APPLY).directive is Directive.INTERRUPT

    # Terraform saves its state on the interrupt, then the executor reports.
    content = b'{"version": 4, "serial": 3, "lineage": "L1", "resources": []}'
    assert reports.accept(rt, StateWritten(tid, f, 3, "L1", content)) == Reply.ok()
    assert end(rt, tid, f, CANCELLED_BY_EXECUTOR, Phase.APPLY).accepted

    view = tasks.get(rt, tid)
    assert view.status is S.CANCELLED
    assert last_event(rt, tid) == (S.APPLYING, S.CANCELLED, "alice", "cancelled: apply stopped")
    with rt.sessions() as s:
        stored = artifacts.latest(s, load_workspace(s, ws).id)
        assert stored is not None
        assert (stored.serial, stored.lineage, stored.task_id, stored.fence, stored.content) == (
            3,
            "L1",
            tid,
            f,
            content,
        )
    # Nothing more is written by that apply.
    late = StateWritten(tid, f, 4, "L1", b'{"serial": 4}')
    assert not reports.accept(rt, late).accepted


def test_an_apply_that_completed_before_the_interrupt_is_applied(rt: Runtime, ws: str) -> None:
    tid, f = applying(rt, ws)
    begin(rt, tid, f, Phase.APPLY)
    tasks.cancel(rt, tid, actor="alice")
    assert end(rt, tid, f, APPLY_OK, Phase.APPLY).accepted
    assert tasks.get(rt, tid).status is S.APPLIED


@pytest.mark.parametrize("phase", [Phase.PLAN, Phase.APPLY])
def test_a_lapsed_lease_of_a_cancelled_task_ends_it_cancelled(
    rt: Runtime, ws: str, phase: Phase
) -> None:
    if phase is Phase.PLAN:
        tid, f = claimed(rt, ws, PA)  # retries left: still not re-claimed
    else:
        tid, f = applying(rt, ws)
    begin(rt, tid, f, phase)
    tasks.cancel(rt, tid, actor="alice")
    lapse(rt, tid)
    recorder(rt).sent.clear()

    out = reconciler.sweep(rt)

    assert (out.reclaimed, out.lost) == ([], [tid])
    view = tasks.get(rt, tid)
    assert (view.status, view.fence) == (S.CANCELLED, f)
    seen, to, actor, reason = last_event(rt, tid)
    running = S.PLANNING if phase is Phase.PLAN else S.APPLYING
    assert (seen, to, actor) == (running, S.CANCELLED, "alice")
    assert str(reason).startswith("cancelled; executor lost: last heard from at")
    assert executes(rt) == []
    assert messages.dispatch(ws) in recorder(rt).sent


# PostgreSQL only: on SQLite the cancel's transaction holds the write lock
# from its first read, so no executor can start in between.
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_an_executor_starting_during_the_cancel_hears_of_it(
    rt: Runtime, ws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tid, f = applying(rt, ws)
    real_transition = tasks.transition
    started: list[Reply] = []

    def start_first(*args: Any, **kwargs: Any) -> Any:
        # cancel() has read the apply as unstarted; its executor starts
        # terraform apply (and commits that) before cancel's UPDATE.
        if not started:
            started.append(begin(rt, tid, f, Phase.APPLY))
        return real_transition(*args, **kwargs)

    monkeypatch.setattr(tasks, "transition", start_first)
    view = tasks.cancel(rt, tid, actor="alice")

    assert started == [Reply.ok()]
    # Not ended under the running apply (its heartbeat would then be told to
    # kill terraform as stale, and the state it saves would be refused):
    # the cancel is requested, and the executor interrupts terraform.
    assert (view.status, view.cancel_requested_by) == (S.APPLYING, "alice")
    reply = beat(rt, tid, f, Phase.APPLY)
    assert (reply.accepted, reply.directive) == (True, Directive.INTERRUPT)
    content = b'{"serial": 2, "lineage": "L"}'
    assert reports.accept(rt, StateWritten(tid, f, 2, "L", content)).accepted
    assert end(rt, tid, f, CANCELLED_BY_EXECUTOR, Phase.APPLY).accepted
    assert last_event(rt, tid) == (S.APPLYING, S.CANCELLED, "alice", "cancelled: apply stopped")
