"""PostgreSQL session limits: no stalled client can stall the cluster.

A session holding a row lock makes a claim of that row fail within the lock
timeout instead of hanging (and costs no other workspace); a session paused
inside a transaction is ended by the server, and its locks with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from scheduler import dispatcher, tasks
from scheduler.models import Task
from scheduler.runtime import Runtime
from scheduler.states import TaskStatus, TaskType
from tests.conftest import PG_ADMIN_URL
from tests.integration.helpers import everything, make_workspace

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)

S = TaskStatus


def conninfo(rt: Runtime) -> str:
    return make_url(rt.settings.database_url).set(drivername="postgresql").render_as_string(False)


def test_sessions_carry_the_configured_limits(rt: Runtime, tune: Callable[..., Runtime]) -> None:
    r = tune(db_lock_timeout=1.5, db_statement_timeout=20, db_idle_in_transaction_timeout=0.25)
    with r.sessions() as s:
        shown = [
            s.execute(text(f"SHOW {name}")).scalar_one()
            for name in ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
        ]
    assert shown == ["1500ms", "20s", "250ms"]


def test_a_held_row_lock_fails_a_claim_within_the_lock_timeout(
    rt: Runtime, ws: str, src: Path, tune: Callable[..., Runtime]
) -> None:
    r = tune(db_lock_timeout=1)
    stuck = tasks.submit(r, ws, TaskType.PLAN)
    make_workspace(r, "other", src)
    free = tasks.submit(r, "other", TaskType.PLAN)
    before = everything(r)

    # A paused dispatcher: it updated the task row and never committed.
    with psycopg.connect(conninfo(rt)) as holder:
        holder.execute("UPDATE tasks SET executor_handle = NULL WHERE id = %s", (stuck.id,))
        t0 = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            dispatcher.claim_plan(r, stuck.id)
        took = time.monotonic() - t0
        assert 0.9 <= took < 3, f"the claim gave up after {took:.1f}s, not ~1s"
        assert everything(r) == before

        # Only that row is stuck: other work goes on meanwhile.
        t0 = time.monotonic()
        assert dispatcher.claim_plan(r, free.id).claimed
        assert time.monotonic() - t0 < 0.9
        holder.rollback()

    assert tasks.get(r, stuck.id).status is S.PENDING
    assert dispatcher.claim_plan(r, stuck.id).claimed


def test_a_session_idle_in_a_transaction_is_ended_and_its_locks_freed(
    rt: Runtime, ws: str, tune: Callable[..., Runtime]
) -> None:
    paused = tune(db_idle_in_transaction_timeout=1)
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    with paused.sessions() as s:
        s.begin()
        s.execute(select(Task).where(Task.id == plan.id).with_for_update())
        pid = s.connection().connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        t0 = time.monotonic()
        # Paused here (SIGSTOP, a VM freeze): the server ends the session.
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                assert time.monotonic() - t0 < 10, "the idle session was not ended"
                time.sleep(0.05)
        took = time.monotonic() - t0
        assert 0.9 <= took < 5, took

        # Its row lock went with it: the claim goes through at once.
        t0 = time.monotonic()
        assert dispatcher.claim_plan(rt, plan.id).claimed
        assert time.monotonic() - t0 < 1
        # And the paused client, resumed, finds its session gone (an error
        # psycopg classes as internal; SQLAlchemy sees the connection is dead).
        with pytest.raises(DBAPIError, match="idle-in-transaction timeout") as info:
            s.execute(text("SELECT 1"))
        assert info.value.connection_invalidated


def test_a_runaway_statement_is_cancelled(rt: Runtime, tune: Callable[..., Runtime]) -> None:
    r = tune(db_statement_timeout=0.5)
    t0 = time.monotonic()
    with r.sessions() as s, pytest.raises(OperationalError, match="statement timeout"):
        s.execute(text("SELECT pg_sleep(10)"))
    assert time.monotonic() - t0 < 3
