"""``runq metrics``: Prometheus metrics, computed from the database at scrape time.

The database is the source of truth, so the figures are the whole cluster's,
however many workers share the work, and no worker keeps a counter that a
restart would lose or that would be split across processes:

* gauges (tasks by status, active phases, queue depths, the oldest pending
  task's age) are counted afresh on every scrape;
* counters and histograms (successes and failures, scheduling latency, the
  hand-off gap) are folded from ``task_events`` incrementally: the collector
  keeps the id of the last event it folded and reads only newer rows on each
  scrape (the first scrape folds the whole history once). They live in the
  ``runq metrics`` process, so they restart from the history when it
  restarts: a counter reset, which Prometheus's ``rate()`` expects;
* dispatch decisions (workspace lock busy, claims, skips) happen in no
  table: the dispatcher counts them in the Redis hash
  :data:`scheduler.dispatcher.DISPATCH_COUNTS_KEY`, read on each scrape.

On PostgreSQL an event id can become visible after a higher one (two
transactions commit out of order); ids skipped over are asked for again on
later scrapes for :data:`GAP_TTL` seconds, so such an event is still counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from scheduler.dispatcher import DISPATCH_COUNTS_KEY
from scheduler.models import Task, TaskEvent, Workspace, utcnow
from scheduler.runtime import Runtime
from scheduler.states import RUNNING, TaskStatus, TaskType, phase_of

log = logging.getLogger(__name__)

#: Histogram bucket bounds, seconds: a claim within milliseconds up to a
#: backlog of an hour.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Events read per query while folding (the first scrape reads the history).
BATCH = 5000
#: How long a skipped event id is looked for again (see the module doc).
GAP_TTL = 300.0
#: At most this many skipped ids are remembered.
MAX_GAPS = 1000

#: Every metric family exported, and its type; the Grafana dashboard
#: (deploy/grafana/runq-dashboard.json) is checked against it.
FAMILIES = {
    "runq_task_successes": "counter",
    "runq_task_failures": "counter",
    "runq_plan_reclaims": "counter",
    "runq_scheduling_latency_seconds": "histogram",
    "runq_handoff_gap_seconds": "histogram",
    "runq_tasks": "gauge",
    "runq_active_phases": "gauge",
    "runq_workspace_queue_depth": "gauge",
    "runq_oldest_pending_task_age_seconds": "gauge",
    "runq_dispatch_decisions": "counter",
}

S = TaskStatus
SUCCESS = frozenset({S.SUCCESS, S.APPLIED})
FAILURE = frozenset({S.FAILED, S.CANCELLED, S.DISCARDED})


def failure_reason(to_status: str, reason: str | None) -> str:
    """The failure-reason label of an event that ended (or re-claimed) a task."""
    if to_status == S.CANCELLED:
        return "cancelled"
    r = (reason or "").lower()
    if to_status == S.DISCARDED:
        return "unconfirmed" if r.startswith("not confirmed") else "discarded"
    if r.startswith("executor lost"):
        return "executor_lost"
    if r.startswith("worker shut down"):
        return "worker_shutdown"
    if "timed out" in r or "(timeout)" in r:
        return "timed_out"
    if r.startswith("hand-off failed"):
        return "handoff_failed"
    if "saved plan" in r:
        return "saved_plan"
    if r.startswith(("plan failed", "apply failed")):
        return "terraform_error"
    return "other"


@dataclass
class Histogram:
    """Cumulative buckets of one labelled series."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        value = max(value, 0.0)
        self.total += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip([*map(str, map(float, BUCKETS)), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


_EVENTS = select(
    TaskEvent.id,
    TaskEvent.task_id,
    TaskEvent.from_status,
    TaskEvent.to_status,
    TaskEvent.reason,
    TaskEvent.at,
    Task.type,
    Task.workspace_id,
    Task.created_at,
).join(Task, Task.id == TaskEvent.task_id)


class RunqCollector:
    """A :class:`prometheus_client.registry.Collector` over runq's tables."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._high_water = 0
        #: Event ids skipped over, and when (monotonic) they were first missed.
        self._gaps: dict[int, float] = {}
        self._successes: Counter[tuple[str, ...]] = Counter()
        self._failures: Counter[tuple[str, ...]] = Counter()
        self._reclaims: Counter[tuple[str, ...]] = Counter()
        self._latency: dict[tuple[str, str], Histogram] = {}
        self._handoff = Histogram()
        #: Task id -> when its apply was queued (until it is claimed).
        self._apply_queued_at: dict[int, datetime] = {}
        #: Workspace id -> when its last plan+apply ended (until the next claim).
        self._last_end: dict[int, datetime] = {}

    # -------------------------------------------------------------- folding

    def fold(self) -> int:
        """Fold the events written since the last call; how many."""
        with self._lock, self.rt.sessions() as s:
            n = 0
            if self._gaps:
                n += self._fold_gaps(s)
            while True:
                rows = s.execute(
                    _EVENTS.where(TaskEvent.id > self._high_water)
                    .order_by(TaskEvent.id)
                    .limit(BATCH)
                ).all()
                if not rows:
                    return n
                self._note_gaps([r.id for r in rows])
                for row in rows:
                    self._fold_one(row)
                n += len(rows)
                if len(rows) < BATCH:
                    return n

    def _note_gaps(self, ids: list[int]) -> None:
        now = time.monotonic()
        expected = self._high_water + 1
        for event_id in ids:
            # A jump past MAX_GAPS (pruned history, a sequence's cache lost
            # in a crash) is not a window of transactions still committing.
            for missing in range(max(expected, event_id - MAX_GAPS), event_id):
                if len(self._gaps) < MAX_GAPS:
                    self._gaps[missing] = now
            expected = event_id + 1
        self._high_water = ids[-1]

    def _fold_gaps(self, s: Session) -> int:
        now = time.monotonic()
        self._gaps = {i: t for i, t in self._gaps.items() if now - t < GAP_TTL}
        rows = s.execute(
            _EVENTS.where(TaskEvent.id.in_(sorted(self._gaps))).order_by(TaskEvent.id)
        ).all()
        for row in rows:
            del self._gaps[row.id]
            self._fold_one(row)
        return len(rows)

    def _fold_one(self, e: Any) -> None:
        to, task_type = e.to_status, e.type
        if e.from_status == S.PENDING and to == S.PLANNING:
            self._observe_latency(task_type, "plan", e.at - e.created_at)
            if task_type == TaskType.PLAN_AND_APPLY:
                ended = self._last_end.pop(e.workspace_id, None)
                # A hand-off: this task was already waiting when the last ended.
                if ended is not None and e.created_at <= ended:
                    self._handoff.observe((e.at - ended).total_seconds())
        elif e.from_status == S.PLANNING and to == S.PLANNING:  # executor lost
            self._reclaims[(failure_reason(to, e.reason),)] += 1
        elif to == S.APPLY_QUEUED:
            self._apply_queued_at[e.task_id] = e.at
        elif to == S.APPLYING:
            queued = self._apply_queued_at.pop(e.task_id, None)
            if queued is not None:
                self._observe_latency(task_type, "apply", e.at - queued)
        if to in SUCCESS:
            self._successes[(task_type, to)] += 1
        elif to in FAILURE:
            self._failures[(task_type, failure_reason(to, e.reason))] += 1
        if to in SUCCESS | FAILURE:
            self._apply_queued_at.pop(e.task_id, None)
            if task_type == TaskType.PLAN_AND_APPLY:
                self._last_end[e.workspace_id] = e.at

    def _observe_latency(self, task_type: str, phase: str, waited: Any) -> None:
        hist = self._latency.setdefault((task_type, phase), Histogram())
        hist.observe(waited.total_seconds())

    # -------------------------------------------------------------- a scrape

    def describe(self) -> Iterable[Metric]:
        return []  # computed per scrape; nothing to check at registration

    def collect(self) -> list[Metric]:
        self.fold()
        with self._lock:
            families = list(self._cumulative())
        with self.rt.sessions() as s:
            families += self._gauges(s)
        return families + list(self._dispatch_counts())

    def _cumulative(self) -> Iterator[Metric]:
        yield _counter(
            "runq_task_successes",
            "Tasks that ended well, by type and final status (success, applied).",
            ["type", "status"],
            self._successes,
        )
        yield _counter(
            "runq_task_failures",
            "Tasks that ended failed, cancelled or discarded, by type and reason.",
            ["type", "reason"],
            self._failures,
        )
        yield _counter(
            "runq_plan_reclaims",
            "Plans re-claimed after their executor was lost, by reason.",
            ["reason"],
            self._reclaims,
        )
        latency = HistogramMetricFamily(
            "runq_scheduling_latency_seconds",
            "Submit-to-start latency: a phase became runnable (the task was submitted; "
            "its apply was queued) until it was claimed, by task type and phase.",
            labels=["type", "phase"],
        )
        for (task_type, phase), hist in sorted(self._latency.items()):
            latency.add_metric([task_type, phase], hist.buckets(), hist.total)
        yield latency
        gap = HistogramMetricFamily(
            "runq_handoff_gap_seconds",
            "A workspace's previous plan+apply ended until the next one, already "
            "waiting, was claimed.",
            labels=[],
        )
        gap.add_metric([], self._handoff.buckets(), self._handoff.total)
        yield gap

    def _gauges(self, s: Session) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "runq_tasks", "Tasks by type and status.", labels=["type", "status"]
        )
        counts = {
            (str(t), str(st)): int(n)
            for t, st, n in s.execute(
                select(Task.type, Task.status, func.count()).group_by(Task.type, Task.status)
            )
        }
        for task_type in TaskType:
            for st in TaskStatus:
                by_status.add_metric([task_type, st], counts.get((task_type, st), 0))
        yield by_status

        active = GaugeMetricFamily(
            "runq_active_phases",
            "Plans and applies running now, by phase, execution mode and pool.",
            labels=["phase", "mode", "pool"],
        )
        for status, mode, pool, n in s.execute(
            select(Task.status, Workspace.execution_mode, Workspace.agent_pool, func.count())
            .join(Workspace, Workspace.id == Task.workspace_id)
            .where(Task.status.in_([str(x) for x in RUNNING]))
            .group_by(Task.status, Workspace.execution_mode, Workspace.agent_pool)
        ):
            active.add_metric([str(phase_of(TaskStatus(status))), mode, pool or ""], int(n))
        yield active

        depth = GaugeMetricFamily(
            "runq_workspace_queue_depth", "Pending tasks per workspace.", labels=["workspace"]
        )
        for name, n in s.execute(
            select(Workspace.name, func.count(Task.id))
            .outerjoin(Task, and_(Task.workspace_id == Workspace.id, Task.status == S.PENDING))
            .group_by(Workspace.name)
        ):
            depth.add_metric([name], int(n))
        yield depth

        oldest = GaugeMetricFamily(
            "runq_oldest_pending_task_age_seconds",
            "Age of the oldest pending task, by type (0 when none is pending).",
            labels=["type"],
        )
        firsts = {
            str(task_type): first
            for task_type, first in s.execute(
                select(Task.type, func.min(Task.created_at))
                .where(Task.status == S.PENDING)
                .group_by(Task.type)
            )
        }
        now = utcnow()
        for task_type in TaskType:
            first = firsts.get(task_type)
            age = (now - first).total_seconds() if first is not None else 0.0
            oldest.add_metric([task_type], max(age, 0.0))
        yield oldest

    def _dispatch_counts(self) -> Iterator[Metric]:
        try:
            raw = cast(dict[bytes, bytes], self.rt.redis.hgetall(DISPATCH_COUNTS_KEY))
        except Exception as exc:
            log.warning("metrics: cannot read dispatch counts from Redis (%s)", exc)
            return
        yield _counter(
            "runq_dispatch_decisions",
            "Dispatcher decisions by outcome: claimed_plan, claimed_apply, skipped, "
            "lock_busy (the workspace lock was held: marked dirty, no wait), "
            "dirty_rerun (the holder ran once more for a dirty mark).",
            ["outcome"],
            {(outcome.decode(),): int(n) for outcome, n in raw.items()},
        )


def _counter(
    name: str, documentation: str, labels: list[str], counts: Mapping[tuple[str, ...], int]
) -> CounterMetricFamily:
    """A counter family with one series per key of ``counts`` (its label
    values, in ``labels``' order), in sorted order."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, n in sorted(counts.items()):
        family.add_metric(list(values), n)
    return family


def registry_for(rt: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RunqCollector(rt))
    return registry


def serve(rt: Runtime, host: str, port: int) -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread: (server, thread)."""
    return start_http_server(port, addr=host, registry=registry_for(rt))
