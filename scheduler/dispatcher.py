"""Claiming work and handing it off.

Two paths, by task type:

* :func:`claim_plan` (plan tasks, new mode): no lock. One conditional UPDATE
  moves the task from ``pending`` to ``planning``; a duplicate or late message
  finds it already moved and does nothing.
* :func:`dispatch` (plan+apply tasks; every task in legacy mode): under the
  workspace's Redis lock, re-read the workspace from the database and take the
  one step it allows: claim the apply of a confirmed run, or claim the head of
  the FIFO queue if nothing is active and no manual lock holds it. The claim
  is a conditional UPDATE that also bumps the fencing token; the partial
  unique index refuses a second active plan+apply even if the lock lied.

Either way the hand-off happens after the claim commits. A hand-off that
fails (the broker is down) is not fatal: the claim stays, unstarted, and the
reconciler re-sends it under the same fence (see :mod:`scheduler.leases`).

No dispatcher ever waits for the workspace lock. One that finds it busy marks
the workspace *dirty* and leaves; the holder looks at the mark after it
releases the lock and runs once more. So a wake-up is never lost, and a
paused lock holder pins no other process (it costs its own workspace, until
the lock's TTL and PostgreSQL's session timeouts free it).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from executors import launcher_for
from executors.base import Bundle, Handoff
from scheduler import bundles, leases, workspaces
from scheduler.errors import ConcurrentChange
from scheduler.locks import workspace_lock
from scheduler.models import Task, Workspace, task_and_workspace, utcnow
from scheduler.runtime import Runtime
from scheduler.states import (
    ACTIVE_APPLY,
    RUNNING,
    DispatchMode,
    ExecutionMode,
    TaskStatus,
    TaskType,
)
from scheduler.transitions import Seen, transition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What one dispatch (or plan claim) did, for logs and tests."""

    workspace: str
    #: claimed_plan | claimed_apply | skipped | lock_busy
    action: str
    reason: str
    task_id: int | None = None
    fence: int | None = None
    #: A plan claimed to run in the claiming worker (claim_plan's
    #: ``start_as``): its bundle, or why it can never run.
    bundle: Bundle | None = field(default=None, repr=False, compare=False)
    unrunnable: bundles.Unrunnable | None = field(default=None, repr=False, compare=False)

    @property
    def claimed(self) -> bool:
        return self.action.startswith("claimed")

    def summary(self) -> str:
        """One line for the Celery task's result (what Flower shows, beside
        the arguments, which name the workspace)."""
        task = f" task {self.task_id}" if self.task_id is not None else ""
        fence = f", fence {self.fence}" if self.fence is not None and self.claimed else ""
        return f"{self.action.replace('_', ' ')}{task}{fence} ({self.reason})"


def _log(decision: Decision, verb: str = "dispatch", lock: str = "none") -> Decision:
    """One line per decision: lock state, what was done, and why."""
    log.info(
        "%s %s [lock %s]: %s%s (%s)",
        verb,
        decision.workspace,
        lock,
        decision.action,
        f" task {decision.task_id}" if decision.task_id is not None else "",
        decision.reason,
        extra={
            "action": f"{verb}_{decision.action}",
            "workspace": decision.workspace,
            "task_id": decision.task_id,
            "reason": decision.reason,
            "lock": lock,
            "fence": decision.fence,
        },
    )
    return decision


#: A Redis hash: dispatch decisions by outcome (``runq metrics`` reads it).
#: Decisions leave no row in the database, and Redis is shared by every
#: worker, so the count is the cluster's.
DISPATCH_COUNTS_KEY = "runq:metrics:dispatch"


def _count(rt: Runtime, outcome: str) -> None:
    """Count a dispatch outcome for the metrics. Never fails a dispatch."""
    try:
        rt.redis.hincrby(DISPATCH_COUNTS_KEY, outcome, 1)
    except Exception as exc:
        log.debug("metrics: dispatch count not written (%s: %s)", type(exc).__name__, exc)


def _claim(
    rt: Runtime,
    s: Session,
    task: Task,
    ws: Workspace,
    to: TaskStatus,
    reason: str,
    values: dict[str, object] | None = None,
) -> Handoff:
    """Claim ``task`` as read in this transaction: one conditional UPDATE.
    :class:`ConcurrentChange` if it moved on since (another claimer or a
    cancel committed first: a lost race, not an error)."""
    done = transition(
        s, task.id, to, actor=rt.actor, reason=reason, seen=Seen.of(task, ws), values=values
    )
    return leases.handoff_of(rt.settings, task, ws, status=to, fence=done.fence)


def hand_off(rt: Runtime, handoff: Handoff) -> None:
    """Give a committed claim to its executor. If that fails, the claim stays
    and the reconciler re-sends it (a bounded number of times)."""
    try:
        handle = launcher_for(rt, handoff.mode).launch(handoff)
    except Exception as exc:
        log.error(  # noqa: TRY400 - one line; the traceback only at DEBUG
            "task %s: hand-off of fence %s to the %s executor failed (%s: %s); "
            "the reconciler will re-send it",
            handoff.task_id,
            handoff.fence,
            handoff.mode,
            type(exc).__name__,
            exc,
            exc_info=log.isEnabledFor(logging.DEBUG),
            extra={"action": "handoff_failed", "task_id": handoff.task_id},
        )
        return
    log.info(
        "task %s %s phase handed to %s (%s)",
        handoff.task_id,
        handoff.phase,
        handoff.mode,
        handle,
        extra={"action": "handed_off", "task_id": handoff.task_id, "handle": handle},
    )


def claim_plan(rt: Runtime, task_id: int, *, start_as: str | None = None) -> Decision:
    """Claim plan task ``task_id`` by id, with no lock, and hand it off.

    With ``start_as`` (an executor handle), a plan of a local-mode workspace
    is not handed off: the caller runs it itself. The claim starts it under
    that handle in the same UPDATE, and the returned decision carries its
    bundle, read in the same transaction (or, if it can never run,
    :class:`~scheduler.bundles.Unrunnable` to end it with). One transaction
    and no broker hop between the claim and terraform.
    """

    def skip(workspace: str, reason: str) -> Decision:
        return _log(Decision(workspace, "skipped", reason, task_id), verb="claim")

    bundle: Bundle | None = None
    unrunnable: bundles.Unrunnable | None = None
    with rt.transaction() as s:
        row = task_and_workspace(s, task_id)
        if row is None:
            return skip("?", f"task {task_id} does not exist")
        task, ws = row
        legacy = rt.settings.dispatch_mode is DispatchMode.LEGACY
        if not legacy and task.type != TaskType.PLAN:
            return skip(ws.name, "not a plan task")
        if task.status != TaskStatus.PENDING:
            return skip(ws.name, f"already {task.status} (late or duplicate)")
        handle = start_as if ws.execution_mode == ExecutionMode.LOCAL else None
        here = handle is not None
        if not legacy:
            values = leases.start_values(rt.settings, handle, utcnow()) if handle else None
            try:
                handoff = _claim(rt, s, task, ws, TaskStatus.PLANNING, "plan claimed", values)
            except ConcurrentChange as exc:
                return skip(ws.name, f"lost race: {exc}")
            if handle is not None:
                try:
                    bundle = bundles.of(s, rt.settings, task, ws, handoff)
                    bundle = replace(bundle, started=handle)
                except bundles.Unrunnable as exc:
                    unrunnable = exc  # the claim stands: the caller ends it, saying why
    if legacy:
        # A claim sent before a switch to legacy mode, where every task waits
        # its turn in the workspace: the hint goes to the dispatcher instead.
        return dispatch(rt, ws.name)
    if not here:
        hand_off(rt, handoff)
    return _log(
        Decision(
            ws.name,
            "claimed_plan",
            "plan tasks take no lock" + ("; runs here" if here else ""),
            task_id,
            handoff.fence,
            bundle=bundle,
            unrunnable=unrunnable,
        ),
        verb="claim",
    )


#: Passes one dispatch makes while others keep marking the workspace dirty;
#: past it, the last marker's message (or the reconciler) carries on.
MAX_PASSES = 10


def dispatch(rt: Runtime, workspace: str) -> Decision:
    """Take the next step for ``workspace`` under its Redis lock.

    Returns what this call did: its latest claim if any pass claimed (a pass
    re-run for a dirty mark usually finds the workspace busy with that very
    claim), else its last decision.
    """
    decision = Decision(workspace, "lock_busy", "another dispatcher holds the lock")
    result = decision
    for _ in range(MAX_PASSES):
        with workspace_lock(rt.redis, workspace, ttl=rt.settings.lock_ttl) as held:
            if not held:
                # The holder re-runs when it sees the mark: nothing is lost.
                _log(decision, lock="busy; marked dirty")
                _count(rt, decision.action)
                return result
            decision = _dispatch_held(rt, workspace)
        _count(rt, decision.action)
        if decision.claimed or not result.claimed:
            result = decision
        if not held.was_dirty:
            return result
        _log(decision, lock="held; dirty, once more")
        _count(rt, "dirty_rerun")
    return result


def _dispatch_held(rt: Runtime, workspace: str) -> Decision:
    try:
        with rt.transaction() as s:
            decision, handoff = _decide(rt, s, workspace)
    except ConcurrentChange as exc:
        # The database guard refused a claim another dispatcher won.
        return _log(Decision(workspace, "skipped", f"lost race: {exc}"), lock="held")
    if handoff is not None:
        hand_off(rt, handoff)
    return _log(decision, lock="held")


def _decide(rt: Runtime, s: Session, workspace: str) -> tuple[Decision, Handoff | None]:
    ws = workspaces.find(s, workspace)
    if ws is None:
        return Decision(workspace, "skipped", "no such workspace"), None
    legacy = rt.settings.dispatch_mode is DispatchMode.LEGACY

    # Re-read under the lock: what holds the workspace right now?
    active = s.scalars(holder_query(legacy), {"ws_id": ws.id}).first()

    if active is not None:
        if active.status != TaskStatus.APPLY_QUEUED:
            return Decision(ws.name, "skipped", f"busy: task {active.id} is {active.status}"), None
        if ws.locked_by is not None:
            return Decision(
                ws.name, "skipped", f"apply of task {active.id} held by lock of {ws.locked_by}"
            ), None
        handoff = _claim(rt, s, active, ws, TaskStatus.APPLYING, "apply claimed")
        reason = "re-read: apply_queued (confirmed)"
        return Decision(ws.name, "claimed_apply", reason, active.id, handoff.fence), handoff

    if ws.locked_by is not None and not legacy:
        # A manual lock holds back plan+apply tasks only; in legacy mode the
        # plans queued in the same line may still go.
        return Decision(ws.name, "skipped", f"workspace locked by {ws.locked_by}"), None
    plans_only = legacy and ws.locked_by is not None
    head = s.scalars(_head_query(legacy, plans_only), {"ws_id": ws.id}).first()
    if head is None:
        return Decision(ws.name, "skipped", "queue empty"), None
    handoff = _claim(rt, s, head, ws, TaskStatus.PLANNING, "head of queue claimed")
    reason = f"re-read: pending, head of queue (position {head.queue_seq})"
    return Decision(ws.name, "claimed_plan", reason, head.id, handoff.fence), handoff


# The dispatcher's reads, one per mode, built once (see
# scheduler.models.task_and_workspace); the workspace is ``ws_id``.


@functools.cache
def holder_query(legacy: bool) -> Select[Task]:
    """The task that holds the workspace: in the new mode the active
    plan+apply; in legacy mode any running or active task."""
    holding = ACTIVE_APPLY | RUNNING if legacy else ACTIVE_APPLY
    q = select(Task).where(
        Task.workspace_id == bindparam("ws_id"), Task.status.in_([str(x) for x in holding])
    )
    if not legacy:
        q = q.where(Task.type == TaskType.PLAN_AND_APPLY)
    return q.order_by(Task.queue_seq).limit(1)


@functools.cache
def queue_query(legacy: bool, plans_only: bool) -> Select[Task]:
    """The workspace's queue in the order the dispatcher claims it: pending
    plan+applies (in legacy mode, every pending task, or only plans if
    ``plans_only``: a manual lock lets plans by). ``runq show`` and
    ``runq workspace show`` read the same line."""
    q = select(Task).where(
        Task.workspace_id == bindparam("ws_id"), Task.status == TaskStatus.PENDING
    )
    if not legacy:
        q = q.where(Task.type == TaskType.PLAN_AND_APPLY)
    elif plans_only:
        q = q.where(Task.type == TaskType.PLAN)
    return q.order_by(Task.queue_seq)


@functools.cache
def _head_query(legacy: bool, plans_only: bool) -> Select[Task]:
    """The head of the workspace's queue (see :func:`queue_query`)."""
    return queue_query(legacy, plans_only).limit(1)
