"""Frozen views of rows, for callers outside a session (CLI, API, tests)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from scheduler.models import Task, TaskEvent, Workspace
from scheduler.states import RUNNING, ExecutionMode, TaskStatus, TaskType


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def when(at: datetime | None, now: datetime) -> str:
    """``12:03:07 UTC (2 min ago)``, with the date when not ``now``'s day."""
    if at is None:
        return "an unknown time"
    stamp = at.strftime("%H:%M:%S" if at.date() == now.date() else "%Y-%m-%d %H:%M:%S")
    return f"{stamp} UTC ({ago(now - at)})"


def ago(delta: timedelta) -> str:
    """``45 s ago``, ``2 min ago``, ``3 h ago``, ``4 days ago``."""
    seconds = max(delta.total_seconds(), 0.0)
    for unit, size, below in (("s", 1, 90), ("min", 60, 5400), ("h", 3600, 172800)):
        if seconds < below:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds / 86400:.0f} days ago"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True)
class WorkspaceView:
    name: str
    execution_mode: ExecutionMode
    auto_apply: bool
    source_dir: str | None
    agent_pool: str | None
    locked_by: str | None
    lock_reason: str | None
    locked_at: datetime | None
    #: Seconds; None means the settings' defaults.
    plan_timeout: float | None = None
    apply_timeout: float | None = None

    @classmethod
    def of(cls, ws: Workspace) -> WorkspaceView:
        return cls(
            name=ws.name,
            execution_mode=ExecutionMode(ws.execution_mode),
            auto_apply=ws.auto_apply,
            source_dir=ws.source_dir,
            agent_pool=ws.agent_pool,
            locked_by=ws.locked_by,
            lock_reason=ws.lock_reason,
            locked_at=ws.locked_at,
            plan_timeout=ws.plan_timeout,
            apply_timeout=ws.apply_timeout,
        )

    @property
    def locked(self) -> bool:
        return self.locked_by is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "execution_mode": str(self.execution_mode),
            "auto_apply": self.auto_apply,
            "source_dir": self.source_dir,
            "agent_pool": self.agent_pool,
            "locked": self.locked,
            "locked_by": self.locked_by,
            "lock_reason": self.lock_reason,
            "locked_at": _iso(self.locked_at),
            "plan_timeout": self.plan_timeout,
            "apply_timeout": self.apply_timeout,
        }


@dataclass(frozen=True)
class TaskView:
    id: int
    workspace: str
    type: TaskType
    status: TaskStatus
    queue_seq: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    fence: int
    executor_handle: str | None
    add: int | None
    change: int | None
    destroy: int | None
    has_changes: bool | None
    error: str | None
    created_by: str | None
    message: str | None
    phase_started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    lease_expires_at: datetime | None = None
    plan_attempts: int = 0
    handoff_attempts: int = 0
    cancel_requested_at: datetime | None = None
    cancel_requested_by: str | None = None
    cancel_force: bool = False
    status_changed_at: datetime | None = None

    @classmethod
    def of(cls, task: Task, workspace: str) -> TaskView:
        return cls(
            id=task.id,
            workspace=workspace,
            type=TaskType(task.type),
            status=TaskStatus(task.status),
            queue_seq=task.queue_seq,
            created_at=task.created_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
            fence=task.fence,
            executor_handle=task.executor_handle,
            add=task.changes_add,
            change=task.changes_change,
            destroy=task.changes_destroy,
            has_changes=task.has_changes,
            error=task.error,
            created_by=task.created_by,
            message=task.message,
            phase_started_at=task.phase_started_at,
            heartbeat_at=task.heartbeat_at,
            lease_expires_at=task.lease_expires_at,
            plan_attempts=task.plan_attempts,
            handoff_attempts=task.handoff_attempts,
            cancel_requested_at=task.cancel_requested_at,
            cancel_requested_by=task.cancel_requested_by,
            cancel_force=task.cancel_force,
            status_changed_at=task.status_changed_at,
        )

    def to_json(self) -> dict[str, Any]:
        # Always an object, so `changes.add` never needs a null check on the
        # container; the counts are null until a plan has produced them.
        changes = {"add": self.add, "change": self.change, "destroy": self.destroy}
        return {
            "id": self.id,
            "workspace": self.workspace,
            "type": str(self.type),
            "status": str(self.status),
            "queue_position": self.queue_seq,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "status_changed_at": _iso(self.status_changed_at),
            "changes": changes,
            "has_changes": self.has_changes,
            "error": self.error,
            "created_by": self.created_by,
            "message": self.message,
            "fence": self.fence,
            "executor_handle": self.executor_handle,
            "executor": self.executor_json(),
            "plan_attempts": self.plan_attempts,
            "cancel": (
                {
                    "requested_at": _iso(self.cancel_requested_at),
                    "requested_by": self.cancel_requested_by,
                    "force": self.cancel_force,
                }
                if self.cancel_requested_at is not None
                else None
            ),
        }

    def executor_json(self) -> dict[str, Any] | None:
        """Who runs the current phase and when it was last heard from."""
        if self.status not in RUNNING:
            return None
        return {
            "handle": self.executor_handle,
            "started": self.executor_handle is not None,
            "phase_started_at": _iso(self.phase_started_at),
            "last_heard_at": _iso(self.heartbeat_at),
            "lease_expires_at": _iso(self.lease_expires_at),
            "handoff_attempts": self.handoff_attempts,
        }


@dataclass(frozen=True)
class EventView:
    task_id: int
    from_status: TaskStatus | None
    to_status: TaskStatus
    actor: str
    reason: str | None
    fence: int
    at: datetime

    @classmethod
    def of(cls, ev: TaskEvent) -> EventView:
        return cls(
            task_id=ev.task_id,
            from_status=TaskStatus(ev.from_status) if ev.from_status else None,
            to_status=TaskStatus(ev.to_status),
            actor=ev.actor,
            reason=ev.reason,
            fence=ev.fence,
            at=ev.at,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "from": str(self.from_status) if self.from_status else None,
            "to": str(self.to_status),
            "actor": self.actor,
            "reason": self.reason,
            "fence": self.fence,
            "at": _iso(self.at),
        }
