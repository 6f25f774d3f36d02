"""Stored artifacts: the Terraform state of each workspace, versioned.

The newest ``state_versions`` row of a workspace *is* its state. Executors
fetch it at the start of a phase and report every state terraform writes
(:class:`executors.base.StateWritten`), so no worker's disk holds the only
copy: a worker killed mid-apply loses at most the writes of its last moment.

Hazards and what guards them:

* a superseded executor (paused past its lease, then resumed) writing over a
  newer state: a write is accepted only under the task's current fence while
  the task is applying;
* a stale writer replacing newer state, or two lineages mixing: the serial
  must grow within the workspace's lineage, as Terraform's own remote
  backends require (an equal serial is accepted only for identical bytes).
"""

from __future__ import annotations

import hashlib
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from executors.base import Reply, StateWritten
from scheduler.models import StateVersion, Task
from scheduler.states import TaskStatus

log = logging.getLogger(__name__)


def latest(session: Session, workspace_id: int) -> StateVersion | None:
    return session.scalars(
        select(StateVersion)
        .where(StateVersion.workspace_id == workspace_id)
        .order_by(StateVersion.id.desc())
        .limit(1)
    ).first()


def store_state(session: Session, report: StateWritten) -> Reply:
    """Record the state an applying executor wrote, if it may write it."""
    # FOR UPDATE: two writes of one apply (a mid-apply write and the final
    # one, retried after a blip) must compare serials one after the other.
    task = session.scalars(
        select(Task).where(Task.id == report.task_id).with_for_update()
    ).one_or_none()
    if task is None:
        return Reply.stale(f"task {report.task_id} does not exist")
    if task.fence != report.fence:
        return Reply.stale(f"fence {report.fence} is stale (the task holds {task.fence})")
    if task.status != TaskStatus.APPLYING:
        return Reply.stale(f"task is {task.status}, not applying")
    current = latest(session, task.workspace_id)
    digest = hashlib.sha256(report.content).hexdigest()
    if current is not None:
        if current.lineage != report.lineage:
            return Reply(
                False,
                reason=f"lineage {report.lineage} differs from the workspace's {current.lineage}",
            )
        if report.serial < current.serial or (
            report.serial == current.serial and digest != current.sha256
        ):
            return Reply(
                False,
                reason=f"serial {report.serial} is not newer than the stored {current.serial}",
            )
        if report.serial == current.serial:
            return Reply.ok()  # the same state again (a retried report)
    session.add(
        StateVersion(
            workspace_id=task.workspace_id,
            serial=report.serial,
            lineage=report.lineage,
            task_id=task.id,
            fence=report.fence,
            sha256=digest,
            size=len(report.content),
            content=report.content,
        )
    )
    session.flush()
    log.info(
        "task %s: state serial %s stored",
        report.task_id,
        report.serial,
        extra={"action": "state_stored", "task_id": report.task_id, "serial": report.serial},
    )
    return Reply.ok()
