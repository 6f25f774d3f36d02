"""Typed settings, read from ``RUNQ_*`` environment variables.

Built once by an entry point (CLI, Celery worker start, the Python API's
``Client.from_env``) and passed down explicitly; nothing in runq reads the
environment at import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
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
    #: Seconds a dispatcher waits for a busy workspace lock before giving up
    #: (the holder re-reads the queue anyway; the reconciler covers the rest).
    lock_wait: float = Field(default=10.0, ge=0)
    #: Seconds between reconciler sweeps run by ``celery beat``.
    reconcile_interval: float = Field(default=30.0, gt=0)
    #: A pending task older than this gets its broker message re-sent by the
    #: reconciler (messages are hints; the database is the queue).
    resend_after: float = Field(default=60.0, gt=0)

    @field_validator("dispatch_mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

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
