"""``runq status``: is the cluster alive, and is anything owed?

Three questions an operator asks first, each answered from its source of
truth: when did the reconciler (``celery beat``) last sweep (the database's
``service_beats``), which workers answer a ping (Celery's control channel),
and how deep is each queue (the broker). A sweep older than
:data:`OVERDUE_SWEEPS` intervals means beat is down: lost hints and lapsed
leases then wait for nobody, so ``--check`` fails (the compose health check).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from executors.remote import REPORTS_QUEUE, pool_queue
from scheduler import brokers
from scheduler.messages import ALL_QUEUES
from scheduler.models import AgentPool, Task, utcnow
from scheduler.reconciler import last_sweep
from scheduler.runtime import Runtime
from scheduler.states import RUNNING

if TYPE_CHECKING:
    from celery import Celery

#: Sweeps missed before beat counts as down (one may be late under load).
OVERDUE_SWEEPS = 3


@dataclass(frozen=True)
class Status:
    last_sweep_at: datetime | None
    sweep_interval: float
    now: datetime
    workers: list[str] | None
    queues: dict[str, int | None]
    tasks: dict[str, int]
    #: Running phases whose lease has lapsed (the next sweep handles them).
    lapsed: int

    @property
    def sweep_age(self) -> float | None:
        if self.last_sweep_at is None:
            return None
        return (self.now - self.last_sweep_at).total_seconds()

    @property
    def sweep_overdue(self) -> bool:
        age = self.sweep_age
        return age is None or age > OVERDUE_SWEEPS * self.sweep_interval

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.last_sweep_at is None:
            out.append("the reconciler has never swept: is `celery -A celery_app beat` running?")
        elif self.sweep_overdue:
            out.append(
                f"the reconciler's last sweep was {self.sweep_age:.0f}s ago (interval "
                f"{self.sweep_interval:g}s): `celery beat` looks down, so lost messages and "
                "dead executors are not being healed"
            )
        if self.workers == []:
            out.append("no celery worker answered a ping")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "reconciler": {
                "last_sweep_at": self.last_sweep_at.isoformat() if self.last_sweep_at else None,
                "age_seconds": self.sweep_age,
                "interval_seconds": self.sweep_interval,
                "overdue": self.sweep_overdue,
            },
            "workers": self.workers,
            "queues": self.queues,
            "tasks": self.tasks,
            "lapsed_leases": self.lapsed,
            "problems": self.problems(),
            "ok": not self.problems(),
        }


def collect(rt: Runtime, app: Celery | None = None, *, ping_timeout: float = 1.0) -> Status:
    """Gather the status; with ``app``, also ping workers and size queues."""
    now = utcnow()
    beat = last_sweep(rt)
    with rt.sessions() as s:
        counts = {
            str(status): int(n)
            for status, n in s.execute(select(Task.status, func.count()).group_by(Task.status))
        }
        lapsed = int(
            s.scalar(
                select(func.count()).where(
                    Task.status.in_([str(x) for x in RUNNING]), Task.lease_expires_at < now
                )
            )
            or 0
        )
        # Remote executors' reports, and each agent pool's hand-offs: a deep
        # pool queue means the pool lacks agents.
        names = [
            *ALL_QUEUES,
            REPORTS_QUEUE,
            *(
                pool_queue(p)
                for p in s.scalars(
                    select(AgentPool.name).where(AgentPool.kind == "agent").order_by(AgentPool.name)
                )
            ),
        ]
    workers: list[str] | None = None
    queues: dict[str, int | None] = dict.fromkeys(names)
    if app is not None:
        workers = _ping(app, ping_timeout)
        queues = queue_depths(app, names)
    return Status(
        last_sweep_at=beat.at if beat else None,
        sweep_interval=rt.settings.reconcile_interval,
        now=now,
        workers=workers,
        queues=queues,
        tasks=counts,
        lapsed=lapsed,
    )


def _ping(app: Celery, timeout: float) -> list[str] | None:
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:
        return None  # the broker is down: unknown, not "no workers"
    return sorted(name for reply in replies for name in reply)


def queue_depths(app: Celery, names: list[str]) -> dict[str, int | None]:
    """Messages waiting in each queue (not those a worker has reserved).

    None for every queue when the broker cannot be reached.
    """
    with app.connection_for_read() as conn:
        return brokers.queue_depths(conn, names)
