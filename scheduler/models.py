"""Database tables: ``workspaces`` (definitions), ``tasks`` (one run each) and
``task_events`` (one row per status transition, the audit trail).

PostgreSQL is the authority. Two invariants are enforced here, not in Python:

* ``uq_tasks_one_active_apply``: a partial unique index that admits at most one
  plan+apply per workspace in an active status. Even if the Redis lock lies
  (expired TTL, a paused holder, a restarted Redis), a second claim fails.
* ``uq_tasks_workspace_seq``: the per-workspace queue order is unique.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    bindparam,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from scheduler.states import ACTIVE_APPLY, ExecutionMode, TaskStatus, TaskType

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: BIGINT on PostgreSQL, but INTEGER on SQLite so the key aliases the rowid
#: and autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the way in and out.

    SQLite stores naive strings; without this a value read back from SQLite
    would compare unequal to (and fail to subtract from) one from PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: Any) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in sorted(values))})"


#: The predicate of the partial unique index, shared by the model and tests.
ACTIVE_APPLY_PREDICATE = f"type = '{TaskType.PLAN_AND_APPLY}' AND {_in('status', ACTIVE_APPLY)}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Workspace(Base):
    __tablename__ = "workspaces"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    execution_mode: Mapped[str] = mapped_column(String(16), default=ExecutionMode.LOCAL)
    auto_apply: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Terraform configuration directory (local mode).
    source_dir: Mapped[str | None] = mapped_column(Text)
    agent_pool: Mapped[str | None] = mapped_column(String(200))
    #: Manual lock: holds back plan+apply tasks; plans still run.
    locked_by: Mapped[str | None] = mapped_column(String(200))
    lock_reason: Mapped[str | None] = mapped_column(Text)
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Last queue position handed out; bumped by each submit in the same
    #: transaction, so the row lock also orders submits per workspace.
    task_seq: Mapped[int] = mapped_column(BigId, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Phase timeouts in seconds; None means the settings' defaults.
    plan_timeout: Mapped[float | None] = mapped_column(Float)
    apply_timeout: Mapped[float | None] = mapped_column(Float)
    #: Kubernetes settings this workspace overrides (JSON object; see
    #: :class:`executors.k8s.JobSpec`).
    k8s: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (CheckConstraint(_in("execution_mode", ExecutionMode), name="execution_mode"),)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32), default=TaskStatus.PENDING)
    #: FIFO order within the workspace.
    queue_seq: Mapped[int] = mapped_column(BigId)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: When the task left ``pending`` (claimed).
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Bumped by every claim. Executor reports must carry the current value,
    #: so a report from a superseded executor cannot move the task.
    fence: Mapped[int] = mapped_column(BigId, default=0)
    executor_handle: Mapped[str | None] = mapped_column(String(300))
    changes_add: Mapped[int | None] = mapped_column(Integer)
    changes_change: Mapped[int | None] = mapped_column(Integer)
    changes_destroy: Mapped[int | None] = mapped_column(Integer)
    #: True when the plan would change anything (resources or outputs).
    has_changes: Mapped[bool | None] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str | None] = mapped_column(Text)
    #: When the status last changed (every transition() sets it).
    status_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # -- the current claim's lease (see scheduler/leases.py) ---------------
    #: When the current claim's hand-off was last sent, and how many times.
    #: A claim no executor has started (``executor_handle`` empty) is re-sent
    #: by the reconciler with backoff, under the same fence.
    handoff_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    handoff_attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: When the executor started the current phase (its Started report).
    phase_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The last accepted heartbeat, and the deadline it set. A running phase
    #: whose deadline passed has lost its executor.
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    #: Plan claims so far; a lost plan is re-claimed while retries remain.
    plan_attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: A cancel of a running phase, waiting for its executor to stop terraform.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_by: Mapped[str | None] = mapped_column(String(200))
    cancel_force: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The configuration snapshot both phases run (taken at submit).
    config_version_id: Mapped[int | None] = mapped_column(ForeignKey("configuration_versions.id"))

    __table_args__ = (
        CheckConstraint(_in("type", TaskType), name="type"),
        CheckConstraint(_in("status", TaskStatus), name="status"),
        Index("uq_tasks_workspace_seq", "workspace_id", "queue_seq", unique=True),
        Index(
            "uq_tasks_one_active_apply",
            "workspace_id",
            unique=True,
            postgresql_where=text(ACTIVE_APPLY_PREDICATE),
            sqlite_where=text(ACTIVE_APPLY_PREDICATE),
        ),
        Index("ix_tasks_status_type", "status", "type"),
    )


class TaskEvent(Base):
    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    #: None for the creation event.
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    fence: Mapped[int] = mapped_column(BigId)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StateVersion(Base):
    """One Terraform state of a workspace; the newest row is the current one.

    Stored by the scheduler, never on a worker's disk: a state that an apply
    wrote lands here (under the apply's fence) within a moment of terraform
    writing it, so a worker killed mid-apply loses nothing it had recorded.
    """

    __tablename__ = "state_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    serial: Mapped[int] = mapped_column(BigInteger)
    lineage: Mapped[str] = mapped_column(String(100))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"))
    fence: Mapped[int] = mapped_column(BigId)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_state_versions_workspace_id_id", "workspace_id", "id"),)


class ServiceBeat(Base):
    """When a periodic service (the reconciler) last ran, and what it did."""

    __tablename__ = "service_beats"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    detail: Mapped[str | None] = mapped_column(Text)


class ConfigurationVersion(Base):
    """A snapshot of a workspace's configuration directory (a tar.gz).

    Taken at submit, so editing the directory afterwards changes nothing a
    queued task plans or applies, and no executor needs the directory.
    The same bytes are stored once per workspace.
    """

    __tablename__ = "configuration_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("uq_configuration_versions_workspace_sha", "workspace_id", "sha256", unique=True),
    )


class PlanArtifact(Base):
    """The saved plan of a task's accepted plan phase (plan file and the
    provider lock file, a tar.gz): what its apply applies, on any host."""

    __tablename__ = "plan_artifacts"

    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    #: The plan claim that made it.
    fence: Mapped[int] = mapped_column(BigId)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LogChunk(Base):
    """A piece of a phase's output, as the executor sent it.

    Keyed by its byte offset in the phase's log, so a chunk sent twice (a
    lost reply, a re-delivered message) is stored once.
    """

    __tablename__ = "log_chunks"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    phase: Mapped[str] = mapped_column(String(16))
    fence: Mapped[int] = mapped_column(BigId)
    offset: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("uq_log_chunks_task_phase", "task_id", "phase", "fence", "offset", unique=True),
    )


class AgentPool(Base):
    """A pool of agents (or the Kubernetes Jobs) that run a workspace's phases.

    ``token`` is the pool's secret: agents hold it, and every message between
    the scheduler and the pool is signed with a key derived from it
    (:mod:`executors.signing`). It is stored as the key itself, because the
    verifier must hold it; anyone who can read this table can also write the
    tasks table, so it adds no path in.
    """

    __tablename__ = "agent_pools"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="agent")
    token: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (CheckConstraint("kind IN ('agent', 'k8s')", name="kind"),)


class Agent(Base):
    """A live (or once live) agent, as its last signed beat described it."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("agent_pools.id"), index=True)
    hostname: Mapped[str] = mapped_column(String(300))
    capacity: Mapped[int] = mapped_column(Integer)
    #: JSON list of {"task_id", "phase", "fence"} it runs now.
    running: Mapped[str] = mapped_column(Text, default="[]")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


#: A task and its workspace by the task's id, built once: the hot paths (a
#: claim, a report, a hand-off) read it on every call, and a statement built
#: per call costs more Python to execute than its round trip takes.
_TASK_AND_WORKSPACE = (
    select(Task, Workspace)
    .join(Workspace, Workspace.id == Task.workspace_id)
    .where(Task.id == bindparam("task_id"))
)


def task_and_workspace(session: Session, task_id: int) -> tuple[Task, Workspace] | None:
    """Task ``task_id`` and its workspace, or None if there is no such task."""
    row = session.execute(_TASK_AND_WORKSPACE, {"task_id": task_id}).one_or_none()
    return None if row is None else (row[0], row[1])
