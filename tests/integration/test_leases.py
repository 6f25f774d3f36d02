"""Leases: Started takes one, heartbeats renew it, stale fences are refused,
and the reconciler re-claims a lapsed plan or fails a lapsed apply.

Time is moved by writing the lease columns, never by waiting for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from executors.base import (
    Directive,
    Finished,
    Heartbeat,
    Reply,
    Report,
    Started,
    StateWritten,
)
from scheduler import dispatcher, leases, messages, reconciler, reports, tasks
from scheduler.messages import RecordingPublisher
from scheduler.models import utcnow
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from tests.integration.helpers import (
    APPLY_OK,
    PLAN_NO_CHANGES,
    ago,
    applying,
    beat,
    begin,
    claimed,
    dispatches,
    end,
    everything,
    executes,
    is_stale,
    lapse,
    make_workspace,
    recorder,
    rejected_reports,
    set_task,
    task_events,
)

S = TaskStatus
PA = TaskType.PLAN_AND_APPLY


# ---------------------------------------------------------------- heartbeats


def test_started_takes_the_lease(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    view = tasks.get(rt, tid)
    assert (view.executor_handle, view.lease_expires_at, view.phase_started_at) == (None,) * 3
    assert (view.handoff_attempts, view.plan_attempts, f) == (1, 1, 1)

    before = utcnow()
    reply = begin(rt, tid, f)
    after = utcnow()

    assert reply == Reply(True, Directive.CONTINUE, "", None)
    view = tasks.get(rt, tid)
    assert view.status is S.PLANNING and view.fence == f
    assert view.executor_handle == f"exec:{tid}:{f}"
    assert view.phase_started_at is not None and view.heartbeat_at is not None
    assert before <= view.phase_started_at == view.heartbeat_at <= after
    assert view.lease_expires_at == view.heartbeat_at + timedelta(seconds=rt.settings.lease_ttl)
    # Starting is not a status change: no event row.
    assert [(e.from_status, e.to_status) for e in task_events(rt, tid)] == [
        (None, S.PENDING),
        (S.PENDING, S.PLANNING),
    ]


def test_heartbeat_renews_the_lease(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    begin(rt, tid, f)
    started = tasks.get(rt, tid).phase_started_at
    set_task(rt, tid, heartbeat_at=ago(50), lease_expires_at=ago(-10))
    events = task_events(rt, tid)

    before = utcnow()
    reply = beat(rt, tid, f)
    after = utcnow()

    assert reply == Reply.ok()
    view = tasks.get(rt, tid)
    assert view.heartbeat_at is not None and before <= view.heartbeat_at <= after
    assert view.lease_expires_at == view.heartbeat_at + timedelta(seconds=rt.settings.lease_ttl)
    assert view.phase_started_at == started, "a heartbeat does not restart the phase clock"
    assert (view.status, view.fence, view.executor_handle) == (S.PLANNING, f, f"exec:{tid}:{f}")
    assert task_events(rt, tid) == events


def test_heartbeat_before_start_is_refused(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    before = everything(rt)
    assert is_stale(beat(rt, tid, f))
    assert everything(rt) == before


def test_duplicate_started_is_refused(rt: Runtime, ws: str, caplog: Any) -> None:
    tid, f = claimed(rt, ws)
    assert begin(rt, tid, f).accepted
    before = everything(rt)
    caplog.set_level(logging.WARNING, logger="scheduler.reports")

    # A redelivered hand-off: same fence, another worker.
    second = reports.accept(rt, Started(tid, f, Phase.PLAN, "exec:elsewhere"))
    # A start of the wrong phase.
    wrong = reports.accept(rt, Started(tid, f, Phase.APPLY, "exec:apply"))

    assert is_stale(second) and is_stale(wrong)
    assert everything(rt) == before
    assert tasks.get(rt, tid).executor_handle == f"exec:{tid}:{f}"
    assert len(rejected_reports(caplog.records)) == 2


def test_a_retried_started_from_the_same_run_is_accepted_again(rt: Runtime, ws: str) -> None:
    """The Started committed but its reply was lost: the runner's retry (same
    run, same handle) must not make it abandon a phase it owns."""
    tid, f = claimed(rt, ws)
    assert begin(rt, tid, f).accepted
    started = tasks.get(rt, tid)
    again = reports.accept(rt, Started(tid, f, Phase.PLAN, f"exec:{tid}:{f}"))
    assert again == Reply.ok()
    view = tasks.get(rt, tid)
    assert view.executor_handle == f"exec:{tid}:{f}"
    assert view.phase_started_at is not None and started.phase_started_at is not None
    # Another run of the same claim is still refused (start-once).
    assert is_stale(reports.accept(rt, Started(tid, f, Phase.PLAN, "exec:other-run")))


def _stale_reports(tid: int, fence: int) -> list[Report]:
    return [
        Started(tid, fence, Phase.APPLY, "exec:stale"),
        Heartbeat(tid, fence, Phase.APPLY),
        StateWritten(tid, fence, serial=9, lineage="L", content=b'{"serial": 9}'),
        Finished(tid, fence, Phase.APPLY, APPLY_OK),
        # The plan's executor, long superseded by the apply's claim.
        Heartbeat(tid, fence, Phase.PLAN),
        Finished(tid, fence, Phase.PLAN, PLAN_NO_CHANGES),
    ]


@pytest.mark.parametrize("offset", [-1, +1], ids=["stale", "future"])
def test_reports_under_another_fence_are_refused(
    rt: Runtime, ws: str, caplog: Any, offset: int
) -> None:
    tid, f = applying(rt, ws)
    assert begin(rt, tid, f, Phase.APPLY).accepted
    before = everything(rt)
    caplog.set_level(logging.WARNING, logger="scheduler.reports")

    for report in _stale_reports(tid, f + offset):
        reply = reports.accept(rt, report)
        assert is_stale(reply), (report, reply)

    assert everything(rt) == before
    rejected = rejected_reports(caplog.records)
    assert [r.fence for r in rejected] == [f + offset] * 6  # type: ignore[attr-defined]
    # The current executor is unaffected.
    assert beat(rt, tid, f, Phase.APPLY) == Reply.ok()


def test_reports_for_unknown_task_are_refused(rt: Runtime, ws: str) -> None:
    before = everything(rt)
    for report in _stale_reports(999_999, 1):
        assert is_stale(reports.accept(rt, report)), report
    assert everything(rt) == before


# ---------------------------------------------------------------- lapsed leases


def test_lapsed_plan_is_reclaimed_under_a_new_fence(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    begin(rt, tid, f)
    heard = ago(61)
    set_task(rt, tid, heartbeat_at=heard, lease_expires_at=ago(1))
    recorder(rt).sent.clear()

    out = reconciler.sweep(rt)

    assert (out.reclaimed, out.lost) == ([tid], [])
    view = tasks.get(rt, tid)
    assert (view.status, view.fence, view.plan_attempts, view.handoff_attempts) == (
        S.PLANNING,
        f + 1,
        2,
        1,
    )
    assert (view.executor_handle, view.lease_expires_at, view.phase_started_at) == (None,) * 3
    ev = task_events(rt, tid)[-1]
    assert (ev.from_status, ev.to_status, ev.fence, ev.actor) == (
        S.PLANNING,
        S.PLANNING,
        f + 1,
        rt.actor,
    )
    assert ev.reason is not None and ev.reason.startswith("executor lost")
    assert heard.isoformat(timespec="seconds") in ev.reason
    assert f"exec:{tid}:{f}" in ev.reason and "attempt 2 of 3" in ev.reason
    # The new claim is handed off: only its id and its fence travel.
    assert executes(rt) == [(tid, f + 1)]

    # The lost executor, if it wakes, is told to stop; the new one runs.
    assert is_stale(beat(rt, tid, f))
    assert is_stale(end(rt, tid, f, PLAN_NO_CHANGES))
    assert begin(rt, tid, f + 1).accepted
    assert end(rt, tid, f + 1, PLAN_NO_CHANGES).accepted
    assert tasks.get(rt, tid).status is S.SUCCESS
    # A sweep after that has nothing to do with it.
    again = reconciler.sweep(rt)
    assert tid not in again.reclaimed + again.lost + again.resent


@pytest.mark.parametrize("retries", [0, 2])
def test_plan_fails_after_its_retries(
    rt: Runtime, ws: str, tune: Callable[..., Runtime], retries: int
) -> None:
    r = tune(plan_retries=retries)
    tid, f = claimed(r, ws, PA)
    for attempt in range(1, retries + 2):
        assert begin(r, tid, f).accepted
        heard = ago(61 + attempt)
        set_task(r, tid, heartbeat_at=heard, lease_expires_at=ago(1))
        recorder(r).sent.clear()
        out = reconciler.sweep(r)
        if attempt <= retries:
            assert out.reclaimed == [tid]
            assert f"attempt {attempt + 1} of {retries + 1}" in str(task_events(r, tid)[-1].reason)
            f += 1
            assert executes(r) == [(tid, f)]

    assert (out.reclaimed, out.lost) == ([], [tid])
    view = tasks.get(r, tid)
    assert (view.status, view.fence, view.plan_attempts) == (S.FAILED, f, retries + 1)
    assert view.error is not None
    assert view.error.startswith(f"executor lost: last heard from at {heard:%Y-%m-%dT%H:%M:%S}")
    assert f"(exec:{tid}:{f})" in view.error
    assert f"the plan was tried {retries + 1} times" in view.error
    assert view.lease_expires_at is None
    ev = task_events(r, tid)[-1]
    assert (ev.from_status, ev.to_status, ev.fence) == (S.PLANNING, S.FAILED, f)
    assert str(ev.reason).startswith("executor lost")
    assert executes(r) == [], "a failed plan is not handed off again"
    # The plan+apply's slot is free again.
    assert ws in dispatches(r)
    assert [e.to_status for e in task_events(r, tid)].count(S.PLANNING) == retries + 1


def test_lapsed_apply_fails_and_the_workspace_moves_on(rt: Runtime, ws: str) -> None:
    tid, f = applying(rt, ws)
    nxt = tasks.submit(rt, ws, PA)
    assert begin(rt, tid, f, Phase.APPLY).accepted
    heard = ago(75)
    set_task(rt, tid, heartbeat_at=heard, lease_expires_at=ago(15))
    recorder(rt).sent.clear()

    out = reconciler.sweep(rt)

    assert (out.reclaimed, out.lost) == ([], [tid])
    view = tasks.get(rt, tid)
    assert (view.status, view.fence, view.lease_expires_at) == (S.FAILED, f, None)
    assert view.error is not None
    assert view.error.startswith(f"executor lost: last heard from at {heard:%Y-%m-%dT%H:%M:%S}")
    assert f"(exec:{tid}:{f})" in view.error and "not re-run" in view.error
    ev = task_events(rt, tid)[-1]
    assert (ev.from_status, ev.to_status, ev.fence, ev.actor) == (
        S.APPLYING,
        S.FAILED,
        f,
        rt.actor,
    )
    assert str(ev.reason).startswith("executor lost")
    # Never re-run: no hand-off; the workspace is woken for the next one.
    assert executes(rt) == []
    assert messages.dispatch(ws) in recorder(rt).sent
    decision = dispatcher.dispatch(rt, ws)
    assert (decision.action, decision.task_id) == ("claimed_plan", nxt.id)
    # The lost apply's executor can change nothing any more.
    assert is_stale(beat(rt, tid, f, Phase.APPLY))
    assert is_stale(end(rt, tid, f, APPLY_OK, Phase.APPLY))
    assert tasks.get(rt, tid).status is S.FAILED


def test_a_lease_not_yet_lapsed_is_left_alone(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    begin(rt, tid, f)
    set_task(rt, tid, heartbeat_at=ago(59), lease_expires_at=ago(-1))
    before = everything(rt)
    out = reconciler.sweep(rt)
    assert (out.reclaimed, out.lost) == ([], [])
    assert everything(rt) == before


def test_a_heartbeat_between_read_and_update_wins(
    rt: Runtime, ws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tid, f = claimed(rt, ws)
    begin(rt, tid, f)
    lapse(rt, tid)
    real_lose = leases.lose
    beats: list[Reply] = []

    def heartbeat_first(*args: Any, **kwargs: Any) -> leases.Lost:
        # The reconciler has read the lapsed lease; the executor was only
        # slow, and its heartbeat commits before the reconciler's UPDATE.
        beats.append(beat(rt, tid, f))
        return real_lose(*args, **kwargs)

    monkeypatch.setattr(leases, "lose", heartbeat_first)
    recorder(rt).sent.clear()
    events = task_events(rt, tid)

    out = reconciler.sweep(rt)

    assert beats == [Reply.ok()]
    assert (out.reclaimed, out.lost) == ([], [])
    view = tasks.get(rt, tid)
    assert (view.status, view.fence, view.executor_handle) == (
        S.PLANNING,
        f,
        f"exec:{tid}:{f}",
    )
    assert view.lease_expires_at is not None and view.lease_expires_at > utcnow()
    assert task_events(rt, tid) == events
    assert executes(rt) == []


def test_two_sweeps_at_once_move_each_task_once(rt: Runtime, src: Any) -> None:
    plans: dict[int, int] = {}
    applies: dict[int, int] = {}
    for i in range(4):
        make_workspace(rt, f"p{i}", src)
        tid, f = claimed(rt, f"p{i}")
        begin(rt, tid, f)
        lapse(rt, tid)
        plans[tid] = f
        make_workspace(rt, f"a{i}", src)
        tid, f = applying(rt, f"a{i}")
        begin(rt, tid, f, Phase.APPLY)
        lapse(rt, tid)
        applies[tid] = f
    recorder(rt).sent.clear()
    other = Runtime(settings=rt.settings, publisher=RecordingPublisher(), actor="reconciler-2")
    barrier = threading.Barrier(2)
    outs: list[reconciler.Sweep] = []
    errors: list[BaseException] = []

    def sweep(r: Runtime) -> None:
        try:
            barrier.wait(10)
            outs.append(reconciler.sweep(r))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=sweep, args=(r,)) for r in (rt, other)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        other.close()

    assert errors == [] and len(outs) == 2
    reclaimed = outs[0].reclaimed + outs[1].reclaimed
    lost = outs[0].lost + outs[1].lost
    assert sorted(reclaimed) == sorted(plans)
    assert sorted(lost) == sorted(applies)
    for tid, f in plans.items():
        view = tasks.get(rt, tid)
        assert (view.status, view.fence) == (S.PLANNING, f + 1)
        assert [(e.from_status, e.to_status) for e in task_events(rt, tid)].count(
            (S.PLANNING, S.PLANNING)
        ) == 1
    for tid, f in applies.items():
        view = tasks.get(rt, tid)
        assert (view.status, view.fence) == (S.FAILED, f)
        assert [e.to_status for e in task_events(rt, tid)].count(S.FAILED) == 1
    sent = executes(rt) + executes(other)
    assert sorted(sent) == sorted((tid, f + 1) for tid, f in plans.items())
