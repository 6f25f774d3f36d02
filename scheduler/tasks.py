"""What users do to tasks: submit, confirm, discard, cancel, and read them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from scheduler import messages, outbox
from scheduler.errors import (
    ConcurrentChange,
    IllegalTransition,
    InvalidInput,
    TaskNotFound,
)
from scheduler.models import Task, TaskEvent, Workspace, utcnow
from scheduler.runtime import Runtime
from scheduler.states import (
    RUNNING,
    DispatchMode,
    ExecutionMode,
    TaskStatus,
    TaskType,
    parse,
    phase_of,
)
from scheduler.transitions import transition
from scheduler.views import EventView, TaskView
from scheduler.workspaces import load as load_workspace

log = logging.getLogger(__name__)


def parse_type(value: str) -> TaskType:
    return parse(TaskType, value, "task type")


def parse_status(value: str) -> TaskStatus:
    return parse(TaskStatus, value, "status")


#: Longest accepted ``message`` (the "why this run" line) and ``created_by``.
MAX_MESSAGE = 4000
MAX_ACTOR = 200


def _check_text(what: str, value: str | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise InvalidInput(f"{what} is {len(value)} characters long; the limit is {limit}")


def submit(
    rt: Runtime,
    workspace: str,
    task_type: TaskType | str,
    *,
    message: str | None = None,
    created_by: str | None = None,
    session: Session | None = None,
) -> TaskView:
    """Queue a task. Its broker message is published only after the commit.

    With ``session``, the task is inserted in the caller's own transaction
    (commit or roll back as you like; nothing is published unless it
    commits). Without, runq commits it in a transaction of its own.
    """
    kind = parse_type(str(task_type))
    _check_text("message", message, MAX_MESSAGE)
    _check_text("created_by", created_by, MAX_ACTOR)
    if session is None:
        early = _early_snapshot(rt, workspace) if rt.engine.dialect.name == "sqlite" else None
        with rt.transaction() as s:
            return _submit(rt, s, workspace, kind, message, created_by, early)
    rt.attach(session)
    return _submit(rt, session, workspace, kind, message, created_by)


def _early_snapshot(rt: Runtime, workspace: str) -> tuple[str | None, bytes]:
    """The configuration snapshot, taken before the submit's transaction.

    The hazard: on SQLite every transaction takes the database's one write
    lock at BEGIN (scheduler.db), and reading, tarring and gzipping a
    configuration of up to ``max_config_bytes`` inside it would stall every
    worker's writes meanwhile. So the directory is read here, outside; the
    transaction uses it if the workspace still names the same directory.
    (PostgreSQL locks nothing before the queue position is taken, after the
    snapshot, so there the extra read would buy nothing.)
    """
    from scheduler import artifacts

    with rt.sessions() as s:
        ws = load_workspace(s, workspace)
        source_dir, name = ws.source_dir, ws.name
    return source_dir, artifacts.snapshot(source_dir, rt.settings.max_config_bytes, name)


def _submit(
    rt: Runtime,
    s: Session,
    workspace: str,
    kind: TaskType,
    message: str | None,
    created_by: str | None,
    early: tuple[str | None, bytes] | None = None,
) -> TaskView:
    # Imported here: `runq list` and `runq show` read tasks and need neither
    # the artifact store nor the executors' wire types it brings (issue 8).
    from scheduler import artifacts

    ws = load_workspace(s, workspace)
    _check_executor(rt, s, ws)
    # The snapshot both phases will run: editing the directory after this
    # changes nothing this task plans or applies, and no executor needs it.
    if early is not None and early[0] == ws.source_dir:
        content = early[1]
    else:
        content = artifacts.snapshot(ws.source_dir, rt.settings.max_config_bytes, ws.name)
    version = artifacts.store_config(s, ws.id, content)
    # Bumping the counter row-locks the workspace until commit, so queue
    # positions are handed out in commit order within a workspace.
    seq = s.connection().execute(_NEXT_SEQ, {"ws_id": ws.id}).scalar_one()
    task = Task(
        workspace_id=ws.id,
        type=kind,
        status=TaskStatus.PENDING,
        queue_seq=seq,
        fence=0,
        created_by=created_by,
        message=message,
        created_at=utcnow(),
        config_version_id=version.id,
    )
    s.add(task)
    s.flush()
    s.add(
        TaskEvent(
            task_id=task.id,
            from_status=None,
            to_status=TaskStatus.PENDING,
            actor=created_by or rt.actor,
            reason="submitted",
            fence=0,
            at=task.created_at,
        )
    )
    if kind is TaskType.PLAN and rt.settings.dispatch_mode is DispatchMode.NEW:
        outbox.add(s, messages.claim_plan(task.id, workspace))
    else:
        outbox.add(s, messages.dispatch(workspace))
    s.flush()
    log.info(
        "task %s submitted: %s in %s (queue position %s)",
        task.id,
        kind,
        workspace,
        seq,
        extra={"action": "submitted", "task_id": task.id, "workspace": workspace},
    )
    return TaskView.of(task, workspace)


#: Built once (see scheduler.models.task_and_workspace); on the table, so
#: the ORM's bulk-UPDATE machinery stays out of the submit.
_WORKSPACES = cast(Table, Workspace.__table__)
_NEXT_SEQ = (
    update(_WORKSPACES)
    .where(_WORKSPACES.c.id == bindparam("ws_id"))
    .values(task_seq=_WORKSPACES.c.task_seq + 1)
    .returning(_WORKSPACES.c.task_seq)
)


def _check_executor(rt: Runtime, s: Session, ws: Workspace) -> None:
    """Refuse a submit that no executor could run (nothing is inserted)."""
    if ws.execution_mode == ExecutionMode.LOCAL:
        return
    # Imported only for remote modes: it brings the Kubernetes client, which
    # a local workspace's `runq submit` should not wait for.
    from scheduler import pools

    if ws.execution_mode == ExecutionMode.AGENT:
        pool = pools.load(s, ws.agent_pool or "")
        if pool.kind != pools.KIND_AGENT:
            raise InvalidInput(f"workspace {ws.name!r}: pool {pool.name!r} is not an agent pool")
    elif ws.execution_mode == ExecutionMode.K8S:
        pools.ensure_k8s_pool(s, rt.settings)


def _load(s: Session, task_id: int) -> tuple[Task, str]:
    row = s.execute(
        select(Task, Workspace.name)
        .join(Workspace, Workspace.id == Task.workspace_id)
        .where(Task.id == task_id)
    ).one_or_none()
    if row is None:
        raise TaskNotFound(f"task {task_id} does not exist")
    return row[0], row[1]


def get(rt: Runtime, task_id: int) -> TaskView:
    with rt.sessions() as s:
        task, ws = _load(s, task_id)
        return TaskView.of(task, ws)


def get_many(rt: Runtime, task_ids: Sequence[int]) -> list[TaskView]:
    """The tasks ``task_ids``, in that order, read in one query."""
    with rt.sessions() as s:
        rows = s.execute(
            select(Task, Workspace.name)
            .join(Workspace, Workspace.id == Task.workspace_id)
            .where(Task.id.in_(set(task_ids)))
        ).all()
    found = {task.id: TaskView.of(task, ws) for task, ws in rows}
    missing = [i for i in task_ids if i not in found]
    if missing:
        raise TaskNotFound(f"task {missing[0]} does not exist")
    return [found[i] for i in task_ids]


def list_tasks(
    rt: Runtime,
    *,
    workspace: str | None = None,
    statuses: Sequence[TaskStatus] = (),
    limit: int = 200,
) -> list[TaskView]:
    with rt.sessions() as s:
        q = select(Task, Workspace.name).join(Workspace, Workspace.id == Task.workspace_id)
        if workspace is not None:
            q = q.where(Task.workspace_id == load_workspace(s, workspace).id)
        if statuses:
            q = q.where(Task.status.in_([str(x) for x in statuses]))
        q = q.order_by(Task.id.desc()).limit(limit)
        return [TaskView.of(t, name) for t, name in s.execute(q).all()]


def events(rt: Runtime, task_ids: Sequence[int] | None = None) -> list[EventView]:
    with rt.sessions() as s:
        q = select(TaskEvent).order_by(TaskEvent.id)
        if task_ids is not None:
            q = q.where(TaskEvent.task_id.in_(task_ids))
        return [EventView.of(e) for e in s.scalars(q)]


def _act(
    rt: Runtime,
    task_id: int,
    to: TaskStatus,
    expect: frozenset[TaskStatus],
    actor: str | None,
    verb: str,
    reason: str | None,
) -> TaskView:
    with rt.transaction() as s:
        task, ws = _load(s, task_id)
        current = TaskStatus(task.status)
        if current not in expect:
            if task.type == TaskType.PLAN and verb in {"confirm", "discard"}:
                detail = "it is a plan task; only plan_and_apply tasks wait for confirmation"
            else:
                detail = f"it is {current}; {verb} needs {' or '.join(sorted(expect))}"
            raise IllegalTransition(f"cannot {verb} task {task_id}: {detail}")
        transition(s, task_id, to, actor=actor or rt.actor, reason=reason or verb, expect=expect)
        s.refresh(task)
        view = TaskView.of(task, ws)
    log.info("task %s: %s -> %s", task_id, verb, to, extra={"action": verb, "task_id": task_id})
    return view


def confirm(rt: Runtime, task_id: int, *, actor: str | None = None) -> TaskView:
    """Approve a planned plan+apply; the dispatcher then claims its apply."""
    return _act(
        rt,
        task_id,
        TaskStatus.APPLY_QUEUED,
        frozenset({TaskStatus.APPLY_PENDING}),
        actor,
        "confirm",
        "confirmed",
    )


def discard(
    rt: Runtime, task_id: int, *, actor: str | None = None, reason: str | None = None
) -> TaskView:
    """Reject a planned plan+apply; the workspace moves on to its next one."""
    return _act(
        rt,
        task_id,
        TaskStatus.DISCARDED,
        frozenset({TaskStatus.APPLY_PENDING}),
        actor,
        "discard",
        reason,
    )


#: Not running: a cancel ends these at once.
CANCELLABLE = frozenset({TaskStatus.PENDING, TaskStatus.APPLY_PENDING, TaskStatus.APPLY_QUEUED})


def cancel(
    rt: Runtime,
    task_id: int,
    *,
    actor: str | None = None,
    reason: str | None = None,
    force: bool = False,
) -> TaskView:
    """Cancel a task.

    A task that is not running ends ``cancelled`` at once. For a running
    phase, the request is recorded and its executor hears of it in the reply
    to its next heartbeat: it interrupts terraform (SIGINT, so terraform saves
    its state; a cancelled apply's partial state is stored), or with
    ``force`` kills it, then reports, and the task ends ``cancelled`` with
    the canceller as the event's actor. A phase no executor has started ends
    at once. ``force`` also ends the task itself if its executor does not
    answer within a few heartbeats (it is dead or paused): the escape hatch
    for a task whose worker is gone.
    """
    who = actor or rt.actor
    view: TaskView | None = None
    with rt.transaction() as s:
        task, ws = _load(s, task_id)
        current = TaskStatus(task.status)
        if current in CANCELLABLE or (current in RUNNING and task.executor_handle is None):
            try:
                transition(
                    s,
                    task_id,
                    TaskStatus.CANCELLED,
                    actor=who,
                    reason=reason or "cancelled",
                    expect={current},
                    fence=task.fence,
                    # An executor may start the phase between our read and
                    # this UPDATE. Ending the task under it would make its
                    # next heartbeat a stale kill, mid-apply, with the state
                    # it saves refused: it must hear of the cancel instead.
                    guard=Task.executor_handle.is_(None) if current in RUNNING else None,
                )
            except ConcurrentChange:
                if current not in RUNNING:
                    raise
                s.refresh(task)  # started meanwhile: record the request below
                current = TaskStatus(task.status)
            else:
                s.refresh(task)
                log.info(
                    "task %s: cancelled", task_id, extra={"action": "cancel", "task_id": task_id}
                )
                view = TaskView.of(task, ws)
        if view is None:
            if current not in RUNNING:
                raise IllegalTransition(
                    f"cannot cancel task {task_id}: it is {current}, which is final"
                )
            # Running: record the request; the executor stops terraform.
            s.execute(
                update(Task)
                .where(Task.id == task_id, Task.fence == task.fence, Task.status == current)
                .values(
                    cancel_requested_at=task.cancel_requested_at or utcnow(),
                    cancel_requested_by=who,
                    cancel_force=task.cancel_force or force,
                )
                .execution_options(synchronize_session=False)
            )
        fence = task.fence
    phase = phase_of(current)
    if phase is not None:
        # A Kubernetes Job is deleted now (its pod gets SIGTERM: terraform is
        # interrupted and saves its state), not at its next heartbeat.
        from scheduler import k8s_jobs  # the Kubernetes client: only when cancelling

        k8s_jobs.stop(rt, task_id, phase, fence)
    if view is not None:
        return view
    log.info(
        "task %s: cancel%s requested of its running %s",
        task_id,
        " (force)" if force else "",
        phase_of(current),
        extra={"action": "cancel_requested", "task_id": task_id},
    )
    if not force:
        return get(rt, task_id)
    return _force(rt, task_id, fence, current, who, reason)


def _force(
    rt: Runtime, task_id: int, fence: int, seen: TaskStatus, who: str, reason: str | None
) -> TaskView:
    """Give a live executor a few heartbeats to kill terraform and report;
    then end the task here. Its executor, if it ever wakes, finds its fence
    stale and stops."""
    deadline = time.monotonic() + 3 * rt.settings.heartbeat_interval + 1
    while time.monotonic() < deadline:
        view = get(rt, task_id)
        if view.status is not seen or view.fence != fence:
            return view
        time.sleep(0.2)
    try:
        with rt.transaction() as s:
            transition(
                s,
                task_id,
                TaskStatus.CANCELLED,
                actor=who,
                reason=reason or "force-cancelled; the executor did not answer",
                expect={seen},
                fence=fence,
            )
    except ConcurrentChange:
        pass  # the executor's report won the race
    return get(rt, task_id)
