"""The reconciler: re-sends the hints the database says are owed.

Broker messages can be lost (a publish that failed after commit, a Redis
restart without persistence, a purged queue). The database still says which
work is waiting, so ``celery beat`` runs :func:`sweep` every
``RUNQ_RECONCILE_INTERVAL`` seconds and re-publishes:

* ``claim_plan`` for plan tasks pending longer than ``RUNQ_RESEND_AFTER``;
* ``dispatch`` for every workspace with a pending plan+apply or a confirmed
  apply waiting to be claimed (dispatch is idempotent: under the lock it
  re-reads and does nothing if nothing can move).

Leases, heartbeats and timeouts of running phases come with a later issue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select

from scheduler import messages
from scheduler.models import Task, Workspace, utcnow
from scheduler.runtime import Runtime
from scheduler.states import DispatchMode, TaskStatus, TaskType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    plans: list[int]
    workspaces: list[str]


def sweep(rt: Runtime) -> Sweep:
    cutoff = utcnow() - timedelta(seconds=rt.settings.resend_after)
    legacy = rt.settings.dispatch_mode is DispatchMode.LEGACY
    with rt.sessions() as s:
        plans: list[int] = []
        if not legacy:
            plans = list(
                s.scalars(
                    select(Task.id).where(
                        Task.type == TaskType.PLAN,
                        Task.status == TaskStatus.PENDING,
                        Task.created_at < cutoff,
                    )
                )
            )
        waiting = select(Workspace.name).join(Task, Task.workspace_id == Workspace.id)
        waiting = waiting.where(
            Task.status.in_([TaskStatus.PENDING, TaskStatus.APPLY_QUEUED]),
            # A manual lock holds back plan+apply only; legacy plans still go.
            or_(Workspace.locked_by.is_(None), Task.type == TaskType.PLAN),
        )
        if not legacy:
            waiting = waiting.where(Task.type == TaskType.PLAN_AND_APPLY)
        workspaces = sorted(set(s.scalars(waiting.distinct())))
    for task_id in plans:
        rt.publisher.publish(messages.claim_plan(task_id))
    for name in workspaces:
        rt.publisher.publish(messages.dispatch(name))
    if plans or workspaces:
        log.info(
            "reconciler re-sent %d plan claims and %d workspace dispatches",
            len(plans),
            len(workspaces),
            extra={"action": "reconcile", "plans": plans, "workspaces": workspaces},
        )
    return Sweep(plans, workspaces)
