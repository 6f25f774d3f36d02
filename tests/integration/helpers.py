"""Small helpers shared by the integration tests (no fixtures here)."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import func, select

from executors.base import Changes, Finished, Handoff, PhaseResult, Started
from executors.fake import FakeRunner
from scheduler import reports, workspaces
from scheduler.messages import (
    QUEUE_DISPATCH,
    QUEUE_PLANS,
    QUEUE_RUNS,
    TASK_CLAIM_PLAN,
    TASK_DISPATCH,
    TASK_EXECUTE,
    Message,
    RecordingPublisher,
)
from scheduler.models import Task, TaskEvent, Workspace
from scheduler.runtime import Runtime
from scheduler.states import TaskStatus
from scheduler.views import WorkspaceView

PLAN_WITH_CHANGES = PhaseResult(ok=True, has_changes=True, changes=Changes(add=2, change=1))
PLAN_NO_CHANGES = PhaseResult(ok=True, has_changes=False, changes=Changes())
PLAN_FAILED = PhaseResult(ok=False, error="Error: boom")
APPLY_OK = PhaseResult(ok=True)


def recorder(rt: Runtime) -> RecordingPublisher:
    assert isinstance(rt.publisher, RecordingPublisher)
    return rt.publisher


def make_workspace(
    rt: Runtime, name: str, source: Path, *, auto_apply: bool = False
) -> WorkspaceView:
    source.mkdir(parents=True, exist_ok=True)
    return workspaces.create(rt, name, source_dir=str(source), auto_apply=auto_apply)


def dispatches(rt: Runtime) -> list[str]:
    """Workspaces named by the dispatch messages published so far."""
    return [
        str(m.args[0])
        for m in recorder(rt).sent
        if m.task == TASK_DISPATCH and m.queue == QUEUE_DISPATCH
    ]


def claim_plans(rt: Runtime) -> list[int]:
    return [
        int(m.args[0])
        for m in recorder(rt).sent
        if m.task == TASK_CLAIM_PLAN and m.queue == QUEUE_PLANS
    ]


def handoffs(rt: Runtime) -> list[Handoff]:
    """The execute hand-offs published to the runs queue so far."""
    return [
        Handoff.from_json(dict(m.args[0]))
        for m in recorder(rt).sent
        if m.task == TASK_EXECUTE and m.queue == QUEUE_RUNS
    ]


def last_handoff(rt: Runtime, task_id: int) -> Handoff:
    mine = [h for h in handoffs(rt) if h.task_id == task_id]
    assert mine, f"no hand-off published for task {task_id}"
    return mine[-1]


def run_phase(rt: Runtime, task: int | Handoff, result: PhaseResult) -> Handoff:
    """Run a hand-off (or the latest one of task id ``task``) with a FakeRunner
    reporting ``result``."""
    handoff = task if isinstance(task, Handoff) else last_handoff(rt, task)
    runner = FakeRunner(script=lambda _h: result)
    runner.run(handoff, reports.DirectReporter(rt))
    assert runner.ran == [handoff], "the runner's start report was rejected"
    return handoff


def start(rt: Runtime, handoff: Handoff) -> bool:
    return reports.accept(
        rt, Started(handoff.task_id, handoff.fence, handoff.phase, f"test:{handoff.task_id}")
    )


def finish(rt: Runtime, handoff: Handoff, result: PhaseResult, *, fence: int | None = None) -> bool:
    return reports.accept(
        rt,
        Finished(
            handoff.task_id,
            handoff.fence if fence is None else fence,
            handoff.phase,
            result,
        ),
    )


def status(rt: Runtime, task_id: int) -> TaskStatus:
    with rt.sessions() as s:
        return TaskStatus(s.scalars(select(Task.status).where(Task.id == task_id)).one())


def fence(rt: Runtime, task_id: int) -> int:
    with rt.sessions() as s:
        return int(s.scalars(select(Task.fence).where(Task.id == task_id)).one())


def chain(rt: Runtime, task_id: int) -> list[tuple[str | None, str]]:
    """The (from, to) pairs of a task's event rows, oldest first."""
    with rt.sessions() as s:
        rows = s.execute(
            select(TaskEvent.from_status, TaskEvent.to_status)
            .where(TaskEvent.task_id == task_id)
            .order_by(TaskEvent.id)
        ).all()
    return [(f, t) for f, t in rows]


def counts(rt: Runtime) -> tuple[int, int, int]:
    """(workspaces, tasks, events): to show that a refused request wrote nothing."""
    with rt.sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(Workspace)) or 0,
            s.scalar(select(func.count()).select_from(Task)) or 0,
            s.scalar(select(func.count()).select_from(TaskEvent)) or 0,
        )


def snapshot(rt: Runtime) -> list[tuple[object, ...]]:
    """Every task's mutable columns, for "nothing changed" assertions."""
    with rt.sessions() as s:
        rows = s.execute(
            select(
                Task.id,
                Task.status,
                Task.fence,
                Task.executor_handle,
                Task.started_at,
                Task.finished_at,
                Task.error,
                Task.has_changes,
            ).order_by(Task.id)
        ).all()
    return [tuple(r) for r in rows]


def messages_of(rt: Runtime) -> list[Message]:
    return list(recorder(rt).sent)


def rejected_reports(caplog_records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in caplog_records if getattr(r, "action", None) == "report_rejected"]
