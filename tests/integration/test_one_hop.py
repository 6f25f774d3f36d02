"""The short paths a worker takes (issue 7), with the guarantees of the long
ones: a local plan claimed and run in one hop, and a freed workspace
dispatched by the worker that freed it, with no wake-up message."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from executors.base import PhaseResult
from executors.fake import FakeRunner
from executors.outcome import PhaseFailed
from scheduler import local_runs, tasks
from scheduler.messages import TASK_CLAIM_PLAN, TASK_DISPATCH, TASK_EXECUTE, RecordingPublisher
from scheduler.models import Task
from scheduler.runtime import Runtime
from scheduler.states import DispatchMode, TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_NO_CHANGES,
    chain,
    current_handoff,
    dispatches,
    executes,
    make_workspace,
    recorder,
    run_phase,
    status,
    tuned,
)

S = TaskStatus
PA = TaskType.PLAN_AND_APPLY


def worker_of(rt: Runtime, **changes: object) -> Runtime:
    """A worker's runtime on ``rt``'s database, with a publisher of its own."""
    return Runtime(
        settings=rt.settings.model_copy(update=changes),
        publisher=RecordingPublisher(),
        actor="worker",
        inline_wakeups=True,
    )


# ---------------------------------------------------------------- one hop for a local plan


def test_a_local_plan_is_claimed_started_and_run_in_one_hop(rt: Runtime, ws: str) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    assert [m.task for m in recorder(rt).sent] == [TASK_CLAIM_PLAN]
    runner = FakeRunner(script=lambda _h: PLAN_NO_CHANGES)

    ran = local_runs.run_plan(rt, plan.id, runner)

    assert isinstance(ran, local_runs.Ran) and ran.bundle.started is not None
    assert ran.outcome() == "fence 1: planned, no changes"
    assert [h.task_id for h in runner.ran] == [plan.id]
    assert executes(rt) == [], "no second hop: nothing was handed off"
    view = tasks.get(rt, plan.id)
    assert view.status is S.SUCCESS
    # Claimed and started by one UPDATE: the executor is the claimer.
    assert view.executor_handle == ran.bundle.started
    assert view.executor_handle.startswith("local:")
    assert view.phase_started_at is not None
    assert chain(rt, plan.id) == [
        (None, "pending"),
        ("pending", "planning"),
        ("planning", "success"),
    ]


def test_a_duplicate_claim_runs_nothing(rt: Runtime, ws: str) -> None:
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    first, second = FakeRunner(duration=0), FakeRunner(duration=0)
    assert isinstance(local_runs.run_plan(rt, plan.id, first), local_runs.Ran)
    note = local_runs.run_plan(rt, plan.id, second)
    assert isinstance(note, local_runs.Note) and not note.failed
    assert note.outcome() == f"skipped task {plan.id} (already success (late or duplicate))"
    assert (len(first.ran), second.ran) == (1, [])
    assert chain(rt, plan.id).count(("pending", "planning")) == 1


def test_a_plan_and_apply_or_a_legacy_plan_is_not_run_by_the_plan_path(
    rt: Runtime, ws: str, legacy_rt: Runtime
) -> None:
    pa = tasks.submit(rt, ws, PA)
    runner = FakeRunner()
    assert isinstance(local_runs.run_plan(rt, pa.id, runner), local_runs.Note)
    assert status(rt, pa.id) is S.PENDING
    # Legacy mode: every task waits its turn under the workspace lock, so a
    # claim_plan hint becomes a dispatch (which claims the head: ``pa``).
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    assert isinstance(local_runs.run_plan(legacy_rt, plan.id, runner), local_runs.Note)
    assert runner.ran == []
    assert (status(rt, pa.id), status(rt, plan.id)) == (S.PLANNING, S.PENDING)


def test_a_plan_that_can_never_run_fails_at_once_saying_why(
    rt: Runtime, src: Path, caplog: Any
) -> None:
    make_workspace(rt, "gone", src / "gone")
    plan = tasks.submit(rt, "gone", TaskType.PLAN)
    # As a task queued before configuration versions existed, whose
    # directory has gone since: no snapshot can be taken.
    with rt.transaction() as s:
        s.execute(update(Task).where(Task.id == plan.id).values(config_version_id=None))
    shutil.rmtree(src / "gone")
    runner = FakeRunner()
    caplog.set_level(logging.WARNING, logger="scheduler.local_runs")

    note = local_runs.run_plan(rt, plan.id, runner)

    assert isinstance(note, local_runs.Note) and note.failed
    with pytest.raises(PhaseFailed, match="plan cannot run"):
        note.outcome()
    assert runner.ran == []
    view = tasks.get(rt, plan.id)
    assert view.status is S.FAILED
    assert view.error is not None and "cannot run the plan" in view.error
    assert view.executor_handle is not None and view.executor_handle.startswith("local:")


# ---------------------------------------------------------------- wake-ups dispatched inline


def test_the_worker_that_frees_a_workspace_dispatches_it_itself(rt: Runtime, src: Path) -> None:
    make_workspace(rt, "net", src, auto_apply=True)
    a = tasks.submit(rt, "net", PA)
    b = tasks.submit(rt, "net", PA)
    worker = worker_of(rt)
    try:
        from scheduler import dispatcher

        dispatcher.dispatch(worker, "net")  # the submit's hint: claims a
        run_phase(worker, a.id, PhaseResult(ok=True, has_changes=True))
        # a's plan ended apply_queued: its apply was claimed at once, here.
        assert status(rt, a.id) is S.APPLYING
        run_phase(worker, a.id, PhaseResult(ok=True))
        assert status(rt, a.id) is S.APPLIED
        assert status(rt, b.id) is S.PLANNING, "b claimed by the worker that applied a"
        assert [m.task for m in worker.publisher.sent].count(TASK_DISPATCH) == 0  # type: ignore[attr-defined]
        assert [m.task for m in worker.publisher.sent].count(TASK_EXECUTE) == 3  # type: ignore[attr-defined]
        claims = [
            e for e in tasks.events(rt, [a.id, b.id]) if e.to_status in ("planning", "applying")
        ]
        assert {e.actor for e in claims} == {"worker"}
    finally:
        worker.close()


def test_an_inline_dispatch_that_fails_publishes_the_wake_up(
    rt: Runtime, src: Path, caplog: Any
) -> None:
    make_workspace(rt, "net", src)
    a = tasks.submit(rt, "net", PA)
    b = tasks.submit(rt, "net", PA)
    worker = worker_of(rt)
    from scheduler import dispatcher

    dispatcher.dispatch(worker, "net")
    run_phase(worker, a.id, PLAN_NO_CHANGES)  # a ends: success
    worker.close()
    assert status(rt, b.id) is S.PLANNING
    # Now a worker whose Redis (the workspace lock) is down: the dispatch
    # fails, and the wake-up goes to the broker for another worker.
    c = tasks.submit(rt, "net", PA)
    down = worker_of(rt, redis_url="redis://127.0.0.1:1/0")
    caplog.set_level(logging.WARNING, logger="scheduler.runtime")
    try:
        run_phase(down, current_handoff(rt, b.id), PLAN_NO_CHANGES)
        assert status(rt, b.id) is S.SUCCESS
        assert status(rt, c.id) is S.PENDING
        assert [m.args for m in down.publisher.sent if m.task == TASK_DISPATCH] == [("net",)]  # type: ignore[attr-defined]
        assert any(getattr(r, "action", None) == "wakeup_failed" for r in caplog.records)
    finally:
        down.close()


def test_clients_publish_wake_ups(rt: Runtime, ws: str) -> None:
    """The CLI and the Python API do not dispatch: a confirm publishes."""
    t = tasks.submit(rt, ws, PA)
    client = tuned(rt)  # inline_wakeups is off by default
    from scheduler import dispatcher

    dispatcher.dispatch(client, ws)
    run_phase(client, t.id, PhaseResult(ok=True, has_changes=True))
    assert status(rt, t.id) is S.APPLY_PENDING
    before = dispatches(rt).count(ws)
    tasks.confirm(client, t.id)
    assert dispatches(rt).count(ws) == before + 1
    assert status(rt, t.id) is S.APPLY_QUEUED
    client.close()
    assert DispatchMode(rt.settings.dispatch_mode) is DispatchMode.NEW
