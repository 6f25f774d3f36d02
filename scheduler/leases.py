"""Leases: who may run a claimed phase, for how long, and what happens when
they stop answering.

A claim (see :data:`scheduler.states.CLAIMS`) bumps the task's fencing token
and starts the phase's hand-off. From then on:

* **unstarted**: the hand-off is re-sent, under the same fence, with
  exponential backoff from ``RUNQ_RESEND_AFTER``, until an executor starts it
  (the start is a compare-and-set on an empty ``executor_handle``, so a
  duplicate message starts nothing) or ``RUNQ_HANDOFF_ATTEMPTS`` sends fail;
* **started**: the executor holds a lease until ``lease_expires_at``, and
  renews it with every heartbeat. The heartbeat's reply carries what the
  scheduler wants: go on, interrupt (cancel, timeout), or kill (force cancel,
  or the fence is stale: someone else owns the phase now);
* **lapsed**: the reconciler finds the lease expired. A plan is re-claimed
  under a new fence (plans are read-only) while ``RUNQ_PLAN_RETRIES`` allow;
  an apply is never re-run: it fails, and its workspace moves on. A phase
  whose cancel was requested ends ``cancelled``.

The database holds every deadline (as Temporal does), so no worker registry
is needed and any number of reconcilers may sweep at once: every move below
is a compare-and-set that re-checks the deadline in its UPDATE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Update, bindparam, or_, update
from sqlalchemy.orm import Session

from executors.base import Directive, Handoff, Heartbeat, Reply, Started, StopReason
from scheduler.errors import ConcurrentChange, IllegalTransition
from scheduler.models import Task, Workspace, task_and_workspace, utcnow
from scheduler.settings import Settings
from scheduler.states import ExecutionMode, Phase, TaskStatus, TaskType, phase_of
from scheduler.transitions import TASKS, Seen, transition

log = logging.getLogger(__name__)

#: The longest wait between two sends of one unstarted hand-off.
MAX_RESEND_BACKOFF = 3600.0


def running_status(phase: Phase) -> TaskStatus:
    return TaskStatus.PLANNING if phase is Phase.PLAN else TaskStatus.APPLYING


def phase_timeout(settings: Settings, ws: Workspace, phase: Phase) -> float:
    if phase is Phase.PLAN:
        return ws.plan_timeout or settings.plan_timeout
    return ws.apply_timeout or settings.apply_timeout


def handoff_of(
    settings: Settings,
    task: Task,
    ws: Workspace,
    *,
    status: TaskStatus | None = None,
    fence: int | None = None,
) -> Handoff:
    """The hand-off for ``task``'s current phase, built from its rows.

    ``status`` and ``fence``: what a claim just wrote, for a caller that has
    the claim's result and need not read the row back.
    """
    status = status or TaskStatus(task.status)
    phase = phase_of(status)
    if phase is None:
        raise IllegalTransition(f"task {task.id} is {status}: no phase is running")
    return Handoff(
        task_id=task.id,
        workspace=ws.name,
        phase=phase,
        fence=task.fence if fence is None else fence,
        speculative=task.type == TaskType.PLAN,
        mode=ExecutionMode(ws.execution_mode),
        source_dir=ws.source_dir,
        agent_pool=ws.agent_pool,
        timeout=phase_timeout(settings, ws, phase),
    )


def load_handoff(session: Session, settings: Settings, task_id: int, fence: int) -> Handoff:
    """What an ``execute`` message for (``task_id``, ``fence``) may run.

    Raises :class:`ConcurrentChange` if that claim is no longer current, or
    was started already: the message is late, duplicated or forged.
    """
    row = task_and_workspace(session, task_id)
    if row is None:
        raise ConcurrentChange(f"task {task_id} does not exist")
    task, ws = row
    if task.fence != fence:
        raise ConcurrentChange(f"fence {fence} is stale (task {task_id} holds {task.fence})")
    if phase_of(TaskStatus(task.status)) is None:
        raise ConcurrentChange(f"task {task_id} is {task.status}: no phase to run")
    if task.executor_handle is not None:
        raise ConcurrentChange(f"task {task_id} already started on {task.executor_handle}")
    return handoff_of(settings, task, ws)


def _on(*conditions: ColumnElement[bool]) -> Update:
    """An UPDATE of the claim (``w_id``, ``w_fence``) while its phase runs
    (``w_status``), built once (see scheduler.transitions._cas_update)."""
    return update(TASKS).where(
        TASKS.c.id == bindparam("w_id"),
        TASKS.c.fence == bindparam("w_fence"),
        TASKS.c.status == bindparam("w_status", type_=TASKS.c.status.type),
        *conditions,
    )


_START = (
    _on(
        or_(TASKS.c.executor_handle.is_(None), TASKS.c.executor_handle == bindparam("handle")),
    )
    .values(
        {
            c: bindparam(f"v_{c}", type_=TASKS.c[c].type)
            for c in ("executor_handle", "phase_started_at", "heartbeat_at", "lease_expires_at")
        }
    )
    .returning(TASKS.c.id)
)
_LEASE = ("heartbeat_at", "lease_expires_at")
_RENEW = (
    _on(TASKS.c.executor_handle.is_not(None))
    .values(
        {
            c: bindparam(f"v_{c}", type_=TASKS.c[c].type)
            for c in ("heartbeat_at", "lease_expires_at")
        }
    )
    .returning(
        TASKS.c.cancel_requested_at,
        TASKS.c.cancel_requested_by,
        TASKS.c.cancel_force,
        TASKS.c.phase_started_at,
        TASKS.c.workspace_id,
    )
)


def start(session: Session, settings: Settings, report: Started) -> Reply:
    """The executor began the phase: take the lease, if no one else has."""
    now = utcnow()
    # At most one executor starts a claimed phase: the handle is empty until
    # the first start fills it, so a redelivered or duplicated hand-off finds
    # it taken and must not run. Handles are unique per run, so the same
    # runner retrying a Started whose reply it lost is answered yes again.
    started = (
        session.connection()
        .execute(
            _START,
            {
                "w_id": report.task_id,
                "w_fence": report.fence,
                "w_status": running_status(report.phase),
                "handle": report.handle,
                **{f"v_{k}": v for k, v in start_values(settings, report.handle, now).items()},
            },
        )
        .scalar_one_or_none()
    )
    if started is None:
        return Reply.stale("not running under this fence, or started already")
    return Reply.ok()


def start_values(settings: Settings, handle: str, now: datetime) -> dict[str, object]:
    """The columns a start writes: the executor's handle and a fresh lease."""
    return {
        "executor_handle": handle,
        "phase_started_at": now,
        "heartbeat_at": now,
        "lease_expires_at": now + timedelta(seconds=settings.lease_ttl),
    }


def renew(session: Session, settings: Settings, beat: Heartbeat) -> Reply:
    """Renew the lease and say what the executor should do next."""
    now = utcnow()
    row = (
        session.connection()
        .execute(
            _RENEW,
            {
                "w_id": beat.task_id,
                "w_fence": beat.fence,
                "w_status": running_status(beat.phase),
                "v_heartbeat_at": now,
                "v_lease_expires_at": now + timedelta(seconds=settings.lease_ttl),
            },
        )
        .one_or_none()
    )
    if row is None:
        return Reply.stale("the phase is no longer this executor's (re-claimed or ended)")
    if row.cancel_requested_at is not None:
        directive = Directive.KILL if row.cancel_force else Directive.INTERRUPT
        return Reply(True, directive, f"cancelled by {row.cancel_requested_by}", StopReason.CANCEL)
    ws = session.get_one(Workspace, row.workspace_id)
    limit = phase_timeout(settings, ws, beat.phase)
    if row.phase_started_at is not None and now - row.phase_started_at > timedelta(seconds=limit):
        return Reply(
            True,
            Directive.INTERRUPT,
            f"{beat.phase} timed out after {limit:g}s",
            StopReason.TIMEOUT,
        )
    return Reply.ok()


# ---------------------------------------------------------------- recovery


@dataclass(frozen=True)
class Lost:
    """A running phase that stopped answering, and what became of it."""

    task_id: int
    status: TaskStatus
    handoff: Handoff | None


def lose(
    session: Session,
    settings: Settings,
    task: Task,
    ws: Workspace,
    *,
    actor: str,
    why: str,
    guard_expired_at: datetime | None = None,
) -> Lost:
    """The executor of ``task``'s running phase is gone (or gave it back).

    A plan with retries left is re-claimed under a new fence (the returned
    hand-off is to be sent after commit); anything else ends: ``cancelled``
    if a cancel was requested, else ``failed``. With ``guard_expired_at``,
    the move happens only if the lease is still expired at that instant (no
    heartbeat renewed it since it was read).

    Raises :class:`ConcurrentChange` if the task moved on meanwhile.
    """
    guard = None
    if guard_expired_at is not None:
        guard = Task.lease_expires_at < guard_expired_at
    seen = Seen.of(task, ws)
    if task.cancel_requested_at is not None:
        done = transition(
            session,
            task.id,
            TaskStatus.CANCELLED,
            actor=task.cancel_requested_by or actor,
            reason=f"cancelled; {why}",
            expect={seen.status},
            fence=task.fence,
            guard=guard,
            seen=seen,
        )
        return Lost(task.id, done.to_status, None)
    if seen.status is TaskStatus.PLANNING and task.plan_attempts <= settings.plan_retries:
        done = transition(
            session,
            task.id,
            TaskStatus.PLANNING,
            actor=actor,
            reason=f"{why}; plan re-claimed (attempt {task.plan_attempts + 1} "
            f"of {settings.plan_retries + 1})",
            expect={seen.status},
            fence=task.fence,
            guard=guard,
            seen=seen,
        )
        handoff = handoff_of(settings, task, ws, status=done.to_status, fence=done.fence)
        return Lost(task.id, done.to_status, handoff)
    if seen.status is TaskStatus.PLANNING:
        error = f"{why}; the plan was tried {task.plan_attempts} times"
    else:
        error = f"{why}; the apply was not re-run (terraform apply is not idempotent)"
    done = transition(
        session,
        task.id,
        TaskStatus.FAILED,
        actor=actor,
        reason=why,
        expect={seen.status},
        fence=task.fence,
        guard=guard,
        values={"error": error},
        seen=seen,
    )
    return Lost(task.id, done.to_status, None)


def last_heard(task: Task) -> str:
    """'executor lost: last heard from at ... (handle ...)' for error texts."""
    when = task.heartbeat_at.isoformat(timespec="seconds") if task.heartbeat_at else "never"
    return f"executor lost: last heard from at {when} ({task.executor_handle})"


def resend_due(task: Task, settings: Settings, now: datetime) -> bool:
    """Is another send of ``task``'s unstarted hand-off owed now?"""
    if task.handoff_at is None:
        return True
    backoff = min(
        settings.resend_after * 2 ** max(task.handoff_attempts - 1, 0), MAX_RESEND_BACKOFF
    )
    return now - task.handoff_at >= timedelta(seconds=backoff)


def mark_resent(session: Session, task: Task, now: datetime) -> bool:
    """Count one more send of the hand-off, if it is still unstarted."""
    updated = session.execute(
        update(Task)
        .where(
            Task.id == task.id,
            Task.fence == task.fence,
            Task.status == task.status,
            Task.executor_handle.is_(None),
            Task.handoff_attempts == task.handoff_attempts,
        )
        .values(handoff_at=now, handoff_attempts=Task.handoff_attempts + 1)
        .returning(Task.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    return updated is not None
