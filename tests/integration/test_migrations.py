"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

from scheduler.db import alembic_config, current_revision, make_engine, upgrade
from scheduler.models import Base
from scheduler.states import ACTIVE_APPLY


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A database freshly migrated by the fixtures (scheduler.db.upgrade)."""
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def test_no_autogenerate_diff_against_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


HEAD = "0003"


def test_upgrade_is_at_head_and_idempotent(engine: Engine) -> None:
    assert current_revision(engine) == HEAD
    upgrade(engine)
    assert current_revision(engine) == HEAD
    tables = set(inspect(engine).get_table_names())
    assert {
        "workspaces",
        "tasks",
        "task_events",
        "state_versions",
        "service_beats",
        "configuration_versions",
        "plan_artifacts",
        "log_chunks",
        "agent_pools",
        "agents",
        "alembic_version",
    } <= tables


def test_0002_upgrades_a_0001_database_with_tasks_in_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Rows written under 0001 survive 0002 (SQLite rebuilds the tasks table
    for it) with the new columns' defaults, and the guards still hold."""
    path = tmp_path_factory.mktemp("old") / "runq.db"
    eng = make_engine(f"sqlite:///{path}")
    try:
        upgrade(eng, "0001")
        assert current_revision(eng) == "0001"
        with eng.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO workspaces"
                    " (name, execution_mode, auto_apply, task_seq, created_at)"
                    " VALUES ('w', 'local', false, 2, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO tasks (workspace_id, type, status, queue_seq, fence, created_at)"
                    " VALUES (1, 'plan_and_apply', 'planning', 1, 1, CURRENT_TIMESTAMP),"
                    " (1, 'plan', 'success', 2, 1, CURRENT_TIMESTAMP)"
                )
            )
            # Event rows reference the tasks table that SQLite rebuilds.
            conn.execute(
                text(
                    "INSERT INTO task_events (task_id, from_status, to_status, actor, fence, at)"
                    " VALUES (1, NULL, 'pending', 'old', 0, CURRENT_TIMESTAMP),"
                    " (1, 'pending', 'planning', 'old', 1, CURRENT_TIMESTAMP),"
                    " (2, NULL, 'pending', 'old', 0, CURRENT_TIMESTAMP)"
                )
            )
        upgrade(eng)
        assert current_revision(eng) == HEAD
        with eng.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, status, fence, handoff_attempts, plan_attempts, cancel_force,"
                    " lease_expires_at, handoff_at IS NOT NULL FROM tasks ORDER BY id"
                )
            ).all()
            # The phase claimed before the upgrade (no executor started it)
            # counts as handed off now, so the reconciler re-sends it in the
            # new message format; without a hand-off time no sweep finds it.
            assert [tuple(r) for r in rows] == [
                (1, "planning", 1, 1, 0, 0, None, 1),
                (2, "success", 1, 0, 0, 0, None, 0),
            ]
            assert conn.scalar(text("SELECT count(*) FROM task_events")) == 3
            # Foreign keys are enforced again on the migrating connection's pool.
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        # The one-active-plan+apply index survived the table rebuild.
        sql = _index_sql(eng)
        assert re.search(r"UNIQUE INDEX", sql, re.IGNORECASE) and "WHERE" in sql
        with pytest.raises(IntegrityError), eng.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO tasks (workspace_id, type, status, queue_seq, fence, created_at)"
                    " VALUES (1, 'plan_and_apply', 'applying', 3, 1, CURRENT_TIMESTAMP)"
                )
            )
        # And 0002 goes back down cleanly.
        command.downgrade(alembic_config(eng), "0001")
        assert current_revision(eng) == "0001"
        assert not {"state_versions", "service_beats"} & set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


def test_fresh_sqlite_file_from_scratch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """upgrade creates the directory and file itself."""
    path = tmp_path_factory.mktemp("fresh") / "nested" / "dir" / "runq.db"
    eng = make_engine(f"sqlite:///{path}")
    try:
        assert current_revision(eng) is None
        upgrade(eng)
        assert path.is_file()
        with eng.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        eng.dispose()


def _index_sql(engine: Engine) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            sql = conn.scalar(
                text("SELECT sql FROM sqlite_master WHERE name = 'uq_tasks_one_active_apply'")
            )
        else:
            sql = conn.scalar(
                text(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_tasks_one_active_apply'"
                )
            )
    assert isinstance(sql, str)
    return sql


def test_partial_index_predicate_in_the_database(engine: Engine) -> None:
    """compare_metadata does not look at index predicates, so check the DDL:
    unique, on workspace_id, and exactly the ACTIVE_APPLY statuses."""
    sql = _index_sql(engine)
    assert re.search(r"UNIQUE INDEX", sql, re.IGNORECASE)
    where = sql.split("WHERE", 1)[1]
    assert "plan_and_apply" in where
    statuses = set(re.findall(r"'([a-z_]+)'", where)) - {"plan_and_apply"}
    assert statuses == {str(s) for s in ACTIVE_APPLY}


def test_check_constraints_refuse_unknown_values(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO workspaces (name, execution_mode, auto_apply, task_seq, created_at)"
                " VALUES ('w', 'local', false, 0, CURRENT_TIMESTAMP)"
            )
        )
    bad_rows = [
        ("plan", "running"),  # unknown status
        ("apply", "pending"),  # unknown type
    ]
    for task_type, status in bad_rows:
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO tasks (workspace_id, type, status, queue_seq, fence, created_at)"
                    " VALUES ((SELECT id FROM workspaces), :t, :s, 1, 0, CURRENT_TIMESTAMP)"
                ),
                {"t": task_type, "s": status},
            )
