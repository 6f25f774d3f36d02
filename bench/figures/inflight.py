"""Plan start latency with slow plan+applies in flight, against the same
load without one in the plan's own workspace.

Workers get ``RUNQ_FAKE_APPLY_SECONDS`` (several seconds; plans 0 s) and
enough processes that the in-flight applies leave some free. Each cycle:
one auto-apply plan+apply in each of W "busy" workspaces, wait until every
one is ``applying``; then a burst of one plan in each of W idle workspaces
(the baseline: the same applies in flight, elsewhere), waited for; then a
burst of one plan in each busy workspace (the two bursts swap places every other
cycle). Latency = ``phase_started_at`` -
submit. In legacy mode a plan waits for its workspace's apply to end: that
is the point of the comparison (each wait is capped by the apply's length).
"""

from __future__ import annotations

import time

from bench.harness import Bench
from scheduler import tasks, workspaces
from scheduler.api import wait
from scheduler.runtime import Runtime
from scheduler.states import TaskStatus, TaskType

RUNNING_APPLY = frozenset({TaskStatus.APPLYING}) | frozenset(
    {TaskStatus.APPLIED, TaskStatus.FAILED}
)


def _burst(rt: Runtime, names: list[str], timeout: float) -> list[float]:
    began: dict[int, float] = {}
    for name in names:
        t0 = time.time()
        began[tasks.submit(rt, name, TaskType.PLAN).id] = t0
    views = wait(rt, list(began), timeout=timeout, poll=0.01)
    out = []
    for v in views:
        assert v.status is TaskStatus.SUCCESS and v.phase_started_at is not None, v
        out.append(1000 * (v.phase_started_at.timestamp() - began[v.id]))
    return out


def run(
    bench: Bench, rt: Runtime, n_workspaces: int, cycles: int, apply_seconds: float
) -> dict[str, list[float]]:
    busy = bench.names("busy", n_workspaces)
    idle = bench.names("idle", n_workspaces)
    for name in busy + idle:
        workspaces.create(rt, name, source_dir=bench.source_dir, auto_apply=True)
    with_, without = [], []
    for cycle in range(cycles):
        applies = [tasks.submit(rt, name, TaskType.PLAN_AND_APPLY).id for name in busy]
        views = wait(rt, applies, timeout=120, until=RUNNING_APPLY, poll=0.01)
        assert all(v.status is TaskStatus.APPLYING for v in views), views
        # Which burst goes first alternates from one cycle to the next.
        if cycle % 2 == 0:
            without += _burst(rt, idle, timeout=60 + apply_seconds)
            with_ += _burst(rt, busy, timeout=60 + apply_seconds)
        else:
            with_ += _burst(rt, busy, timeout=60 + apply_seconds)
            without += _burst(rt, idle, timeout=60 + apply_seconds)
        wait(rt, applies, timeout=60 + apply_seconds, poll=0.1)
    return {"with_ms": with_, "without_ms": without}
