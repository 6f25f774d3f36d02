"""Accepting executor reports.

Each report names the task and the fencing token the executor was handed. A
report whose token the task no longer holds comes from a superseded executor
(the phase was re-claimed, or the task was moved on): it is rejected and
logged, changes nothing, and its reply tells the executor to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from executors.base import (
    Finished,
    Handoff,
    Heartbeat,
    LogWritten,
    PhaseResult,
    Reply,
    Report,
    Started,
    StopReason,
)
from executors.retry import with_backoff
from scheduler import artifacts, leases
from scheduler.errors import ConcurrentChange, IllegalTransition, StaleFence, TaskNotFound
from scheduler.models import Task, Workspace, task_and_workspace
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from scheduler.transitions import Seen, transition

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


def accept(rt: Runtime, report: Report) -> Reply:
    """Apply ``report`` if its fence is current; say what the executor does next."""
    if isinstance(report, Finished):
        return _finished(rt, report)
    with rt.transaction() as s:
        if isinstance(report, Started):
            reply = leases.start(s, rt.settings, report)
        elif isinstance(report, Heartbeat):
            reply = leases.renew(s, rt.settings, report)
        elif isinstance(report, LogWritten):
            reply = artifacts.store_log(s, report)
        else:
            reply = artifacts.store_state(s, report)
    if not reply.accepted:
        _reject(report, reply.reason)
    elif isinstance(report, Started):
        log.info(
            "task %s %s started on %s",
            report.task_id,
            report.phase,
            report.handle,
            extra={"action": "phase_started", "task_id": report.task_id},
        )
    return reply


def _reject(report: Report, why: str) -> Reply:
    log.warning(
        "rejected %s report for task %s (fence %s): %s",
        type(report).__name__.lower(),
        report.task_id,
        report.fence,
        why,
        extra={"action": "report_rejected", "task_id": report.task_id, "fence": report.fence},
    )
    return Reply.stale(why)


def _finished(rt: Runtime, report: Finished) -> Reply:
    result = report.result
    handoff: Handoff | None = None
    try:
        with rt.transaction() as s:
            row = task_and_workspace(s, report.task_id)
            if row is None:
                raise TaskNotFound(f"task {report.task_id} does not exist")
            task, ws = row
            if task.fence != report.fence:
                raise StaleFence(f"fence {report.fence} is stale (the task holds {task.fence})")
            if task.status != leases.running_status(report.phase):
                raise IllegalTransition(f"task is {task.status}, not running {report.phase}")
            if result.stopped is StopReason.SHUTDOWN and not result.ok:
                # The worker gave the phase back: a plan runs again elsewhere.
                lost = leases.lose(
                    s, rt.settings, task, ws, actor=rt.actor, why=_shutdown_reason(report)
                )
                to, handoff = lost.status, lost.handoff
            else:
                to = _end(rt, s, task, ws, report)
    except (ConcurrentChange, IllegalTransition, TaskNotFound) as exc:
        return _reject(report, str(exc))
    if handoff is not None:
        from scheduler.dispatcher import hand_off

        hand_off(rt, handoff)
    log.info(
        "task %s %s finished: %s",
        report.task_id,
        report.phase,
        to,
        extra={"action": "phase_finished", "task_id": report.task_id, "status": str(to)},
    )
    return Reply.ok()


def _shutdown_reason(report: Finished) -> str:
    detail = report.result.error or "terraform interrupted"
    return f"worker shut down during the {report.phase} ({detail})"


def _end(rt: Runtime, s: Session, task: Task, ws: Workspace, report: Finished) -> TaskStatus:
    """Move a task whose phase finished to where its outcome takes it."""
    result = report.result
    cancelled = task.cancel_requested_at is not None and (
        report.phase is Phase.PLAN or not result.ok
    )
    if cancelled:
        # A cancelled plan ends cancelled even if terraform got to finish it;
        # an apply that completed before the interrupt took effect did apply.
        to = TaskStatus.CANCELLED
        actor = task.cancel_requested_by or rt.actor
        reason = f"cancelled{' (forced)' if task.cancel_force else ''}: {report.phase} stopped"
    else:
        to = next_status(TaskType(task.type), report.phase, result, ws.auto_apply)
        actor = rt.actor
        reason = f"{report.phase} {'succeeded' if result.ok else 'failed'}"
        if result.stopped is not None:
            reason += f" ({result.stopped})"
        if to is TaskStatus.APPLY_QUEUED:
            reason += "; workspace auto-applies"
    if to in (TaskStatus.APPLY_PENDING, TaskStatus.APPLY_QUEUED):
        # The apply may run on any host: it needs the saved plan, stored here.
        if report.plan is None:
            to, reason = TaskStatus.FAILED, "plan failed: the executor sent no saved plan"
            result = PhaseResult(ok=False, error="the executor sent no saved plan to apply")
        elif len(report.plan) > rt.settings.max_artifact_bytes:
            to, reason = TaskStatus.FAILED, "plan failed: saved plan too large"
            result = PhaseResult(
                ok=False,
                error=f"the saved plan is {len(report.plan)} bytes, over the limit of "
                f"{rt.settings.max_artifact_bytes} (RUNQ_MAX_ARTIFACT_BYTES)",
            )
        else:
            artifacts.store_plan(s, task, report.fence, report.plan)
    values: dict[str, object] = {"error": None if cancelled else result.error}
    if report.phase is Phase.PLAN:
        values["has_changes"] = result.has_changes
        if result.changes is not None:
            values["changes_add"] = result.changes.add
            values["changes_change"] = result.changes.change
            values["changes_destroy"] = result.changes.destroy
    transition(
        s,
        task.id,
        to,
        actor=actor,
        reason=reason,
        expect={leases.running_status(report.phase)},
        fence=report.fence,
        values=values,
        seen=Seen.of(task, ws),
    )
    return to


#: Errors worth retrying a report for: the database or the connection to it
#: failed, not the report. Anything else is a bug and surfaces at once.
TRANSIENT = (OperationalError, InterfaceError)


def is_transient(exc: DBAPIError) -> bool:
    """A :data:`TRANSIENT` error, or any error that cost the connection.

    A session the server ended while it sat in a transaction (the process
    was paused past ``idle_in_transaction_session_timeout``) fails its next
    statement with SQLSTATE 25P03, which psycopg classes as an
    ``InternalError``; the connection is gone, and a retry on a new one lands.
    """
    return isinstance(exc, TRANSIENT) or exc.connection_invalidated


class DirectReporter:
    """Reports straight to the database (executors inside a runq worker).

    A report that fails on a database error is retried with backoff until it
    lands, its fence turns out stale, or ``give_up_after`` seconds pass (by
    then the lease has lapsed and the reconciler has taken over the task).
    Heartbeats are not retried here: the next one is due in a moment.
    """

    def __init__(self, rt: Runtime, *, give_up_after: float | None = None) -> None:
        self.rt = rt
        self.give_up_after = (
            give_up_after if give_up_after is not None else 10 * rt.settings.lease_ttl
        )

    def report(self, report: Report) -> Reply:
        if isinstance(report, Heartbeat):
            return accept(self.rt, report)
        return retry_transient(
            lambda: accept(self.rt, report),
            f"{type(report).__name__} report of task {report.task_id}",
            self.give_up_after,
        )


T = TypeVar("T")


def retry_transient(fn: Callable[[], T], what: str, give_up_after: float) -> T:
    """``fn()``, retried with capped exponential backoff on database errors."""
    return with_backoff(
        fn,
        what=what,
        give_up_after=give_up_after,
        retry_if=lambda exc: isinstance(exc, DBAPIError) and is_transient(exc),
        first=0.2,
        cap=5.0,
    )
