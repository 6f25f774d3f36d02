"""Engine and session construction, and schema migration.

SQLite is the embedded default and must survive several worker processes on
one machine. Three hazards are handled here:

* readers blocking writers: WAL journal mode;
* ``database is locked`` raised at once under contention: ``busy_timeout``;
* the deadlock that ``busy_timeout`` cannot resolve, when two deferred
  transactions both read and then both try to upgrade to a write lock: every
  transaction starts with ``BEGIN IMMEDIATE``, taking the write lock up front
  (transactions here are a few statements; serializing them is cheap).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

SQLITE_BUSY_TIMEOUT_MS = 60_000
#: Pooled PostgreSQL connections are replaced after this long.
POOL_RECYCLE_SECONDS = 600
MIGRATIONS = Path(__file__).parent / "migrations"


def pg_session_limits(
    *, lock_timeout: float, statement_timeout: float, idle_in_transaction: float
) -> dict[str, Any]:
    """psycopg connect arguments that bound what one client can hold.

    Without them, a client paused inside a transaction (SIGSTOP, a VM
    freeze) keeps its row locks forever, and every later statement that
    needs those rows waits, one more pool process each time, until none is
    left. With them, waiters give up after ``lock_timeout`` and the paused
    session is ended after ``idle_in_transaction``.
    """

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = (
        f"-c lock_timeout={ms(lock_timeout)} -c statement_timeout={ms(statement_timeout)} "
        f"-c idle_in_transaction_session_timeout={ms(idle_in_transaction)}"
    )
    # connect_timeout: a dead server must not hang a heartbeat for minutes.
    return {"options": options, "connect_timeout": 10}


def make_engine(
    url: str, *, pg_connect_args: dict[str, Any] | None = None, pre_ping: bool = True
) -> Engine:
    """An engine for ``url``.

    ``pre_ping=False`` is for runq's workers: pre-ping costs a round trip on
    every checkout (10% of a plan's time), and every call a worker makes
    retries once on a connection the server dropped (reports through
    scheduler.reports.retry_transient, tasks through
    celery_app.tasks._guarded): the failure invalidates the whole pool, and
    the retry gets a fresh connection. Clients keep pre-ping: a long-lived
    application calling the Python API after a database restart should not
    see the first call fail. Either way, recycling bounds how stale a pooled
    connection can get behind a silent middlebox.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # Plain postgresql:// would pick psycopg2, which runq does not ship.
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            parsed,
            pool_pre_ping=pre_ping,
            pool_recycle=POOL_RECYCLE_SECONDS,
            connect_args=pg_connect_args or {},
        )

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        parsed,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: views are built from rows after commit, and the
    # rows must not go back to the database to refresh themselves.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    # alembic is imported here, not at the top: every CLI command imports
    # this module, and only `runq db upgrade` needs it.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (``runq db upgrade``)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
