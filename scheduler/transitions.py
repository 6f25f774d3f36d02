"""The one function that changes a task's status.

Each call is a compare-and-set: read the row, check the move against
:data:`scheduler.states.TRANSITIONS`, then ``UPDATE ... WHERE id = :id AND
status = :seen AND fence = :seen_fence``. Zero rows updated means another
actor moved the task in between (:class:`ConcurrentChange`); the caller's
transaction is untouched and nothing was written. An event row is inserted in
the same transaction as the change.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ClauseElement,
    ColumnElement,
    Table,
    Update,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scheduler import outbox
from scheduler.errors import ConcurrentChange, IllegalTransition, StaleFence, TaskNotFound
from scheduler.models import Task, TaskEvent, UTCDateTime, Workspace, utcnow
from scheduler.states import (
    ACTIVE_APPLY,
    CLAIMS,
    RUNNING,
    TERMINAL,
    TaskStatus,
    TaskType,
    allowed,
)


@dataclass(frozen=True)
class Seen:
    """What a caller read of a task (in its current transaction), so that
    :func:`transition` need not read the row again. The UPDATE still
    compares status and fence, so a stale ``Seen`` changes nothing and
    raises :class:`ConcurrentChange`."""

    task_id: int
    status: TaskStatus
    type: TaskType
    fence: int
    workspace_id: int
    workspace: str

    @classmethod
    def of(cls, task: Task, ws: Workspace) -> Seen:
        return cls(
            task.id, TaskStatus(task.status), TaskType(task.type), task.fence, ws.id, ws.name
        )


@dataclass(frozen=True)
class Transition:
    """A committed (or about to be committed) status change."""

    task_id: int
    workspace_id: int
    workspace: str
    type: TaskType
    from_status: TaskStatus
    to_status: TaskStatus
    fence: int
    at: datetime


def transition(
    session: Session,
    task_id: int,
    to: TaskStatus,
    *,
    actor: str,
    reason: str | None = None,
    expect: Collection[TaskStatus] | None = None,
    fence: int | None = None,
    guard: ColumnElement[bool] | None = None,
    values: Mapping[str, Any] | None = None,
    seen: Seen | None = None,
) -> Transition:
    """Move task ``task_id`` to ``to``; return what happened.

    ``expect``: the statuses the caller believes the task is in (a confirm
    expects ``apply_pending``); anything else is an :class:`IllegalTransition`.
    ``fence``: an executor's report must hold the current fencing token, else
    :class:`StaleFence`. ``guard``: an extra condition the row must still meet
    at the moment of the UPDATE (the reconciler expires a lease only if no
    heartbeat renewed it since it looked). ``values``: other columns written
    by the same UPDATE (plan summary, error message).

    A claim (:data:`CLAIMS`) hands out a new fencing token, which invalidates
    every report from earlier holders, and starts a fresh lease: no executor
    has started the new phase yet, and its hand-off is sent now. Leaving a
    running status ends the lease.

    ``seen``: the row as the caller has just read it, to save reading it
    again (see :class:`Seen`).

    Raises :class:`TaskNotFound`, :class:`IllegalTransition`,
    :class:`StaleFence` or :class:`ConcurrentChange` (also when the partial
    unique index refuses a second active plan+apply), having written nothing.
    """
    if seen is None:
        seen = _read(session, task_id)
    elif seen.task_id != task_id:
        raise ValueError(f"seen is task {seen.task_id}, not {task_id}")
    current, task_type = seen.status, seen.type

    if fence is not None and seen.fence != fence:
        raise StaleFence(f"task {task_id}: report holds fence {fence}, the task holds {seen.fence}")
    if (expect is not None and current not in expect) or to not in allowed(task_type, current):
        raise IllegalTransition(f"task {task_id} ({task_type}) is {current}; it cannot become {to}")

    now = utcnow()
    plain, bumped = _columns(current, to, now)
    plain.update(values or {})
    bumped -= plain.keys()  # a caller's value wins over the default bump
    params = {"w_id": task_id, "w_status": current, "w_fence": seen.fence, "now": now}
    if guard is None and not any(isinstance(v, ClauseElement) for v in plain.values()):
        stmt = _cas_update(tuple(sorted(plain)), tuple(sorted(bumped)))
        params.update({f"v_{k}": v for k, v in plain.items()})
    else:  # a guard or a value computed in SQL: a one-off shape, built for this call
        exprs = {k: v for k, v in plain.items() if isinstance(v, ClauseElement)}
        binds = {k: v for k, v in plain.items() if k not in exprs}
        stmt = _cas_update.__wrapped__(tuple(sorted(binds)), tuple(sorted(bumped)), guard)
        stmt = stmt.values(exprs)
        params.update({f"v_{k}": v for k, v in binds.items()})
    # Only a plan+apply entering the active set can hit the partial unique
    # index (a second active plan+apply in its workspace). A refused
    # statement aborts a PostgreSQL transaction, so that one UPDATE runs in
    # a savepoint and a lost claim leaves the caller's transaction usable;
    # any other UPDATE cannot raise it and is spared the two round trips.
    may_conflict = (
        task_type is TaskType.PLAN_AND_APPLY and current not in ACTIVE_APPLY and to in ACTIVE_APPLY
    )
    # Core statements on the session's connection: the ORM's bulk-UPDATE
    # path costs more Python than the round trip. Pending ORM changes are
    # flushed first, as session.execute() would have.
    session.flush()
    try:
        if may_conflict:
            with session.begin_nested():
                new_fence_value = session.connection().execute(stmt, params).scalar_one_or_none()
        else:
            new_fence_value = session.connection().execute(stmt, params).scalar_one_or_none()
    except IntegrityError as exc:
        raise ConcurrentChange(
            f"task {task_id}: another plan+apply is active in its workspace"
        ) from exc
    if new_fence_value is None:
        raise ConcurrentChange(f"task {task_id} changed while moving it to {to}")

    # A Core INSERT: the ORM's unit of work would add a flush and a
    # RETURNING for an id nobody reads.
    session.connection().execute(
        _EVENT_INSERT,
        {
            "task_id": task_id,
            "from_status": current,
            "to_status": to,
            "actor": actor,
            "reason": reason,
            "fence": new_fence_value,
            "at": now,
        },
    )
    done = Transition(
        task_id, seen.workspace_id, seen.workspace, task_type, current, to, new_fence_value, now
    )
    outbox.record_transition(session, done)
    return done


def _columns(current: TaskStatus, to: TaskStatus, now: datetime) -> tuple[dict[str, Any], set[str]]:
    """What moving from ``current`` to ``to`` writes besides the status: the
    values, and the columns computed in SQL from their old value (see
    :data:`_BUMPS`)."""
    plain: dict[str, Any] = {"status": to, "status_changed_at": now}
    bumped: set[str] = set()
    if to is TaskStatus.PLANNING:
        bumped.add("started_at")  # the first claim's time; a cancelled task never started
    if to in TERMINAL:
        plain["finished_at"] = now
    if (current, to) in CLAIMS:
        bumped.add("fence")
        plain.update(
            executor_handle=None,
            phase_started_at=None,
            heartbeat_at=None,
            lease_expires_at=None,
            handoff_at=now,
            handoff_attempts=1,
        )
        if to is TaskStatus.PLANNING:
            bumped.add("plan_attempts")
    elif to not in RUNNING:
        plain["lease_expires_at"] = None
    return plain, bumped


TASKS = cast(Table, Task.__table__)
#: Columns a transition computes from their old value (``now``: its time).
_BUMPS: dict[str, ColumnElement[Any]] = {
    "fence": TASKS.c.fence + 1,
    "plan_attempts": TASKS.c.plan_attempts + 1,
    "started_at": func.coalesce(TASKS.c.started_at, bindparam("now", type_=UTCDateTime())),
}
_EVENT_INSERT = insert(cast(Table, TaskEvent.__table__))


@functools.lru_cache(maxsize=128)
def _cas_update(
    plain: tuple[str, ...], bumped: tuple[str, ...], guard: ColumnElement[bool] | None = None
) -> Update:
    """The compare-and-set UPDATE for one shape of values, built once.

    Built per call, the statement cost more Python to execute (SQLAlchemy
    derives a cache key from every new statement tree) than its round trip
    takes; a transition has a handful of shapes. Values travel as parameters
    ``v_<column>``; the row is matched on ``w_id``, ``w_status``, ``w_fence``.
    """
    conditions = [
        TASKS.c.id == bindparam("w_id"),
        TASKS.c.status == bindparam("w_status", type_=TASKS.c.status.type),
        TASKS.c.fence == bindparam("w_fence"),
    ]
    if guard is not None:
        conditions.append(guard)
    sets: dict[str, Any] = {k: bindparam(f"v_{k}", type_=TASKS.c[k].type) for k in plain}
    sets.update({k: _BUMPS[k] for k in bumped})
    return update(TASKS).where(*conditions).values(sets).returning(TASKS.c.fence)


def _read(session: Session, task_id: int) -> Seen:
    row = session.execute(
        select(Task.status, Task.type, Task.fence, Task.workspace_id, Workspace.name)
        .join(Workspace, Workspace.id == Task.workspace_id)
        .where(Task.id == task_id)
    ).one_or_none()
    if row is None:
        raise TaskNotFound(f"task {task_id} does not exist")
    return Seen(
        task_id, TaskStatus(row.status), TaskType(row.type), row.fence, row.workspace_id, row.name
    )
