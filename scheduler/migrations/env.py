"""Alembic environment: runq passes its engine in ``config.attributes``."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Engine

from scheduler.models import Base

engine = context.config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise TypeError("run migrations through `runq db upgrade` (scheduler.db.upgrade)")

with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    raw: Any = connection.connection.driver_connection
    if sqlite:
        # Batch mode rebuilds a table by copy, drop and rename. With foreign
        # keys enforced (make_engine turns them on), dropping a table that
        # other rows reference fails, so it is switched off for the migration.
        # SQLite ignores this pragma inside a transaction: it goes to the raw
        # connection (autocommit) before one begins.
        raw.execute("PRAGMA foreign_keys=OFF")
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
            render_as_batch=sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
        if sqlite:
            broken = raw.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left rows with dangling foreign keys: {broken}")
    finally:
        if sqlite:
            raw.execute("PRAGMA foreign_keys=ON")
