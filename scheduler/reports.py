"""Accepting executor reports.

Each report names the task, the phase and the fencing token the executor was
handed. A report whose token the task no longer holds comes from a superseded
executor (the phase was re-claimed, or the task was moved on): it is rejected
and logged, and changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from executors.base import Finished, PhaseResult, Report, Started
from scheduler.errors import ConcurrentChange, IllegalTransition, TaskNotFound
from scheduler.models import Task, Workspace
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from scheduler.transitions import transition

log = logging.getLogger(__name__)


def next_status(
    task_type: TaskType, phase: Phase, result: PhaseResult, auto_apply: bool
) -> TaskStatus:
    """Where a finished phase takes the task: the plan's outcome decides."""
    if not result.ok:
        return TaskStatus.FAILED
    if phase is Phase.APPLY:
        return TaskStatus.APPLIED
    if task_type is TaskType.PLAN or not result.has_changes:
        return TaskStatus.SUCCESS
    return TaskStatus.APPLY_QUEUED if auto_apply else TaskStatus.APPLY_PENDING


def _running_status(phase: Phase) -> TaskStatus:
    return TaskStatus.PLANNING if phase is Phase.PLAN else TaskStatus.APPLYING


def accept(rt: Runtime, report: Report) -> bool:
    """Apply ``report``; return False if it was rejected as stale."""
    if isinstance(report, Started):
        return _started(rt, report)
    return _finished(rt, report)


def _reject(report: Report, why: str) -> bool:
    log.warning(
        "rejected %s report for task %s (fence %s): %s",
        type(report).__name__.lower(),
        report.task_id,
        report.fence,
        why,
        extra={"action": "report_rejected", "task_id": report.task_id, "fence": report.fence},
    )
    return False


def _started(rt: Runtime, report: Started) -> bool:
    expected = _running_status(report.phase)
    with rt.transaction() as s:
        # At most one executor starts a claimed phase: the handle is empty
        # until the first start report fills it, so a redelivered or
        # duplicated launch message finds it taken and must not run.
        result = s.execute(
            update(Task)
            .where(
                Task.id == report.task_id,
                Task.fence == report.fence,
                Task.status == expected,
                Task.executor_handle.is_(None),
            )
            .values(executor_handle=report.handle)
            .execution_options(synchronize_session=False)
        )
    if cast("CursorResult[Any]", result).rowcount != 1:
        return _reject(report, f"task is not {expected} under this fence, or already started")
    log.info(
        "task %s %s started on %s",
        report.task_id,
        report.phase,
        report.handle,
        extra={"action": "phase_started", "task_id": report.task_id},
    )
    return True


def _finished(rt: Runtime, report: Finished) -> bool:
    result = report.result
    try:
        with rt.transaction() as s:
            row = s.execute(
                select(Task.type, Task.status, Workspace.auto_apply)
                .join(Workspace, Workspace.id == Task.workspace_id)
                .where(Task.id == report.task_id)
            ).one_or_none()
            if row is None:
                raise TaskNotFound(f"task {report.task_id} does not exist")
            to = next_status(TaskType(row.type), report.phase, result, row.auto_apply)
            values: dict[str, object] = {"error": result.error}
            if report.phase is Phase.PLAN:
                values["has_changes"] = result.has_changes
                if result.changes is not None:
                    values["changes_add"] = result.changes.add
                    values["changes_change"] = result.changes.change
                    values["changes_destroy"] = result.changes.destroy
            reason = f"{report.phase} {'succeeded' if result.ok else 'failed'}"
            if to is TaskStatus.APPLY_QUEUED:
                reason += "; workspace auto-applies"
            transition(
                s,
                report.task_id,
                to,
                actor=rt.actor,
                reason=reason,
                expect={_running_status(report.phase)},
                fence=report.fence,
                values=values,
            )
    except (ConcurrentChange, IllegalTransition, TaskNotFound) as exc:
        return _reject(report, str(exc))
    log.info(
        "task %s %s finished: %s",
        report.task_id,
        report.phase,
        to,
        extra={"action": "phase_finished", "task_id": report.task_id, "status": str(to)},
    )
    return True


class DirectReporter:
    """Reports straight to the database (executors inside a runq worker)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def report(self, report: Report) -> bool:
        return accept(self.rt, report)
