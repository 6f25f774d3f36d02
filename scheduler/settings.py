"""Typed settings, read from ``RUNQ_*`` environment variables.

Built once by an entry point (CLI, Celery worker start, the Python API's
``Client.from_env``) and passed down explicitly; nothing in runq reads the
environment at import time.

A frozen dataclass, not a pydantic-settings model: the import of pydantic and
pydantic-settings alone took a quarter of ``runq show``'s start-up (issue 8),
for what is a flat list of strings, numbers and names. Keyword arguments win
over the environment (``RUNQ_`` and the field's name, in any case), which
wins over the defaults; every value is converted to its field's type and
checked against its bounds, and all problems are reported at once, as
:class:`~scheduler.errors.InvalidSettings`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from scheduler.errors import InvalidSettings
from scheduler.states import DispatchMode


class ExecutorKind(StrEnum):
    """What runs a phase: real terraform, or :class:`executors.fake.FakeRunner`
    (no terraform at all: for benchmarks and dry runs of the scheduler)."""

    TERRAFORM = "terraform"
    FAKE = "fake"


def setting(default: Any, *, gt: float | None = None, ge: float | None = None) -> Any:
    """A field with a default and optional bounds (``gt``: above, ``ge``: at least)."""
    return field(default=default, metadata={"gt": gt, "ge": ge})


@dataclass(frozen=True, init=False)
class Settings:
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
    fake_plan_seconds: float = setting(0.0, ge=0)
    fake_apply_seconds: float = setting(0.0, ge=0)

    #: Seconds the workspace lock lives if its holder dies without releasing.
    lock_ttl: float = setting(30.0, gt=0)
    #: Seconds between reconciler sweeps run by ``celery beat``.
    reconcile_interval: float = setting(30.0, gt=0)
    #: A pending task older than this gets its broker message re-sent by the
    #: reconciler (messages are hints; the database is the queue).
    resend_after: float = setting(60.0, gt=0)

    # -- leases, retries, timeouts (see scheduler/leases.py) ---------------
    #: Seconds a running phase may go without a heartbeat before it is
    #: presumed lost (worker killed, host gone).
    lease_ttl: float = setting(60.0, gt=0)
    #: Seconds between an executor's heartbeats. Cancels and timeouts reach
    #: the executor in heartbeat replies, so this is also how fast it hears.
    heartbeat_interval: float = setting(2.0, gt=0)
    #: A plan whose executor was lost is re-run this many times, then fails.
    plan_retries: int = setting(2, ge=0)
    #: Sends of one claim's hand-off (the first and its re-sends, with
    #: exponential backoff from ``resend_after``) before the task fails.
    handoff_attempts: int = setting(8, ge=1)
    #: Default phase timeouts in seconds (a workspace may override them).
    plan_timeout: float = setting(7200.0, gt=0)
    apply_timeout: float = setting(7200.0, gt=0)
    #: Seconds an ``apply_pending`` task may wait for confirmation before it
    #: is discarded; 0 turns this off.
    confirm_timeout: float = setting(0.0, ge=0)
    #: Seconds terraform gets after an interrupt (cancel, timeout) to save
    #: its state and exit before it is killed.
    kill_grace: float = setting(30.0, gt=0)
    #: Seconds terraform gets when its worker shuts down (SIGTERM). Below
    #: Docker's default 10 s stop grace, so the state is saved before SIGKILL.
    shutdown_grace: float = setting(8.0, gt=0)

    # -- PostgreSQL session limits: no stalled client can stall the cluster --
    #: Seconds a statement waits for a row lock before it fails.
    db_lock_timeout: float = setting(5.0, gt=0)
    db_statement_timeout: float = setting(30.0, gt=0)
    #: A client paused inside a transaction loses its session (and its row
    #: locks) after this many seconds.
    db_idle_in_transaction_timeout: float = setting(30.0, gt=0)

    # -- artifacts: what a run needs, stored by runq (no shared disk) -------
    #: Largest configuration version (the compressed snapshot of a
    #: workspace's directory taken at submit), in bytes.
    max_config_bytes: int = setting(10 * 1024 * 1024, gt=0)
    #: Largest saved plan or state an executor may send back, in bytes.
    max_artifact_bytes: int = setting(50 * 1024 * 1024, gt=0)
    #: Keep each phase's working copy after it ends (for debugging); by
    #: default it is removed, since everything in it that matters is stored.
    keep_workdirs: bool = False

    # -- remote executors (agents, Kubernetes Jobs) --------------------------
    #: An agent's pool token (``runq pool create`` prints it). Agents need
    #: this and the broker, and no database credentials.
    agent_token: str = ""
    #: Seconds between an agent's signed beats (who it is, what it runs).
    agent_beat_interval: float = setting(5.0, gt=0)
    #: An agent not heard from for this long no longer counts as capacity.
    agent_ttl: float = setting(30.0, gt=0)
    #: Seconds a remote executor waits for the scheduler's reply to a report.
    report_timeout: float = setting(10.0, gt=0)

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
    k8s_job_ttl: int = setting(3600, ge=0)
    #: A kubeconfig file; empty means in-cluster config, then ~/.kube/config.
    k8s_kubeconfig: str = ""
    #: The broker URL as the Jobs' pods reach it (it goes in each Job's
    #: Secret); empty means the scheduler's own.
    k8s_broker_url: str = ""

    def __init__(self, **values: Any) -> None:
        env = {k.lower(): v for k, v in os.environ.items() if k[:5].lower() == "runq_"}
        problems: list[str] = []
        for f in dataclasses.fields(self):
            if f.name in values:
                raw, source = values[f.name], f.name
            elif f"runq_{f.name}" in env:
                raw, source = env[f"runq_{f.name}"], f"RUNQ_{f.name.upper()}"
            else:
                object.__setattr__(self, f.name, f.default)
                continue
            try:
                object.__setattr__(self, f.name, _convert(raw, str(f.type), f.metadata))
            except (TypeError, ValueError) as exc:
                problems.append(f"{f.name} ({source}={raw!r}): {exc}")
        # Other keywords (pydantic-settings' _env_file, settings runq no
        # longer has) are ignored, as unknown RUNQ_* variables are.
        if not problems and self.heartbeat_interval * 2 > self.lease_ttl:
            problems.append(
                f"RUNQ_HEARTBEAT_INTERVAL ({self.heartbeat_interval}s) must be at most half "
                f"of RUNQ_LEASE_TTL ({self.lease_ttl}s), or one late heartbeat loses the lease"
            )
        if problems:
            raise InvalidSettings("invalid settings: " + "; ".join(problems))

    def model_copy(self, *, update: dict[str, Any] | None = None) -> Settings:
        """These settings with ``update`` applied (and checked again);
        pydantic's name, which callers and tests use."""
        return dataclasses.replace(self, **(update or {}))

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


_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "f", "n"})
_ENUMS: dict[str, type[StrEnum]] = {"DispatchMode": DispatchMode, "ExecutorKind": ExecutorKind}


def _convert(raw: object, kind: str, bounds: Any) -> Any:
    """``raw`` (a string from the environment, or a keyword's value) as a
    value of type ``kind`` (the field's annotation), within ``bounds``."""
    if kind in _ENUMS:
        enum = _ENUMS[kind]
        if isinstance(raw, enum):
            return raw
        if not isinstance(raw, str) or raw.lower() not in {m.value for m in enum}:
            raise ValueError(f"must be one of {', '.join(m.value for m in enum)}")
        return enum(raw.lower())
    if kind == "str":
        if not isinstance(raw, str):
            raise TypeError("must be a string")
        return raw
    if kind == "Path":
        if not isinstance(raw, str | os.PathLike):
            raise TypeError("must be a path")
        return Path(raw)
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word not in _TRUE | _FALSE:
            raise ValueError("must be true or false")
        return word in _TRUE
    return _number(raw, kind, bounds)


def _number(raw: object, kind: str, bounds: Any) -> float:
    """``raw`` as an ``int`` or ``float`` (``kind``) within ``bounds``."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise TypeError(f"must be a number ({kind})")
    if kind == "int" and isinstance(raw, float) and not raw.is_integer():
        raise ValueError("must be a whole number")
    number: float = int(raw) if kind == "int" else float(raw)
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    if bounds.get("gt") is not None and not number > bounds["gt"]:
        raise ValueError(f"must be greater than {bounds['gt']:g}")
    if bounds.get("ge") is not None and not number >= bounds["ge"]:
        raise ValueError(f"must be at least {bounds['ge']:g}")
    return number
