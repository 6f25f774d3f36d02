"""Alembic environment: runq passes its engine in ``config.attributes``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from scheduler.models import Base

engine = context.config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise TypeError("run migrations through `runq db upgrade` (scheduler.db.upgrade)")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
