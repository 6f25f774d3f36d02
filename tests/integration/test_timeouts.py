"""Phase timeouts (heartbeat replies, the reconciler's backstop) and the
confirmation timeout. Time moves by writing phase_started_at and
status_changed_at, never by waiting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from executors.base import Directive, PhaseResult, Reply, StopReason
from scheduler import dispatcher, leases, messages, reconciler, tasks, workspaces
from scheduler.errors import InvalidInput
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_WITH_CHANGES,
    ago,
    applying,
    beat,
    begin,
    claimed,
    end,
    everything,
    recorder,
    set_task,
    task_events,
)

S = TaskStatus
PA = TaskType.PLAN_AND_APPLY


def timed_out(phase: Phase, limit: str) -> Reply:
    return Reply(True, Directive.INTERRUPT, f"{phase} timed out after {limit}s", StopReason.TIMEOUT)


def started(rt: Runtime, ws: str, phase: Phase) -> tuple[int, int]:
    if phase is Phase.PLAN:
        tid, f = claimed(rt, ws, PA)
    else:
        tid, f = applying(rt, ws)
    assert begin(rt, tid, f, phase).accepted
    return tid, f


@pytest.mark.parametrize("phase", [Phase.PLAN, Phase.APPLY])
def test_heartbeat_past_the_default_timeout_interrupts(rt: Runtime, ws: str, phase: Phase) -> None:
    tid, f = started(rt, ws, phase)
    assert rt.settings.plan_timeout == rt.settings.apply_timeout == 7200
    set_task(rt, tid, phase_started_at=ago(7190))
    assert beat(rt, tid, f, phase) == Reply.ok()
    set_task(rt, tid, phase_started_at=ago(7201))
    events = task_events(rt, tid)

    assert beat(rt, tid, f, phase) == timed_out(phase, "7200")
    # The reply is the executor's to act on; the task is unchanged until it reports.
    view = tasks.get(rt, tid)
    assert (view.status, view.fence) == (S.PLANNING if phase is Phase.PLAN else S.APPLYING, f)
    assert task_events(rt, tid) == events

    result = PhaseResult(
        ok=False, error=f"{phase} timed out after 7200s", stopped=StopReason.TIMEOUT
    )
    assert end(rt, tid, f, result, phase).accepted
    view = tasks.get(rt, tid)
    assert (view.status, view.error) == (S.FAILED, f"{phase} timed out after 7200s")
    assert task_events(rt, tid)[-1].reason == f"{phase} failed (timeout)"


def test_workspace_timeouts_override_the_defaults(rt: Runtime, src: Path) -> None:
    view = workspaces.create(rt, "short", source_dir=str(src), plan_timeout=30, apply_timeout=45)
    assert (view.plan_timeout, view.apply_timeout) == (30, 45)
    tid, f = claimed(rt, "short", PA)
    with rt.sessions() as s:
        assert leases.load_handoff(s, rt.settings, tid, f).timeout == 30
    begin(rt, tid, f)
    set_task(rt, tid, phase_started_at=ago(31))
    assert beat(rt, tid, f) == timed_out(Phase.PLAN, "30")

    # Changed while the phase runs: the next heartbeat sees it.
    workspaces.set_timeouts(rt, "short", plan_timeout=120)
    assert beat(rt, tid, f) == Reply.ok()
    workspaces.set_timeouts(rt, "short", plan_timeout=20.5)
    assert beat(rt, tid, f) == timed_out(Phase.PLAN, "20.5")
    # None: back to the 2-hour default.
    view = workspaces.set_timeouts(rt, "short", plan_timeout=None)
    assert (view.plan_timeout, view.apply_timeout) == (None, 45)
    assert beat(rt, tid, f) == Reply.ok()

    # The apply has its own limit.
    assert end(rt, tid, f, PLAN_WITH_CHANGES).accepted
    tasks.confirm(rt, tid)
    decision = dispatcher.dispatch(rt, "short")
    assert decision.fence is not None
    fa = decision.fence
    with rt.sessions() as s:
        assert leases.load_handoff(s, rt.settings, tid, fa).timeout == 45
    begin(rt, tid, fa, Phase.APPLY)
    set_task(rt, tid, phase_started_at=ago(44))
    assert beat(rt, tid, fa, Phase.APPLY) == Reply.ok()
    set_task(rt, tid, phase_started_at=ago(46))
    assert beat(rt, tid, fa, Phase.APPLY) == timed_out(Phase.APPLY, "45")


@pytest.mark.parametrize("bad", [0, -1, 7 * 24 * 3600 + 1])
def test_invalid_timeouts_are_refused(rt: Runtime, ws: str, src: Path, bad: float) -> None:
    before = everything(rt)
    with pytest.raises(InvalidInput, match="between 0 and 7 days"):
        workspaces.set_timeouts(rt, ws, apply_timeout=bad)
    with pytest.raises(InvalidInput, match="between 0 and 7 days"):
        workspaces.create(rt, "other", source_dir=str(src), plan_timeout=bad)
    assert everything(rt) == before


def test_cancel_outranks_a_timeout(rt: Runtime, ws: str) -> None:
    tid, f = started(rt, ws, Phase.PLAN)
    set_task(rt, tid, phase_started_at=ago(7201))
    tasks.cancel(rt, tid, actor="alice")
    assert beat(rt, tid, f).stop is StopReason.CANCEL


# ---------------------------------------------------------------- backstop


@pytest.mark.parametrize("phase", [Phase.PLAN, Phase.APPLY])
def test_reconciler_fails_a_phase_its_executor_did_not_stop(
    rt: Runtime, ws: str, phase: Phase
) -> None:
    workspaces.set_timeouts(rt, ws, plan_timeout=100, apply_timeout=100)
    tid, f = started(rt, ws, phase)
    nxt = tasks.submit(rt, ws, PA)
    slack = rt.settings.kill_grace + rt.settings.lease_ttl  # 30 + 60
    # The executor is alive (its lease is fresh) but terraform runs on.
    set_task(rt, tid, phase_started_at=ago(100 + slack - 5))
    assert beat(rt, tid, f, phase).stop is StopReason.TIMEOUT
    before = everything(rt)
    assert reconciler.sweep(rt).timed_out == []
    assert everything(rt) == before

    set_task(rt, tid, phase_started_at=ago(100 + slack + 1))
    assert beat(rt, tid, f, phase).accepted
    recorder(rt).sent.clear()
    out = reconciler.sweep(rt)

    assert (out.timed_out, out.lost, out.reclaimed) == ([tid], [], [])
    view = tasks.get(rt, tid)
    assert (view.status, view.fence, view.lease_expires_at) == (S.FAILED, f, None)
    expected = f"{phase} timed out after 100s and its executor (exec:{tid}:{f}) did not stop it"
    if phase is Phase.APPLY:
        expected += "; the apply was not re-run"
    assert view.error == expected
    ev = task_events(rt, tid)[-1]
    running = S.PLANNING if phase is Phase.PLAN else S.APPLYING
    assert (ev.from_status, ev.to_status, ev.reason, ev.actor, ev.fence) == (
        running,
        S.FAILED,
        "timed out",
        rt.actor,
        f,
    )
    assert messages.dispatch(ws) in recorder(rt).sent
    assert dispatcher.dispatch(rt, ws).task_id == nxt.id
    # The executor that would not stop is now told to.
    beat_reply = beat(rt, tid, f, phase)
    assert (beat_reply.accepted, beat_reply.directive) == (False, Directive.KILL)


# ---------------------------------------------------------------- confirmation


def _planned(rt: Runtime, ws: str) -> int:
    tid, f = claimed(rt, ws, PA)
    begin(rt, tid, f)
    end(rt, tid, f, PLAN_WITH_CHANGES)
    assert tasks.get(rt, tid).status is S.APPLY_PENDING
    return tid


def test_unconfirmed_plans_are_kept_by_default(rt: Runtime, ws: str) -> None:
    assert rt.settings.confirm_timeout == 0
    tid = _planned(rt, ws)
    set_task(rt, tid, status_changed_at=ago(365 * 24 * 3600))
    before = everything(rt)
    assert reconciler.sweep(rt).unconfirmed == []
    assert everything(rt) == before


def test_confirm_timeout_discards_old_unconfirmed_plans(
    rt: Runtime, src: Path, tune: Callable[..., Runtime]
) -> None:
    r = tune(confirm_timeout=3600)
    for name in ("old", "young"):
        workspaces.create(r, name, source_dir=str(src))
    old, young = _planned(r, "old"), _planned(r, "young")
    nxt = tasks.submit(r, "old", PA)
    set_task(r, old, status_changed_at=ago(3601))
    set_task(r, young, status_changed_at=ago(3500))
    recorder(r).sent.clear()

    out = reconciler.sweep(r)

    assert out.unconfirmed == [old]
    assert tasks.get(r, young).status is S.APPLY_PENDING
    view = tasks.get(r, old)
    assert view.status is S.DISCARDED and view.finished_at is not None
    ev = task_events(r, old)[-1]
    assert (ev.from_status, ev.to_status, ev.actor, ev.reason) == (
        S.APPLY_PENDING,
        S.DISCARDED,
        r.actor,
        "not confirmed within 3600s (RUNQ_CONFIRM_TIMEOUT)",
    )
    assert messages.dispatch("old") in recorder(r).sent
    assert dispatcher.dispatch(r, "old").task_id == nxt.id
    assert reconciler.sweep(r).unconfirmed == []
