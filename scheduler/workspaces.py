"""Workspace definitions: create, list, and the manual lock."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scheduler.errors import InvalidInput, WorkspaceExists, WorkspaceNotFound
from scheduler.models import Workspace, utcnow
from scheduler.runtime import Runtime
from scheduler.states import RUNNING, DispatchMode, ExecutionMode, TaskType, parse
from scheduler.views import TaskView, WorkspaceView

if TYPE_CHECKING:
    from scheduler.artifacts import StateVersionView

log = logging.getLogger(__name__)

#: Names end up in Redis keys, file paths and Celery arguments.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


def check_name(name: str, what: str = "workspace") -> str:
    """``name`` if it is a valid workspace (or pool) name; else a clear error."""
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 200, starting with a letter or digit)"
        )
    return name


def parse_mode(value: str) -> ExecutionMode:
    return parse(ExecutionMode, value, "execution mode")


def create(
    rt: Runtime,
    name: str,
    *,
    mode: ExecutionMode | str = ExecutionMode.LOCAL,
    source_dir: str | None = None,
    auto_apply: bool = False,
    agent_pool: str | None = None,
    plan_timeout: float | None = None,
    apply_timeout: float | None = None,
    k8s: dict[str, Any] | None = None,
) -> WorkspaceView:
    check_timeouts(plan_timeout, apply_timeout)
    check_name(name)
    mode = parse_mode(str(mode))
    # Every mode snapshots this directory at submit (on the submitting host),
    # so the executors never need it.
    if not source_dir:
        raise InvalidInput("a workspace needs --dir: its Terraform configuration")
    from pathlib import Path

    path = Path(source_dir).expanduser().resolve()
    if not path.is_dir():
        raise InvalidInput(f"--dir {source_dir!r} is not a directory")
    source_dir = str(path)
    if mode is ExecutionMode.AGENT and not agent_pool:
        raise InvalidInput("an agent workspace needs --agent-pool")
    if mode is not ExecutionMode.AGENT and agent_pool:
        raise InvalidInput("--agent-pool is only for --mode agent")
    k8s_json = check_k8s(k8s) if k8s else None
    if k8s_json and mode is not ExecutionMode.K8S:
        raise InvalidInput("Kubernetes settings are only for --mode k8s")
    try:
        with rt.transaction() as s:
            ws = Workspace(
                name=name,
                execution_mode=mode,
                auto_apply=auto_apply,
                source_dir=source_dir,
                agent_pool=agent_pool,
                task_seq=0,
                plan_timeout=plan_timeout,
                apply_timeout=apply_timeout,
                k8s=k8s_json,
            )
            s.add(ws)
            s.flush()
            view = WorkspaceView.of(ws)
    except IntegrityError:
        raise WorkspaceExists(f"workspace {name!r} exists already") from None
    log.info("workspace %s created (%s)", name, mode, extra={"action": "workspace_created"})
    return view


#: The Kubernetes settings a workspace may override, and their JSON types.
K8S_KEYS: dict[str, type] = {
    "namespace": str,
    "image": str,
    "service_account": str,
    "resources": dict,
    "env": dict,
}


def check_k8s(overrides: dict[str, Any]) -> str:
    """``overrides`` as stored JSON, or :class:`InvalidInput` saying what is wrong."""
    if not isinstance(overrides, dict):
        raise InvalidInput("Kubernetes settings must be a JSON object")
    for key, value in overrides.items():
        want = K8S_KEYS.get(key)
        if want is None:
            raise InvalidInput(
                f"unknown Kubernetes setting {key!r}; known: {', '.join(sorted(K8S_KEYS))}"
            )
        if not isinstance(value, want):
            raise InvalidInput(f"Kubernetes setting {key!r} must be a {want.__name__}")
    env = overrides.get("env") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise InvalidInput("Kubernetes setting 'env' must map names to strings")
    return json.dumps(overrides, sort_keys=True)


def check_timeouts(*values: float | None) -> None:
    for value in values:
        if value is not None and not 0 < value <= 7 * 24 * 3600:
            raise InvalidInput(f"a timeout must be between 0 and 7 days in seconds, got {value}")


#: "Leave as is" for :func:`set_timeouts`; None there means "the default".
#: Compared by identity: a -1 that a user typed is an invalid timeout, not this.
KEEP: float = -1.0


def set_timeouts(
    rt: Runtime, name: str, *, plan_timeout: float | None = KEEP, apply_timeout: float | None = KEEP
) -> WorkspaceView:
    """Change a workspace's phase timeouts (None: back to the defaults).
    Running phases see the change at their next heartbeat."""
    values = {
        key: value
        for key, value in (("plan_timeout", plan_timeout), ("apply_timeout", apply_timeout))
        if value is not KEEP
    }
    check_timeouts(*values.values())
    with rt.transaction() as s:
        ws = load(s, name)
        if values:
            s.execute(update(Workspace).where(Workspace.id == ws.id).values(**values))
            s.refresh(ws)
        return WorkspaceView.of(ws)


#: Built once: every submit reads it (see scheduler.models.task_and_workspace).
_BY_NAME = select(Workspace).where(Workspace.name == bindparam("name"))


def find(session: Session, name: str) -> Workspace | None:
    return session.scalars(_BY_NAME, {"name": name}).one_or_none()


def load(session: Session, name: str) -> Workspace:
    ws = find(session, name)
    if ws is None:
        raise WorkspaceNotFound(f"workspace {name!r} does not exist")
    return ws


def get(rt: Runtime, name: str) -> WorkspaceView:
    with rt.sessions() as s:
        return WorkspaceView.of(load(s, name))


def list_all(rt: Runtime) -> list[WorkspaceView]:
    with rt.sessions() as s:
        return [WorkspaceView.of(w) for w in s.scalars(select(Workspace).order_by(Workspace.name))]


def lock(rt: Runtime, name: str, *, holder: str, reason: str | None = None) -> WorkspaceView:
    """Hold back plan+apply tasks in ``name``; plans still run."""
    with rt.transaction() as s:
        ws = load(s, name)
        if ws.locked_by is not None:
            raise InvalidInput(
                f"workspace {name!r} is already locked by {ws.locked_by}"
                + (f" ({ws.lock_reason})" if ws.lock_reason else "")
            )
        s.execute(
            update(Workspace)
            .where(Workspace.id == ws.id)
            .values(locked_by=holder, lock_reason=reason, locked_at=utcnow())
        )
        s.refresh(ws)
        view = WorkspaceView.of(ws)
    log.info("workspace %s locked by %s", name, holder, extra={"action": "workspace_locked"})
    return view


def unlock(rt: Runtime, name: str) -> WorkspaceView:
    """Release the manual lock and wake the dispatcher for the held-back queue."""
    from scheduler import messages, outbox

    with rt.transaction() as s:
        ws = load(s, name)
        if ws.locked_by is None:
            raise InvalidInput(f"workspace {name!r} is not locked")
        s.execute(
            update(Workspace)
            .where(Workspace.id == ws.id)
            .values(locked_by=None, lock_reason=None, locked_at=None)
        )
        s.refresh(ws)
        outbox.add(s, messages.dispatch(name))
        view = WorkspaceView.of(ws)
    log.info("workspace %s unlocked", name, extra={"action": "workspace_unlocked"})
    return view


@dataclass(frozen=True)
class Overview:
    """``runq workspace show``: a workspace and what is in it now."""

    workspace: WorkspaceView
    dispatch_mode: DispatchMode
    #: The task holding the workspace (the dispatcher's holder: the active
    #: plan+apply; in legacy mode, any running or active task).
    active: TaskView | None
    #: Queued tasks in the order the dispatcher claims them (plan+apply
    #: only, or every task in legacy mode).
    queue: list[TaskView]
    #: Plans running beside it (they take no workspace lock).
    running_plans: list[TaskView]
    #: The current stored Terraform state, if any.
    state: StateVersionView | None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.workspace.to_json(),
            "dispatch_mode": str(self.dispatch_mode),
            "active": self.active.to_json() if self.active else None,
            "queue": [{**t.to_json(), "place": i} for i, t in enumerate(self.queue, 1)],
            "running_plans": [t.to_json() for t in self.running_plans],
            "state": self.state.to_json() if self.state else None,
        }


def overview(rt: Runtime, name: str) -> Overview:
    """Workspace ``name``: its active task, queue, running plans, lock and
    latest state version, read in one session."""
    from scheduler.artifacts import STATE_VERSION_FIELDS, StateVersionView
    from scheduler.dispatcher import holder_query, queue_query
    from scheduler.models import StateVersion, Task

    legacy = rt.settings.dispatch_mode is DispatchMode.LEGACY
    with rt.sessions() as s:
        ws = load(s, name)
        holder = s.scalars(holder_query(legacy), {"ws_id": ws.id}).first()
        mine = select(Task).where(Task.workspace_id == ws.id).order_by(Task.queue_seq)
        running = mine.where(Task.type == TaskType.PLAN, Task.status.in_([str(x) for x in RUNNING]))
        state = s.execute(
            select(func.count().over(), *STATE_VERSION_FIELDS)
            .where(StateVersion.workspace_id == ws.id)
            .order_by(StateVersion.id.desc())
            .limit(1)
        ).one_or_none()
        return Overview(
            workspace=WorkspaceView.of(ws),
            dispatch_mode=rt.settings.dispatch_mode,
            active=TaskView.of(holder, name) if holder else None,
            queue=[
                TaskView.of(t, name)
                for t in s.scalars(queue_query(legacy, False), {"ws_id": ws.id})
            ],
            running_plans=[
                TaskView.of(t, name)
                for t in s.scalars(running)
                if holder is None or t.id != holder.id
            ],
            state=StateVersionView(name, *state) if state else None,
        )
