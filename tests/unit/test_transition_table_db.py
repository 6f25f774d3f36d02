"""transition() against the table, every (type, from, to), on an SQLite file.

Each case puts a fresh task straight into ``from`` (in a workspace of its own,
so the one-active-plan+apply index never interferes) and asks for ``to``.
A claim (:data:`CLAIMS`) bumps the fence and starts a fresh, unstarted lease;
every other move keeps the fence.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from scheduler.db import make_engine, make_sessionmaker, upgrade
from scheduler.errors import IllegalTransition
from scheduler.models import Task, TaskEvent, Workspace
from scheduler.states import CLAIMS, RUNNING, TERMINAL, TaskStatus, TaskType, allowed
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

#: When the fixture's tasks "were claimed" and last heard from.
EARLIER = datetime(2026, 1, 1, tzinfo=UTC)


def _task_in(sessions: sessionmaker[Session], task_type: TaskType, status: TaskStatus) -> int:
    """A task in ``status`` as if it got there: past pending it was claimed
    (started_at), and a running phase was started and holds a live lease."""
    running = status in RUNNING
    with sessions() as s, s.begin():
        ws = Workspace(name=f"ws{next(_counter)}", execution_mode="local", task_seq=1)
        s.add(ws)
        s.flush()
        task = Task(
            workspace_id=ws.id,
            type=task_type,
            status=status,
            queue_seq=1,
            fence=3,
            started_at=None if status is TaskStatus.PENDING else EARLIER,
            plan_attempts=0 if status is TaskStatus.PENDING else 1,
            handoff_at=EARLIER if running else None,
            handoff_attempts=2 if running else 0,
            executor_handle="old:1" if running else None,
            phase_started_at=EARLIER if running else None,
            heartbeat_at=EARLIER if running else None,
            lease_expires_at=EARLIER if running else None,
        )
        s.add(task)
        s.flush()
        return task.id


def _state(sessions: sessionmaker[Session], task_id: int) -> tuple[object, ...]:
    with sessions() as s:
        task = s.get_one(Task, task_id)
        n = s.scalar(
            select(func.count()).select_from(TaskEvent).where(TaskEvent.task_id == task_id)
        )
        return (
            task.status,
            task.fence,
            task.started_at,
            task.finished_at,
            n,
            task.status_changed_at,
            task.lease_expires_at,
        )


def _lease(sessions: sessionmaker[Session], task_id: int) -> tuple[object, ...]:
    with sessions() as s:
        task = s.get_one(Task, task_id)
        return (
            task.executor_handle,
            task.phase_started_at,
            task.heartbeat_at,
            task.lease_expires_at,
            task.handoff_attempts,
            task.plan_attempts,
            task.handoff_at,
        )


@pytest.mark.parametrize("task_type", list(TaskType))
@pytest.mark.parametrize("current", list(TaskStatus))
def test_transition_obeys_the_table(
    sessions: sessionmaker[Session], task_type: TaskType, current: TaskStatus
) -> None:
    for to in TaskStatus:
        task_id = _task_in(sessions, task_type, current)
        before = _state(sessions, task_id)
        lease_before = _lease(sessions, task_id)
        if to in allowed(task_type, current):
            claim = (current, to) in CLAIMS
            fence_after = 4 if claim else 3
            with sessions() as s, s.begin():
                done = transition(s, task_id, to, actor="table", reason="case")
            assert (done.from_status, done.to_status, done.fence) == (current, to, fence_after)
            status, fence, started, finished, n_events, changed, expires = _state(sessions, task_id)
            assert (status, fence, n_events) == (to, fence_after, 1)
            assert changed == done.at, "every move stamps status_changed_at"
            if current is TaskStatus.PENDING and to is TaskStatus.PLANNING:
                assert started == done.at, "the first claim stamps started_at"
            else:
                assert started == before[2], "only the first claim stamps started_at"
            assert (finished is not None) == (to in TERMINAL)
            lease = _lease(sessions, task_id)
            if claim:
                # A new owner: nobody has started it yet, its hand-off goes
                # now, and a plan claim counts one more plan attempt.
                plans = lease_before[5] + (1 if to is TaskStatus.PLANNING else 0)
                assert lease == (None, None, None, None, 1, plans, done.at)
            else:
                assert expires is None, "leaving a running status ends the lease"
                assert lease[4:] == lease_before[4:]
            with sessions() as s:
                ev = s.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id)).one()
                assert (ev.from_status, ev.to_status, ev.actor, ev.reason, ev.fence) == (
                    current,
                    to,
                    "table",
                    "case",
                    fence_after,
                )
        else:
            with pytest.raises(IllegalTransition), sessions() as s, s.begin():
                transition(s, task_id, to, actor="table")
            assert _state(sessions, task_id) == before, (task_type, current, to)
