"""Small helpers shared by the integration tests (no fixtures here)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select, update

from executors.base import (
    Changes,
    Directive,
    Finished,
    Handoff,
    Heartbeat,
    PhaseResult,
    Reply,
    Started,
    StopReason,
)
from executors.fake import FAKE_PLAN, FakeRunner, bundle_of
from scheduler import dispatcher, leases, reports, tasks, workspaces
from scheduler.messages import (
    QUEUE_DISPATCH,
    QUEUE_PLANS,
    QUEUE_RUNS,
    TASK_CLAIM_PLAN,
    TASK_DISPATCH,
    TASK_EXECUTE,
    Message,
    RecordingPublisher,
)
from scheduler.models import (
    Base,
    StateVersion,
    Task,
    TaskEvent,
    Workspace,
    task_and_workspace,
    utcnow,
)
from scheduler.runtime import Runtime
from scheduler.states import RUNNING, ExecutionMode, Phase, TaskStatus, TaskType, phase_of
from scheduler.views import EventView, WorkspaceView

PLAN_WITH_CHANGES = PhaseResult(ok=True, has_changes=True, changes=Changes(add=2, change=1))
PLAN_NO_CHANGES = PhaseResult(ok=True, has_changes=False, changes=Changes())
PLAN_FAILED = PhaseResult(ok=False, error="Error: boom")
APPLY_OK = PhaseResult(ok=True)


def recorder(rt: Runtime) -> RecordingPublisher:
    assert isinstance(rt.publisher, RecordingPublisher)
    return rt.publisher


def make_workspace(
    rt: Runtime, name: str, source: Path, *, auto_apply: bool = False
) -> WorkspaceView:
    source.mkdir(parents=True, exist_ok=True)
    return workspaces.create(rt, name, source_dir=str(source), auto_apply=auto_apply)


def dispatches(rt: Runtime) -> list[str]:
    """Workspaces named by the dispatch messages published so far."""
    return [
        str(m.args[0])
        for m in recorder(rt).sent
        if m.task == TASK_DISPATCH and m.queue == QUEUE_DISPATCH
    ]


def claim_plans(rt: Runtime) -> list[int]:
    return [
        int(m.args[0])
        for m in recorder(rt).sent
        if m.task == TASK_CLAIM_PLAN and m.queue == QUEUE_PLANS
    ]


def handoffs(rt: Runtime) -> list[Handoff]:
    """The hand-offs published to the runs queue so far, as a worker would
    build them: an execute message carries only (task id, fence), the rest
    is read from the database (the phase from that fence's claim event)."""
    sent = [m for m in recorder(rt).sent if m.task == TASK_EXECUTE and m.queue == QUEUE_RUNS]
    for m in sent:
        assert len(m.args) == 2 and all(type(a) is int for a in m.args), m
    return [handoff_for(rt, int(m.args[0]), int(m.args[1])) for m in sent]


def handoff_for(rt: Runtime, task_id: int, fence: int) -> Handoff:
    """The hand-off of task ``task_id``'s claim under ``fence``, read from the
    database even if that claim is over (a late or duplicated message)."""
    with rt.sessions() as s:
        found = task_and_workspace(s, task_id)
        assert found is not None, f"task {task_id} does not exist"
        task, ws = found
        claimed_as = s.scalars(
            select(TaskEvent.to_status).where(
                TaskEvent.task_id == task_id,
                TaskEvent.fence == fence,
                TaskEvent.to_status.in_([str(x) for x in RUNNING]),
            )
        ).one()
        phase = phase_of(TaskStatus(claimed_as))
        assert phase is not None
        return Handoff(
            task_id=task_id,
            workspace=ws.name,
            phase=phase,
            fence=fence,
            speculative=task.type == TaskType.PLAN,
            mode=ExecutionMode(ws.execution_mode),
            source_dir=ws.source_dir,
            agent_pool=ws.agent_pool,
            timeout=leases.phase_timeout(rt.settings, ws, phase),
        )


def last_handoff(rt: Runtime, task_id: int) -> Handoff:
    mine = [h for h in handoffs(rt) if h.task_id == task_id]
    assert mine, f"no hand-off published for task {task_id}"
    return mine[-1]


def run_phase(rt: Runtime, task: int | Handoff, result: PhaseResult) -> Handoff:
    """Run a hand-off (or the latest one of task id ``task``) with a FakeRunner
    reporting ``result``."""
    handoff = task if isinstance(task, Handoff) else last_handoff(rt, task)
    runner = FakeRunner(script=lambda _h: result)
    runner.run(bundle_of(handoff), reports.DirectReporter(rt))
    assert runner.ran == [handoff], "the runner's start report was rejected"
    return handoff


def start(rt: Runtime, handoff: Handoff) -> bool:
    """The executor's Started report; whether it was accepted."""
    return reports.accept(
        rt, Started(handoff.task_id, handoff.fence, handoff.phase, f"test:{handoff.task_id}")
    ).accepted


def saved_plan_for(phase: Phase, result: PhaseResult) -> bytes | None:
    """The saved plan an executor sends with ``result``: a plan with changes
    sends one (the scheduler needs it if an apply will follow)."""
    if phase is Phase.PLAN and result.ok and result.has_changes:
        return FAKE_PLAN
    return None


def finish(rt: Runtime, handoff: Handoff, result: PhaseResult, *, fence: int | None = None) -> bool:
    """The executor's Finished report; whether it was accepted (a refusal is
    always a stale kill: see :func:`is_stale`)."""
    reply = reports.accept(
        rt,
        Finished(
            handoff.task_id,
            handoff.fence if fence is None else fence,
            handoff.phase,
            result,
            plan=saved_plan_for(handoff.phase, result),
        ),
    )
    assert reply.accepted or is_stale(reply), reply
    return reply.accepted


def status(rt: Runtime, task_id: int) -> TaskStatus:
    with rt.sessions() as s:
        return TaskStatus(s.scalars(select(Task.status).where(Task.id == task_id)).one())


def fence(rt: Runtime, task_id: int) -> int:
    with rt.sessions() as s:
        return int(s.scalars(select(Task.fence).where(Task.id == task_id)).one())


def chain(rt: Runtime, task_id: int) -> list[tuple[str | None, str]]:
    """The (from, to) pairs of a task's event rows, oldest first."""
    with rt.sessions() as s:
        rows = s.execute(
            select(TaskEvent.from_status, TaskEvent.to_status)
            .where(TaskEvent.task_id == task_id)
            .order_by(TaskEvent.id)
        ).all()
    return [(f, t) for f, t in rows]


def counts(rt: Runtime) -> tuple[int, int, int]:
    """(workspaces, tasks, events): to show that a refused request wrote nothing."""
    with rt.sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(Workspace)) or 0,
            s.scalar(select(func.count()).select_from(Task)) or 0,
            s.scalar(select(func.count()).select_from(TaskEvent)) or 0,
        )


def snapshot(rt: Runtime) -> list[tuple[object, ...]]:
    """Every task's mutable columns, for "nothing changed" assertions."""
    with rt.sessions() as s:
        rows = s.execute(
            select(
                Task.id,
                Task.status,
                Task.fence,
                Task.executor_handle,
                Task.started_at,
                Task.finished_at,
                Task.error,
                Task.has_changes,
            ).order_by(Task.id)
        ).all()
    return [tuple(r) for r in rows]


def messages_of(rt: Runtime) -> list[Message]:
    return list(recorder(rt).sent)


def rejected_reports(caplog_records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in caplog_records if getattr(r, "action", None) == "report_rejected"]


# ---------------------------------------------------------------- the lease protocol
# Shared by the lease, cancel, timeout, hand-off and state-version modules.


def executes(rt: Runtime) -> list[tuple[int, int]]:
    """(task id, fence) of every execute message published so far."""
    return [
        (int(m.args[0]), int(m.args[1]))
        for m in recorder(rt).sent
        if m.task == TASK_EXECUTE and m.queue == QUEUE_RUNS
    ]


def ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def set_task(rt: Runtime, task_id: int, **values: object) -> None:
    """Write columns of one task row directly: how tests move time along
    (a lease that lapsed, a phase that started long ago)."""
    with rt.transaction() as s:
        s.execute(update(Task).where(Task.id == task_id).values(**values))


def claimed(rt: Runtime, ws: str, task_type: TaskType = TaskType.PLAN) -> tuple[int, int]:
    """Submit a task and claim its plan; return (task id, fence)."""
    t = tasks.submit(rt, ws, task_type)
    if task_type is TaskType.PLAN:
        decision = dispatcher.claim_plan(rt, t.id)
    else:
        decision = dispatcher.dispatch(rt, ws)
    assert decision.claimed and decision.task_id == t.id and decision.fence is not None, decision
    return t.id, decision.fence


def begin(rt: Runtime, task_id: int, fence: int, phase: Phase = Phase.PLAN) -> Reply:
    """The executor's Started report (handle ``exec:<id>:<fence>``)."""
    return reports.accept(rt, Started(task_id, fence, phase, f"exec:{task_id}:{fence}"))


def beat(rt: Runtime, task_id: int, fence: int, phase: Phase = Phase.PLAN) -> Reply:
    return reports.accept(rt, Heartbeat(task_id, fence, phase))


def end(
    rt: Runtime, task_id: int, fence: int, result: PhaseResult, phase: Phase = Phase.PLAN
) -> Reply:
    """The executor's Finished report (with a saved plan, as a real plan
    with changes sends)."""
    plan = saved_plan_for(phase, result)
    return reports.accept(rt, Finished(task_id, fence, phase, result, plan=plan))


def task_events(rt: Runtime, task_id: int) -> list[EventView]:
    return tasks.events(rt, [task_id])


def everything(rt: Runtime) -> dict[str, list[tuple[object, ...]]]:
    """Every column of every task, event, workspace and state version: for
    "changed nothing at all" assertions."""

    def rows(model: type[Base]) -> list[tuple[object, ...]]:
        columns = list(model.__table__.columns)
        with rt.sessions() as s:
            return [tuple(r) for r in s.execute(select(*columns).order_by(columns[0])).all()]

    return {m.__tablename__: rows(m) for m in (Workspace, Task, TaskEvent, StateVersion)}


def tuned(rt: Runtime, *, actor: str | None = None, **changes: object) -> Runtime:
    """Another runtime on ``rt``'s database, Redis and publisher, with some
    settings changed (close it when done)."""
    return Runtime(
        settings=rt.settings.model_copy(update=changes),
        publisher=rt.publisher,
        actor=actor or rt.actor,
    )


def is_stale(reply: Reply) -> bool:
    """The reply to a report under a fence the task no longer holds."""
    return (reply.accepted, reply.directive, reply.stop) == (
        False,
        Directive.KILL,
        StopReason.STALE,
    )


def lapse(rt: Runtime, task_id: int, *, heard: float = 61.0) -> None:
    """The executor was last heard ``heard`` seconds ago; its lease ran out
    a second ago."""
    set_task(rt, task_id, heartbeat_at=ago(heard), lease_expires_at=ago(1))


def applying(rt: Runtime, ws: str) -> tuple[int, int]:
    """A plan+apply whose apply is claimed (not started): (task id, apply fence)."""
    tid, f = claimed(rt, ws, TaskType.PLAN_AND_APPLY)
    assert begin(rt, tid, f).accepted
    assert end(rt, tid, f, PLAN_WITH_CHANGES).accepted
    tasks.confirm(rt, tid)
    decision = dispatcher.dispatch(rt, ws)
    assert decision.action == "claimed_apply" and decision.task_id == tid
    assert decision.fence == f + 1
    return tid, f + 1


def deliver_hint(rt: Runtime, message: Message) -> bool:
    """Do what a worker does with a ``claim_plan`` or ``dispatch`` hint;
    False (and nothing done) for any other message."""
    if message.task == TASK_CLAIM_PLAN:
        dispatcher.claim_plan(rt, *message.args)
    elif message.task == TASK_DISPATCH:
        dispatcher.dispatch(rt, *message.args)
    else:
        return False
    return True


def current_handoff(rt: Runtime, task_id: int) -> Handoff:
    """The hand-off of ``task_id``'s current claim, built from its rows."""
    with rt.sessions() as s:
        found = task_and_workspace(s, task_id)
        assert found is not None, f"task {task_id} does not exist"
        return leases.handoff_of(rt.settings, *found)


def interfere_before_claim(rt: Runtime, task_id: int, change: str) -> list[int]:
    """Just before ``rt``'s next UPDATE of the tasks table reaches the
    database, run ``UPDATE tasks SET <change> WHERE id = task_id`` on the
    same connection, in the same transaction: as if another actor committed
    it between the caller's read and its conditional UPDATE. Returns a list
    that gets ``task_id`` once it has fired (it fires once)."""
    fired: list[int] = []

    def before(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if fired or not statement.lstrip().upper().startswith("UPDATE TASKS"):
            return
        fired.append(task_id)
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(f"UPDATE tasks SET {change} WHERE id = {int(task_id)}")
        finally:
            cursor.close()

    event.listen(rt.engine, "before_cursor_execute", before)
    return fired
