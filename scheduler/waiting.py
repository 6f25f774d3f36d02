"""Why a task that is not running waits, in one sentence (``runq show``).

:func:`explain` reads what the dispatcher reads, by its own queries, and
applies its rules (:func:`scheduler.dispatcher._decide`), so the wait it
names is the step that must happen next for the task to move. Kinds:
``queue`` (its place behind the task holding the workspace), ``lock`` (a
manual lock), ``confirmation`` (a plan awaiting ``runq confirm``),
``worker`` (a free worker to take its message from a queue, with the queue's
depth when the publisher can read it), ``agent_capacity`` (no free slot in
its agent pool, as the reconciler's ``_pool_has_room`` sees it) and
``executor_start`` (a handed-off phase no agent or Job has started yet).
A started phase or a finished task waits for nothing: None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from scheduler.dispatcher import holder_query, queue_query
from scheduler.errors import TaskNotFound
from scheduler.messages import QUEUE_DISPATCH, QUEUE_PLANS, QUEUE_RUNS, QueueDepths
from scheduler.models import Task, Workspace, task_and_workspace, utcnow
from scheduler.runtime import Runtime
from scheduler.states import RUNNING, TERMINAL, DispatchMode, ExecutionMode, TaskType, phase_of
from scheduler.states import TaskStatus as S
from scheduler.views import TaskView, _iso, ordinal
from scheduler.views import when as _when

QUEUE, LOCK, CONFIRMATION = "queue", "lock", "confirmation"
WORKER, AGENT_CAPACITY, EXECUTOR_START = "worker", "agent_capacity", "executor_start"


@dataclass(frozen=True)
class Waiting:
    """What a task waits for: a kind, a sentence for people, details for code."""

    kind: str
    sentence: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sentence": self.sentence, "details": self.details}


@dataclass(frozen=True)
class ForWorker:
    """A ``worker`` wait whose queue depth is yet to be read: after the
    session closes (on SQLite a read holds the write lock, and a broker
    round trip should not)."""

    queue: str
    sentence: str
    details: dict[str, Any]

    def finish(self, rt: Runtime) -> Waiting:
        depth, unknown = queue_depth(rt, self.queue)
        if depth is None:
            tail = f"how many wait there is unknown: {unknown}"
        elif depth == 0:
            tail = (
                "none waits there (a worker holds it, or it was lost: the reconciler re-sends it)"
            )
        else:
            tail = f"{depth} message{'s wait' if depth > 1 else ' waits'} there"
        details = {**self.details, "queue": self.queue, "depth": depth, "depth_unknown": unknown}
        return Waiting(WORKER, f"{self.sentence}; {tail}", details)


def queue_depth(rt: Runtime, queue: str) -> tuple[int | None, str | None]:
    """Messages waiting in ``queue``; or None, and why it cannot be said."""
    if not isinstance(rt.publisher, QueueDepths):
        return None, "this client's publisher cannot read queue depths"
    try:
        depth = rt.publisher.depth(queue)
    except Exception as exc:
        return None, f"asking the broker failed ({type(exc).__name__}: {exc})"
    return (depth, None) if depth is not None else (None, "the broker could not be reached")


def show(rt: Runtime, task_id: int) -> tuple[TaskView, Waiting | None]:
    """Task ``task_id`` and what it waits for, read in one session."""
    with rt.sessions() as s:
        row = task_and_workspace(s, task_id)
        if row is None:
            raise TaskNotFound(f"task {task_id} does not exist")
        task, ws = row
        view = TaskView.of(task, ws.name)
        found = explain(rt, s, task, ws)
    return view, found.finish(rt) if isinstance(found, ForWorker) else found


def why(rt: Runtime, task_id: int) -> Waiting | None:
    """What task ``task_id`` waits for; None if it runs or has finished."""
    return show(rt, task_id)[1]


def explain(
    rt: Runtime, s: Session, task: Task, ws: Workspace, now: datetime | None = None
) -> Waiting | ForWorker | None:
    """What ``task`` of ``ws`` (read in ``s``) waits for. A :class:`ForWorker`
    becomes a :class:`Waiting` by its ``finish``, once ``s`` is closed."""
    now = now or utcnow()
    status = S(task.status)
    if status in TERMINAL:
        return None
    if status in RUNNING:
        return None if task.executor_handle is not None else _unstarted(rt, s, task, ws, now)
    if status is S.APPLY_PENDING:
        return _confirmation(task, ws, now)
    legacy = rt.settings.dispatch_mode is DispatchMode.LEGACY
    if status is S.PENDING and task.type == TaskType.PLAN and not legacy:
        return ForWorker(
            QUEUE_PLANS,
            f"waiting for a free worker to claim it from queue {QUEUE_PLANS} "
            "(plans take no workspace lock)",
            {"workspace": ws.name},
        )
    # In legacy mode a lock lets plans by; an apply it always holds back.
    held_by_lock = ws.locked_by is not None and (not legacy or task.type != TaskType.PLAN)
    holder = s.scalars(holder_query(legacy), {"ws_id": ws.id}).first()
    if holder is not None and holder.id != task.id:
        return _queued(task, ws, holder, _ahead(s, task, ws, legacy), held_by_lock, now)
    if status is S.APPLY_QUEUED:  # it holds the workspace: its apply is next
        if held_by_lock:
            return _locked(ws, now, "its apply is confirmed but held back")
        return ForWorker(
            QUEUE_DISPATCH,
            f"confirmed at {_when(_since(task), now)}, its apply is next: waiting for a free "
            f"worker to take workspace {ws.name}'s dispatch from queue {QUEUE_DISPATCH}",
            {"workspace": ws.name},
        )
    if held_by_lock:
        return _locked(ws, now, "queued but held back")
    ahead = _ahead(s, task, ws, legacy)
    if ahead:
        return _queued(task, ws, None, ahead, held_by_lock, now)
    return ForWorker(
        QUEUE_DISPATCH,
        f"first in line in workspace {ws.name}, which nothing holds: waiting for a free "
        f"worker to take its dispatch from queue {QUEUE_DISPATCH}",
        {"workspace": ws.name, "place": 1},
    )


def _unstarted(
    rt: Runtime, s: Session, task: Task, ws: Workspace, now: datetime
) -> Waiting | ForWorker:
    """A claimed phase no executor has started: local, a worker must take
    its execute message; agent, the pool needs a free slot; k8s, the Job."""
    phase = phase_of(S(task.status))
    claimed = f"its {phase} was claimed at {_when(_since(task), now)} but has not started"
    n = task.handoff_attempts
    sent = f"sent {n} time{'s' if n != 1 else ''}"
    details: dict[str, Any] = {"workspace": ws.name, "phase": str(phase), "handoff_attempts": n}
    details["execution_mode"] = ws.execution_mode
    if ws.execution_mode == ExecutionMode.LOCAL:
        return ForWorker(
            QUEUE_RUNS,
            f"{claimed}: waiting for a free worker to take its execute message "
            f"from queue {QUEUE_RUNS}",
            details,
        )
    if ws.execution_mode == ExecutionMode.K8S:
        return Waiting(
            EXECUTOR_START, f"{claimed}: waiting for its Kubernetes Job to start ({sent})", details
        )
    name = ws.agent_pool or ""
    # Imported here: it brings the Kubernetes client, which `runq show`
    # should not wait for unless the task waits on a pool.
    from scheduler import pools

    found = pools.capacity_of(s, rt.settings, name)
    capacity, busy = found or (0, 0)
    missing = "" if found is not None else f" (pool {name} does not exist)"
    details.update(pool=name, capacity=capacity, busy=busy)
    if busy < capacity:
        free = capacity - busy
        return Waiting(
            EXECUTOR_START,
            f"{claimed}: handed to agent pool {name} ({sent}), which has {free} free "
            f"slot{'s' if free > 1 else ''} of {capacity}: waiting for an agent to start it",
            details,
        )
    full = f"every slot is busy ({busy} of {capacity})" if capacity else "no live agent serves it"
    sentence = f"{claimed}: waiting for agent capacity in pool {name}: {full}{missing}"
    return Waiting(AGENT_CAPACITY, sentence, details)


def _confirmation(task: Task, ws: Workspace, now: datetime) -> Waiting:
    changes = f"+{task.changes_add or 0} ~{task.changes_change or 0} -{task.changes_destroy or 0}"
    sentence = (
        f"waiting for confirmation since {_when(_since(task), now)}: its plan would change "
        f"{changes}; `runq confirm {task.id}` applies it, `runq discard {task.id}` drops it"
    )
    if ws.locked_by is not None:
        sentence += f"; workspace {ws.name} is also {_lock_phrase(ws, now)}, which holds the apply"
    since = _iso(_since(task))
    return Waiting(CONFIRMATION, sentence, {"workspace": ws.name, "since": since, **_lock(ws)})


def _locked(ws: Workspace, now: datetime, what: str) -> Waiting:
    return Waiting(
        LOCK,
        f"{what}: workspace {ws.name} is {_lock_phrase(ws, now)}; "
        f"`runq workspace unlock {ws.name}` lets it go",
        {"workspace": ws.name, **_lock(ws)},
    )


def _queued(
    task: Task,
    ws: Workspace,
    holder: Task | None,
    ahead: list[int],
    held_by_lock: bool,
    now: datetime,
) -> Waiting:
    """Behind ``holder`` or the tasks ``ahead`` (their ids, in order)."""
    if task.status == S.APPLY_QUEUED:
        sentence = f"confirmed, its apply waits its turn in workspace {ws.name}"
    else:
        place = ordinal(len(ahead) + 1) if ahead else "next"
        sentence = f"{place} in line in workspace {ws.name}"
    details: dict[str, Any] = {
        "workspace": ws.name,
        "place": len(ahead) + 1,
        "ahead": ahead[:100],
        "ahead_count": len(ahead),
        "holder": None,
        **_lock(ws),
    }
    if holder is not None:
        sentence += f": task {holder.id} ({holder.type}) holds it, {_doing(holder, ws, now)}"
        details["holder"] = {
            "id": holder.id,
            "type": holder.type,
            "status": holder.status,
            "since": _iso(_since(holder)),
        }
    ids = ", ".join(map(str, ahead[:10]))
    if len(ahead) > 10:
        sentence += f"; {len(ahead)} tasks are ahead ({ids}, ...)"
    elif ahead:
        sentence += f"; tasks {ids} are ahead" if len(ahead) > 1 else f"; task {ids} is ahead"
    if held_by_lock:
        sentence += f"; the workspace is also {_lock_phrase(ws, now)}"
    return Waiting(QUEUE, sentence, details)


def _ahead(s: Session, task: Task, ws: Workspace, legacy: bool) -> list[int]:
    """Ids of the queued tasks the dispatcher claims before ``task``, in
    order (:func:`scheduler.dispatcher.queue_query`; in a locked legacy line
    a plan waits only behind plans)."""
    plans_only = legacy and ws.locked_by is not None and task.type == TaskType.PLAN
    line = queue_query(legacy, plans_only).where(Task.queue_seq < task.queue_seq)
    return [t.id for t in s.scalars(line, {"ws_id": ws.id})]


def _doing(task: Task, ws: Workspace, now: datetime) -> str:
    since = _when(_since(task), now)
    if task.status == S.APPLY_PENDING:
        return f"waiting for confirmation since {since}"
    if task.status == S.APPLY_QUEUED:
        held = " (held by the lock)" if ws.locked_by is not None else ""
        return f"confirmed, its apply queued since {since}{held}"
    return f"{task.status} since {since}" + ("" if task.executor_handle else " (not started yet)")


def _lock(ws: Workspace) -> dict[str, Any]:
    lock = {"by": ws.locked_by, "reason": ws.lock_reason, "at": _iso(ws.locked_at)}
    return {"lock": lock if ws.locked_by is not None else None}


def _lock_phrase(ws: Workspace, now: datetime) -> str:
    reason = f' ("{ws.lock_reason}")' if ws.lock_reason else " (no reason given)"
    return f"locked by {ws.locked_by}{reason} since {_when(ws.locked_at, now)}"


def _since(task: Task) -> datetime | None:
    return task.status_changed_at or task.started_at or task.created_at
