"""Typed settings, read from ``RUNQ_*`` environment variables.

Built once by an entry point (CLI, Celery worker start, the Python API's
``Client.from_env``) and passed down explicitly; nothing in runq reads the
environment at import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.states import DispatchMode


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RUNQ_", frozen=True, extra="ignore")

    #: Working area: SQLite file (by default), logs, plan files, working
    #: copies and the local-mode Terraform state.
    data_dir: Path = Path(".runq")
    #: SQLAlchemy URL. Empty means an SQLite file under ``data_dir``.
    database_url: str = ""
    #: Redis for the per-workspace dispatch lock.
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Celery broker. Empty means ``redis_url``.
    broker_url: str = ""
    terraform_bin: str = "terraform"
    dispatch_mode: DispatchMode = DispatchMode.NEW

    #: Seconds the workspace lock lives if its holder dies without releasing.
    lock_ttl: float = Field(default=30.0, gt=0)
    #: Seconds between reconciler sweeps run by ``celery beat``.
    reconcile_interval: float = Field(default=30.0, gt=0)
    #: A pending task older than this gets its broker message re-sent by the
    #: reconciler (messages are hints; the database is the queue).
    resend_after: float = Field(default=60.0, gt=0)

    # -- leases, retries, timeouts (see scheduler/leases.py) ---------------
    #: Seconds a running phase may go without a heartbeat before it is
    #: presumed lost (worker killed, host gone).
    lease_ttl: float = Field(default=60.0, gt=0)
    #: Seconds between an executor's heartbeats. Cancels and timeouts reach
    #: the executor in heartbeat replies, so this is also how fast it hears.
    heartbeat_interval: float = Field(default=2.0, gt=0)
    #: A plan whose executor was lost is re-run this many times, then fails.
    plan_retries: int = Field(default=2, ge=0)
    #: Sends of one claim's hand-off (the first and its re-sends, with
    #: exponential backoff from ``resend_after``) before the task fails.
    handoff_attempts: int = Field(default=8, ge=1)
    #: Default phase timeouts in seconds (a workspace may override them).
    plan_timeout: float = Field(default=7200.0, gt=0)
    apply_timeout: float = Field(default=7200.0, gt=0)
    #: Seconds an ``apply_pending`` task may wait for confirmation before it
    #: is discarded; 0 turns this off.
    confirm_timeout: float = Field(default=0.0, ge=0)
    #: Seconds terraform gets after an interrupt (cancel, timeout) to save
    #: its state and exit before it is killed.
    kill_grace: float = Field(default=30.0, gt=0)
    #: Seconds terraform gets when its worker shuts down (SIGTERM). Below
    #: Docker's default 10 s stop grace, so the state is saved before SIGKILL.
    shutdown_grace: float = Field(default=8.0, gt=0)

    # -- PostgreSQL session limits: no stalled client can stall the cluster --
    #: Seconds a statement waits for a row lock before it fails.
    db_lock_timeout: float = Field(default=5.0, gt=0)
    db_statement_timeout: float = Field(default=30.0, gt=0)
    #: A client paused inside a transaction loses its session (and its row
    #: locks) after this many seconds.
    db_idle_in_transaction_timeout: float = Field(default=30.0, gt=0)

    @field_validator("dispatch_mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_interval * 2 > self.lease_ttl:
            raise ValueError(
                f"RUNQ_HEARTBEAT_INTERVAL ({self.heartbeat_interval}s) must be at most half "
                f"of RUNQ_LEASE_TTL ({self.lease_ttl}s), or one late heartbeat loses the lease"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'runq.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def logs_dir(self) -> Path:
        return self.data_dir.resolve() / "logs"

    @property
    def work_dir(self) -> Path:
        return self.data_dir.resolve() / "work"

    @property
    def state_dir(self) -> Path:
        return self.data_dir.resolve() / "state"
