"""The reconciler: heals whatever the database says is owed.

Broker messages are hints and can be lost (a publish that failed after
commit, a Redis restart without persistence, a purged queue); workers can die
mid-phase. The database still says what is waiting and who holds what, so
``celery beat`` runs :func:`sweep` every ``RUNQ_RECONCILE_INTERVAL`` seconds:

* re-send ``claim_plan`` for plan tasks pending longer than ``RUNQ_RESEND_AFTER``
  whose hint is in no queue, and ``dispatch`` for every workspace whose next
  step could be taken and has waited as long (see :func:`_owed_hints`);
* re-send the hand-off of claimed phases no executor has started, with
  backoff, and fail them after ``RUNQ_HANDOFF_ATTEMPTS`` sends;
* expire lapsed leases (:func:`scheduler.leases.lose`): re-claim a lost plan,
  fail a lost apply, end a cancelled one;
* fail a phase that ran past its timeout by more than the kill grace plus a
  lease (its executor did not stop it), and discard plans left unconfirmed
  past ``RUNQ_CONFIRM_TIMEOUT``;
* record the sweep in ``service_beats``, so ``runq status`` can say when beat
  stopped.

Two reconcilers at once are safe: every move is a compare-and-set that
re-checks its condition in the UPDATE, so one of them finds nothing to do.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, case, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from executors.base import Handoff
from scheduler import k8s_jobs, leases, messages, pools
from scheduler.errors import ConcurrentChange, IllegalTransition
from scheduler.models import ServiceBeat, Task, UTCDateTime, Workspace, utcnow
from scheduler.runtime import Runtime
from scheduler.states import (
    ACTIVE_APPLY,
    RUNNING,
    DispatchMode,
    ExecutionMode,
    Phase,
    TaskStatus,
    TaskType,
    phase_of,
)
from scheduler.transitions import transition

log = logging.getLogger(__name__)

BEAT = "reconciler"


@dataclass
class Sweep:
    plans: list[int] = field(default_factory=list)
    workspaces: list[str] = field(default_factory=list)
    #: Unstarted hand-offs re-sent, and those that ran out of tries.
    resent: list[int] = field(default_factory=list)
    handoff_failed: list[int] = field(default_factory=list)
    #: Lapsed leases: plans re-claimed, and tasks ended (failed/cancelled).
    reclaimed: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    timed_out: list[int] = field(default_factory=list)
    unconfirmed: list[int] = field(default_factory=list)
    #: Unstarted agent hand-offs left waiting: their pool has no free slot.
    waiting_for_agents: list[int] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return any(v for k, v in asdict(self).items() if k != "waiting_for_agents")

    def summary(self) -> str:
        """One line for the Celery task's result (what Flower shows)."""
        done = [f"{k.replace('_', ' ')} {len(v)}" for k, v in asdict(self).items() if v]
        return ", ".join(done) or "nothing owed"


def sweep(rt: Runtime) -> Sweep:
    now = utcnow()
    out = Sweep()
    handoffs: list[Handoff] = []
    _expire_leases(rt, now, out, handoffs)
    _resend_unstarted(rt, now, out, handoffs)
    _enforce_timeouts(rt, now, out)
    out.lost += k8s_jobs.watch(rt)  # Jobs that ended or vanished without reporting
    _expire_confirmations(rt, now, out)
    out.plans, out.workspaces = _owed_hints(rt, now)

    from scheduler.dispatcher import hand_off

    for handoff in handoffs:
        hand_off(rt, handoff)  # a failed send is counted; the next sweep retries
    hints = [messages.claim_plan(i) for i in out.plans]
    hints += [messages.dispatch(name) for name in out.workspaces]
    _publish(rt, hints)
    with rt.transaction() as s:
        _record_beat(s, now, out)
    if out.busy:
        log.info(
            "reconciler: %s",
            out.summary(),
            extra={"action": "reconcile", **asdict(out)},
        )
    return out


def _publish(rt: Runtime, hints: list[messages.Message]) -> None:
    """Send every hint; with the broker down, say so once and go on (the
    sweep is still recorded: beat is alive, the broker is not)."""
    failed = 0
    for hint in hints:
        try:
            rt.publisher.publish(hint)
        except Exception as exc:
            failed += 1
            error = exc
    if failed:
        log.error(
            "reconciler: %d of %d hints not sent (%s: %s); the next sweep tries again",
            failed,
            len(hints),
            type(error).__name__,
            error,
            extra={"action": "reconcile_publish_failed"},
        )


def _running(s: Session, *conditions: object) -> list[tuple[Task, Workspace]]:
    rows = s.execute(
        select(Task, Workspace)
        .join(Workspace, Workspace.id == Task.workspace_id)
        .where(Task.status.in_([str(x) for x in RUNNING]), *conditions)  # type: ignore[arg-type]
        .order_by(Task.id)
    ).all()
    return [(t, w) for t, w in rows]


def _expire_leases(rt: Runtime, now: datetime, out: Sweep, handoffs: list[Handoff]) -> None:
    with rt.sessions() as s:
        lapsed = _running(s, Task.lease_expires_at < now)
    for task, ws in lapsed:
        # Before lose(): a re-claim refreshes ``task``, whose executor and
        # last heartbeat are then the new claim's (none yet).
        why = leases.last_heard(task)
        try:
            with rt.transaction() as s:
                s.add(task)
                lost = leases.lose(
                    s, rt.settings, task, ws, actor=rt.actor, why=why, guard_expired_at=now
                )
        except (ConcurrentChange, IllegalTransition):
            continue  # a heartbeat, a report or another reconciler got there first
        if lost.handoff is not None:
            out.reclaimed.append(task.id)
            handoffs.append(lost.handoff)
        else:
            out.lost.append(task.id)
        log.warning(
            "task %s: %s; now %s",
            task.id,
            why,
            lost.status,
            extra={"action": "lease_expired", "task_id": task.id, "status": str(lost.status)},
        )


def _resend_unstarted(rt: Runtime, now: datetime, out: Sweep, handoffs: list[Handoff]) -> None:
    cutoff = now - timedelta(seconds=rt.settings.resend_after)
    with rt.sessions() as s:
        unstarted = _running(
            s,
            Task.executor_handle.is_(None),
            or_(Task.handoff_at < cutoff, Task.handoff_at.is_(None)),
        )
    room: dict[str, bool] = {}
    for task, ws in unstarted:
        if not leases.resend_due(task, rt.settings, now):
            continue
        if ws.execution_mode == ExecutionMode.AGENT and not _pool_has_room(rt, ws, room):
            # Waiting for agent capacity is not a failed hand-off: the message
            # waits in the pool's queue, and is neither re-sent (it would only
            # queue again) nor counted towards RUNQ_HANDOFF_ATTEMPTS.
            out.waiting_for_agents.append(task.id)
            continue
        try:
            with rt.transaction() as s:
                if task.handoff_attempts >= rt.settings.handoff_attempts:
                    error = (
                        f"hand-off failed: no {ws.execution_mode} executor started the "
                        f"{phase_of(TaskStatus(task.status))} after {task.handoff_attempts} sends"
                    )
                    transition(
                        s,
                        task.id,
                        TaskStatus.FAILED,
                        actor=rt.actor,
                        reason="hand-off failed",
                        expect={TaskStatus(task.status)},
                        fence=task.fence,
                        guard=Task.executor_handle.is_(None),
                        values={"error": error},
                    )
                    out.handoff_failed.append(task.id)
                    continue
                if not leases.mark_resent(s, task, now):
                    continue
        except (ConcurrentChange, IllegalTransition):
            continue
        out.resent.append(task.id)
        handoffs.append(leases.handoff_of(rt.settings, task, ws))


def _pool_has_room(rt: Runtime, ws: Workspace, room: dict[str, bool]) -> bool:
    """Has ``ws``'s pool a live agent with a free slot? (Once per sweep.)"""
    name = ws.agent_pool or ""
    if name not in room:
        with rt.sessions() as s:
            capacity, busy = pools.capacity_of(s, rt.settings, name) or (0, 0)
        room[name] = busy < capacity
        if capacity == 0:
            # Not an error (agents may come), but nothing runs until they do.
            log.warning(
                "agent pool %s has no live agent: its hand-offs wait",
                name,
                extra={"action": "pool_without_agents", "pool": name},
            )
    return room[name]


def _enforce_timeouts(rt: Runtime, now: datetime, out: Sweep) -> None:
    """The executor enforces timeouts; this is the backstop for one that is
    alive (it heartbeats) yet did not stop terraform."""
    settings = rt.settings
    slack = timedelta(seconds=settings.kill_grace + settings.lease_ttl)
    with rt.sessions() as s:
        started = _running(s, Task.phase_started_at.is_not(None))
    for task, ws in started:
        phase = phase_of(TaskStatus(task.status))
        assert phase is not None and task.phase_started_at is not None
        limit = leases.phase_timeout(settings, ws, phase)
        if now - task.phase_started_at <= timedelta(seconds=limit) + slack:
            continue
        try:
            with rt.transaction() as s:
                transition(
                    s,
                    task.id,
                    TaskStatus.FAILED,
                    actor=rt.actor,
                    reason="timed out",
                    expect={TaskStatus(task.status)},
                    fence=task.fence,
                    values={
                        "error": f"{phase} timed out after {limit:g}s and its executor "
                        f"({task.executor_handle}) did not stop it"
                        + ("; the apply was not re-run" if phase is Phase.APPLY else "")
                    },
                )
        except (ConcurrentChange, IllegalTransition):
            continue
        out.timed_out.append(task.id)


def _expire_confirmations(rt: Runtime, now: datetime, out: Sweep) -> None:
    limit = rt.settings.confirm_timeout
    if not limit:
        return
    cutoff = now - timedelta(seconds=limit)
    with rt.sessions() as s:
        stale = list(
            s.scalars(
                select(Task.id).where(
                    Task.status == TaskStatus.APPLY_PENDING, Task.status_changed_at < cutoff
                )
            )
        )
    for task_id in stale:
        try:
            with rt.transaction() as s:
                transition(
                    s,
                    task_id,
                    TaskStatus.DISCARDED,
                    actor=rt.actor,
                    reason=f"not confirmed within {limit:g}s (RUNQ_CONFIRM_TIMEOUT)",
                    expect={TaskStatus.APPLY_PENDING},
                )
        except (ConcurrentChange, IllegalTransition):
            continue
        out.unconfirmed.append(task_id)


def _owed_hints(rt: Runtime, now: datetime) -> tuple[list[int], list[str]]:
    """The hints really owed: O(what was lost), not O(what is queued).

    Re-sending a hint for every task that has waited long would, behind a
    backlog, re-publish the whole backlog every sweep (60k messages each 30 s
    at a 50k-task backlog), each one a wasted round trip for a worker.
    """
    cutoff = now - timedelta(seconds=rt.settings.resend_after)
    with rt.sessions() as s:
        plans = _owed_plans(rt, s, cutoff)
        workspaces = _owed_dispatches(rt, s)
    return plans, workspaces


def _owed_plans(rt: Runtime, s: Session, cutoff: datetime) -> list[int]:
    """Pending plans whose ``claim_plan`` is in no queue.

    Every pending plan had one published; those still queued are counted by
    the broker. If the plans queue holds ``d`` messages and ``p`` plans are
    pending, at least ``p - d`` hints were lost, and the oldest pending plans
    are the likeliest (the queue is consumed in order, so what is left in it
    is the newest). Stale duplicates in the queue hide a loss only until
    workers drain them, which is quick: each is a read that finds the plan
    taken. A broker that cannot say how deep the queue is (None) is taken
    for an empty one: every plan waiting past ``RUNQ_RESEND_AFTER`` is sent.
    """
    if rt.settings.dispatch_mode is DispatchMode.LEGACY:
        return []  # every task waits in its workspace's line: dispatch hints
    is_plan = (Task.type == TaskType.PLAN, Task.status == TaskStatus.PENDING)
    pending = s.scalar(select(func.count()).select_from(Task).where(*is_plan)) or 0
    if not pending:
        return []
    owed = pending - _depth(rt, messages.QUEUE_PLANS)
    if owed <= 0:
        return []
    return list(
        s.scalars(
            select(Task.id).where(*is_plan, Task.created_at < cutoff).order_by(Task.id).limit(owed)
        )
    )


def _owed_dispatches(rt: Runtime, s: Session) -> list[str]:
    """Workspaces whose next step could be taken now, and whose wake-up is
    in no queue.

    A workspace busy with an active plan+apply owes nothing however long its
    queue: its next step comes when the active one ends, whose commit wakes
    the dispatcher. Only a workspace with a claimable step (a confirmed
    apply, or a head of queue with nothing active) may have lost its
    wake-up. If ``c`` workspaces are claimable and the dispatch queue holds
    ``d`` messages, the ``c - d`` that have waited longest are sent one.

    The limit: should the dispatch queue hold at least ``c`` messages at
    every sweep (submits outpacing the dispatchers), a lost wake-up waits
    until it drains. Dispatching is a few milliseconds, so the queue drains
    unless workers are missing, which ``runq status`` shows.
    """
    legacy = rt.settings.dispatch_mode is DispatchMode.LEGACY
    holders = ACTIVE_APPLY | RUNNING if legacy else ACTIVE_APPLY
    t, other = aliased(Task), aliased(Task)
    same_line = [] if legacy else [other.type == TaskType.PLAN_AND_APPLY]
    mine = [] if legacy else [t.type == TaskType.PLAN_AND_APPLY]
    held = exists().where(
        other.workspace_id == t.workspace_id,
        other.status.in_([str(x) for x in holders]),
        *same_line,
    )
    head_waits = and_(t.status == TaskStatus.PENDING, ~held)
    # Waiting since: a confirmed apply since its confirmation, a head since
    # it was submitted.
    since = func.min(
        case((t.status == TaskStatus.APPLY_QUEUED, t.status_changed_at), else_=t.created_at),
        type_=UTCDateTime(),
    )
    query = (
        select(Workspace.name, since)
        .join(t, t.workspace_id == Workspace.id)
        .where(
            or_(t.status == TaskStatus.APPLY_QUEUED, head_waits),
            *mine,
            # A manual lock holds back plan+apply only; legacy plans still go.
            or_(Workspace.locked_by.is_(None), t.type == TaskType.PLAN),
        )
        .group_by(Workspace.name)
    )
    claimable = sorted(s.execute(query).all(), key=lambda row: (row[1], row[0]))
    owed = len(claimable) - _depth(rt, messages.QUEUE_DISPATCH)
    return sorted(name for name, _ in claimable[: max(owed, 0)])


def _depth(rt: Runtime, queue: str) -> int:
    """Messages waiting in ``queue``; 0 if the publisher cannot say (then
    everything owed by the database is taken to be lost)."""
    if isinstance(rt.publisher, messages.QueueDepths):
        return rt.publisher.depth(queue) or 0
    return 0


def _record_beat(s: Session, now: datetime, out: Sweep) -> None:
    detail = json.dumps({k: len(v) for k, v in asdict(out).items()})
    updated = s.execute(
        update(ServiceBeat).where(ServiceBeat.name == BEAT).values(at=now, detail=detail)
    )
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        try:
            with s.begin_nested():
                s.add(ServiceBeat(name=BEAT, at=now, detail=detail))
        except IntegrityError:
            pass  # another reconciler's first sweep inserted it just now


def last_sweep(rt: Runtime) -> ServiceBeat | None:
    with rt.sessions() as s:
        return s.get(ServiceBeat, BEAT)
