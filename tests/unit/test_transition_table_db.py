"""transition() against the table, every (type, from, to), on an SQLite file.

Each case puts a fresh task straight into ``from`` (in a workspace of its own,
so the one-active-plan+apply index never interferes) and asks for ``to``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from scheduler.db import make_engine, make_sessionmaker, upgrade
from scheduler.errors import IllegalTransition
from scheduler.models import Task, TaskEvent, Workspace
from scheduler.states import TERMINAL, TaskStatus, TaskType, allowed
from scheduler.transitions import transition


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path_factory.mktemp('table') / 'runq.db'}")
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


_counter = iter(range(1, 10**6))


def _task_in(sessions: sessionmaker[Session], task_type: TaskType, status: TaskStatus) -> int:
    with sessions() as s, s.begin():
        ws = Workspace(name=f"ws{next(_counter)}", execution_mode="local", task_seq=1)
        s.add(ws)
        s.flush()
        task = Task(workspace_id=ws.id, type=task_type, status=status, queue_seq=1, fence=3)
        s.add(task)
        s.flush()
        return task.id


def _state(sessions: sessionmaker[Session], task_id: int) -> tuple[object, ...]:
    with sessions() as s:
        task = s.get_one(Task, task_id)
        n = s.scalar(
            select(func.count()).select_from(TaskEvent).where(TaskEvent.task_id == task_id)
        )
        return (task.status, task.fence, task.started_at, task.finished_at, n)


@pytest.mark.parametrize("task_type", list(TaskType))
@pytest.mark.parametrize("current", list(TaskStatus))
def test_transition_obeys_the_table(
    sessions: sessionmaker[Session], task_type: TaskType, current: TaskStatus
) -> None:
    for to in TaskStatus:
        task_id = _task_in(sessions, task_type, current)
        before = _state(sessions, task_id)
        if to in allowed(task_type, current):
            with sessions() as s, s.begin():
                done = transition(s, task_id, to, actor="table", reason="case")
            assert (done.from_status, done.to_status, done.fence) == (current, to, 3)
            status, fence, started, finished, n_events = _state(sessions, task_id)
            assert (status, fence, n_events) == (to, 3, 1)
            if current is TaskStatus.PENDING and to is TaskStatus.PLANNING:
                assert started is not None, "a claim stamps started_at"
            if current is not TaskStatus.PENDING:
                assert started is None, "only leaving pending stamps started_at"
            assert (finished is not None) == (to in TERMINAL)
            with sessions() as s:
                ev = s.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id)).one()
                assert (ev.from_status, ev.to_status, ev.actor, ev.reason, ev.fence) == (
                    current,
                    to,
                    "table",
                    "case",
                    3,
                )
        else:
            with pytest.raises(IllegalTransition), sessions() as s, s.begin():
                transition(s, task_id, to, actor="table")
            assert _state(sessions, task_id) == before, (task_type, current, to)
