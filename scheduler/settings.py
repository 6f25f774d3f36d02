"""Typed settings, read from ``RUNQ_*`` environment variables.

Built once by an entry point (CLI, Celery worker start, the Python API's
``Client.from_env``) and passed down explicitly; nothing in runq reads the
environment at import time.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.states import DispatchMode


class ExecutorKind(StrEnum):
    """What runs a phase: real terraform, or :class:`executors.fake.FakeRunner`
    (no terraform at all: for benchmarks and dry runs of the scheduler)."""

    TERRAFORM = "terraform"
    FAKE = "fake"


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
    #: ``fake`` runs every phase with the fake executor that ships beside the
    #: real ones: each phase reports as a real one does, lasts the seconds
    #: below, and runs no terraform (``make bench`` measures the scheduler).
    executor: ExecutorKind = ExecutorKind.TERRAFORM
    fake_plan_seconds: float = Field(default=0.0, ge=0)
    fake_apply_seconds: float = Field(default=0.0, ge=0)

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

    # -- artifacts: what a run needs, stored by runq (no shared disk) -------
    #: Largest configuration version (the compressed snapshot of a
    #: workspace's directory taken at submit), in bytes.
    max_config_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    #: Largest saved plan or state an executor may send back, in bytes.
    max_artifact_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    #: Keep each phase's working copy after it ends (for debugging); by
    #: default it is removed, since everything in it that matters is stored.
    keep_workdirs: bool = False

    # -- remote executors (agents, Kubernetes Jobs) --------------------------
    #: An agent's pool token (``runq pool create`` prints it). Agents need
    #: this and the broker, and no database credentials.
    agent_token: str = ""
    #: Seconds between an agent's signed beats (who it is, what it runs).
    agent_beat_interval: float = Field(default=5.0, gt=0)
    #: An agent not heard from for this long no longer counts as capacity.
    agent_ttl: float = Field(default=30.0, gt=0)
    #: Seconds a remote executor waits for the scheduler's reply to a report.
    report_timeout: float = Field(default=10.0, gt=0)

    # -- Kubernetes mode (a workspace may override the job settings) ---------
    #: The pool whose token signs Kubernetes Jobs' reports (made on demand).
    k8s_pool: str = "kubernetes"
    k8s_namespace: str = "default"
    k8s_image: str = "runq:local"
    k8s_service_account: str = ""
    #: Container resources as JSON, e.g. ``{"limits": {"memory": "1Gi"}}``.
    k8s_resources: str = "{}"
    #: Extra container environment as a JSON object.
    k8s_env: str = "{}"
    #: Seconds a finished Job is kept (``ttlSecondsAfterFinished``).
    k8s_job_ttl: int = Field(default=3600, ge=0)
    #: A kubeconfig file; empty means in-cluster config, then ~/.kube/config.
    k8s_kubeconfig: str = ""
    #: The broker URL as the Jobs' pods reach it (it goes in each Job's
    #: Secret); empty means the scheduler's own.
    k8s_broker_url: str = ""

    @field_validator("dispatch_mode", "executor", mode="before")
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
