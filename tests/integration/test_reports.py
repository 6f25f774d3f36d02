"""Executor reports: fenced, each phase starts at most once, stale ones logged."""

from __future__ import annotations

import logging

import pytest

from executors.base import Finished, PhaseResult, Reply, Report, Started
from executors.fake import FakeRunner, bundle_of
from scheduler import dispatcher, reports, tasks
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_WITH_CHANGES,
    chain,
    finish,
    is_stale,
    last_handoff,
    rejected_reports,
    snapshot,
    start,
    status,
)

S = TaskStatus


def _claimed_plan(rt: Runtime, ws: str, task_type: TaskType = TaskType.PLAN) -> int:
    t = tasks.submit(rt, ws, task_type)
    if task_type is TaskType.PLAN:
        assert dispatcher.claim_plan(rt, t.id).claimed
    else:
        assert dispatcher.dispatch(rt, ws).task_id == t.id
    return t.id


def test_started_then_finished_moves_the_task(rt: Runtime, ws: str) -> None:
    tid = _claimed_plan(rt, ws, TaskType.PLAN_AND_APPLY)
    h = last_handoff(rt, tid)
    assert start(rt, h)
    view = tasks.get(rt, tid)
    assert (view.status, view.executor_handle) == (S.PLANNING, f"test:{tid}")
    assert chain(rt, tid)[-1] == ("pending", "planning"), "a start is not a status change"

    assert finish(rt, h, PLAN_WITH_CHANGES)
    view = tasks.get(rt, tid)
    assert (view.status, view.has_changes, view.add, view.change, view.destroy) == (
        S.APPLY_PENDING,
        True,
        2,
        1,
        0,
    )
    assert view.error is None
    assert chain(rt, tid)[-1] == ("planning", "apply_pending")


def test_failed_phase_records_its_error(rt: Runtime, ws: str) -> None:
    tid = _claimed_plan(rt, ws)
    h = last_handoff(rt, tid)
    assert start(rt, h)
    assert finish(rt, h, PhaseResult(ok=False, error="Error: Invalid provider"))
    view = tasks.get(rt, tid)
    assert (view.status, view.error) == (S.FAILED, "Error: Invalid provider")


def test_a_phase_starts_at_most_once(
    rt: Runtime, ws: str, caplog: pytest.LogCaptureFixture
) -> None:
    tid = _claimed_plan(rt, ws)
    h = last_handoff(rt, tid)
    assert start(rt, h)
    before = snapshot(rt)
    caplog.set_level(logging.WARNING, logger="scheduler.reports")
    again = Started(tid, h.fence, h.phase, "someone-else")
    assert is_stale(reports.accept(rt, again))
    assert snapshot(rt) == before
    assert tasks.get(rt, tid).executor_handle == f"test:{tid}"
    assert len(rejected_reports(caplog.records)) == 1

    # A duplicated launch runs nothing: FakeRunner stops when its start is refused.
    runner = FakeRunner()
    runner.run(bundle_of(h), reports.DirectReporter(rt))
    assert runner.ran == []
    assert status(rt, tid) is S.PLANNING


def test_stale_fence_is_rejected_logged_and_changes_nothing(
    rt: Runtime, ws: str, caplog: pytest.LogCaptureFixture
) -> None:
    tid = _claimed_plan(rt, ws)
    h = last_handoff(rt, tid)
    before = snapshot(rt)
    caplog.set_level(logging.WARNING, logger="scheduler.reports")

    assert is_stale(reports.accept(rt, Started(tid, h.fence - 1, Phase.PLAN, "old")))
    assert is_stale(reports.accept(rt, Finished(tid, h.fence - 1, Phase.PLAN, PLAN_WITH_CHANGES)))
    assert is_stale(reports.accept(rt, Finished(tid, h.fence + 1, Phase.PLAN, PLAN_WITH_CHANGES)))

    assert snapshot(rt) == before
    assert chain(rt, tid) == [(None, "pending"), ("pending", "planning")]
    rejected = rejected_reports(caplog.records)
    assert len(rejected) == 3
    assert all(r.levelno == logging.WARNING for r in rejected)
    assert all(getattr(r, "task_id", None) == tid for r in rejected)
    assert "fence" in rejected[1].getMessage()


def test_finished_for_the_wrong_phase_is_rejected(rt: Runtime, ws: str) -> None:
    tid = _claimed_plan(rt, ws, TaskType.PLAN_AND_APPLY)
    h = last_handoff(rt, tid)
    before = snapshot(rt)
    assert is_stale(reports.accept(rt, Finished(tid, h.fence, Phase.APPLY, PhaseResult(ok=True))))
    assert is_stale(reports.accept(rt, Started(tid, h.fence, Phase.APPLY, "x")))
    assert snapshot(rt) == before


def test_second_finished_is_rejected(rt: Runtime, ws: str) -> None:
    tid = _claimed_plan(rt, ws)
    h = last_handoff(rt, tid)
    assert finish(rt, h, PLAN_WITH_CHANGES)
    before = snapshot(rt)
    assert not finish(rt, h, PhaseResult(ok=False, error="late"))
    assert snapshot(rt) == before
    assert status(rt, tid) is S.SUCCESS


def test_report_for_a_missing_task_is_rejected_not_raised(rt: Runtime, ws: str) -> None:
    assert is_stale(reports.accept(rt, Finished(999999, 1, Phase.PLAN, PLAN_WITH_CHANGES)))
    assert is_stale(reports.accept(rt, Started(999999, 1, Phase.PLAN, "x")))


def test_two_runs_of_one_handoff_start_it_once(rt: Runtime, ws: str) -> None:
    """A duplicated hand-off run by a second executor while the first runs
    it: the second's Started is refused (a retried Started of the *same*
    run is accepted, so every run must have its own handle)."""
    tid = _claimed_plan(rt, ws)
    h = last_handoff(rt, tid)
    second = FakeRunner()

    class StartsTheSecondRun(reports.DirectReporter):
        def report(self, report: Report) -> Reply:
            reply = super().report(report)
            if isinstance(report, Started) and reply.accepted:
                second.run(bundle_of(h), reports.DirectReporter(rt))
            return reply

    first = FakeRunner()
    first.run(bundle_of(h), StartsTheSecondRun(rt))
    assert (first.ran, second.ran) == ([h], [])
    assert status(rt, tid) is S.SUCCESS
