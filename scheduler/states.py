"""The task state machine: one table of legal transitions.

Every status change in runq goes through :func:`scheduler.transitions.transition`,
which consults :data:`TRANSITIONS` and performs the change as one
compare-and-set UPDATE. Nothing else writes ``tasks.status``.

plan task::

    pending -> planning -> success | failed | cancelled
    planning -> planning    (executor lost: re-claimed under a new fence)
    pending -> cancelled

plan+apply task::

    pending -> planning -> success          (plan had no changes)
                        -> apply_pending    (changes, waiting for a human)
                        -> apply_queued     (changes, workspace auto-applies)
                        -> failed
    apply_pending -> apply_queued (confirm) | discarded (discard) | cancelled
    apply_queued  -> applying (dispatcher claims the apply) | cancelled
    applying      -> applied | failed | cancelled
    planning      -> planning (executor lost: the plan re-claimed, new fence)
                  -> cancelled
    pending       -> cancelled

An apply is never re-claimed: a lost apply fails (terraform apply is not
idempotent), and the workspace moves on.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from scheduler.errors import InvalidInput


class TaskType(StrEnum):
    PLAN = "plan"
    PLAN_AND_APPLY = "plan_and_apply"


class TaskStatus(StrEnum):
    PENDING = "pending"
    PLANNING = "planning"
    SUCCESS = "success"
    APPLY_PENDING = "apply_pending"
    APPLY_QUEUED = "apply_queued"
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DISCARDED = "discarded"


class ExecutionMode(StrEnum):
    LOCAL = "local"
    AGENT = "agent"
    K8S = "k8s"


class Phase(StrEnum):
    PLAN = "plan"
    APPLY = "apply"


class DispatchMode(StrEnum):
    #: plans bypass the workspace lock; only plan+apply is serialized.
    NEW = "new"
    #: the replaced system's behaviour: every task of a workspace, plans
    #: included, goes through the workspace lock and waits for the one before.
    LEGACY = "legacy"


S = TaskStatus

#: Legal moves, per task type. A status absent as a key has no way out.
TRANSITIONS: Mapping[TaskType, Mapping[TaskStatus, frozenset[TaskStatus]]] = {
    TaskType.PLAN: {
        S.PENDING: frozenset({S.PLANNING, S.CANCELLED}),
        S.PLANNING: frozenset({S.PLANNING, S.SUCCESS, S.FAILED, S.CANCELLED}),
    },
    TaskType.PLAN_AND_APPLY: {
        S.PENDING: frozenset({S.PLANNING, S.CANCELLED}),
        S.PLANNING: frozenset(
            {S.PLANNING, S.SUCCESS, S.APPLY_PENDING, S.APPLY_QUEUED, S.FAILED, S.CANCELLED}
        ),
        S.APPLY_PENDING: frozenset({S.APPLY_QUEUED, S.DISCARDED, S.CANCELLED}),
        S.APPLY_QUEUED: frozenset({S.APPLYING, S.CANCELLED}),
        S.APPLYING: frozenset({S.APPLIED, S.FAILED, S.CANCELLED}),
    },
}

#: A task in one of these will never change again.
TERMINAL: frozenset[TaskStatus] = frozenset(
    {S.SUCCESS, S.APPLIED, S.FAILED, S.CANCELLED, S.DISCARDED}
)

#: A plan+apply in one of these holds its workspace: the partial unique index
#: ``uq_tasks_one_active_apply`` admits at most one such row per workspace.
ACTIVE_APPLY: frozenset[TaskStatus] = frozenset(
    {S.PLANNING, S.APPLY_PENDING, S.APPLY_QUEUED, S.APPLYING}
)

#: An executor is working on the task; its reports must carry the fence.
RUNNING: frozenset[TaskStatus] = frozenset({S.PLANNING, S.APPLYING})

#: Moves that hand a phase to a new executor: each bumps the fencing token.
CLAIMS: frozenset[tuple[TaskStatus, TaskStatus]] = frozenset(
    {(S.PENDING, S.PLANNING), (S.PLANNING, S.PLANNING), (S.APPLY_QUEUED, S.APPLYING)}
)

#: What `runq wait` waits for: nothing will happen without a human, or ever.
SETTLED: frozenset[TaskStatus] = TERMINAL | {S.APPLY_PENDING}


def allowed(task_type: TaskType, current: TaskStatus) -> frozenset[TaskStatus]:
    """The statuses a task of ``task_type`` may move to from ``current``."""
    return TRANSITIONS[task_type].get(current, frozenset())


def phase_of(status: TaskStatus) -> Phase | None:
    """Which executor phase a running status belongs to."""
    if status is S.PLANNING:
        return Phase.PLAN
    if status is S.APPLYING:
        return Phase.APPLY
    return None


E = TypeVar("E", bound=StrEnum)


def parse(kind: type[E], value: str, what: str) -> E:
    """``kind(value)``, or an :class:`InvalidInput` that lists the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise InvalidInput(f"unknown {what} {value!r}; expected one of: {choices}") from None
