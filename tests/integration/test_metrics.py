"""``runq metrics``: the figures a scrape shows move as tasks run.

The metrics endpoint is served for real (``scheduler.metrics.serve``, or the
``runq metrics`` console script) on a loopback port and scraped over HTTP;
tasks run through the scheduler in-process with the fake executor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from scheduler import dispatcher, tasks
from scheduler.dispatcher import DISPATCH_COUNTS_KEY
from scheduler.locks import workspace_lock
from scheduler.metrics import FAMILIES, serve
from scheduler.runtime import Runtime
from scheduler.states import TaskType
from scheduler.supervise import free_port
from tests.integration.helpers import (
    APPLY_OK,
    PLAN_FAILED,
    PLAN_NO_CHANGES,
    PLAN_WITH_CHANGES,
    last_handoff,
    run_phase,
)

PA = TaskType.PLAN_AND_APPLY
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def families(url: str) -> list[Metric]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return list(text_string_to_metric_families(resp.read().decode()))


def scrape(url: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in families(url) for s in f.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 if the series is absent (a counter not yet seen)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metrics(rt: Runtime) -> Iterator[Callable[[], Samples]]:
    """Scrape the metrics endpoint served over ``rt``'s database and Redis."""
    server, thread = serve(rt, "127.0.0.1", free_port())
    host, port = server.server_address[:2]
    yield lambda: scrape(f"http://{host}:{port}/metrics")
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_figures_move_as_tasks_run(rt: Runtime, ws: str, metrics: Callable[[], Samples]) -> None:
    before = metrics()
    assert value(before, "runq_tasks", type="plan", status="pending") == 0
    assert value(before, "runq_workspace_queue_depth", workspace=ws) == 0
    assert value(before, "runq_oldest_pending_task_age_seconds", type="plan") == 0
    assert value(before, "runq_handoff_gap_seconds_count") == 0

    # A plan: pending, then claimed (latency observed), then successful.
    plan = tasks.submit(rt, ws, TaskType.PLAN)
    m = metrics()
    assert value(m, "runq_tasks", type="plan", status="pending") == 1
    assert value(m, "runq_workspace_queue_depth", workspace=ws) == 1
    assert value(m, "runq_oldest_pending_task_age_seconds", type="plan") > 0
    assert dispatcher.claim_plan(rt, plan.id).claimed
    m = metrics()
    assert value(m, "runq_tasks", type="plan", status="planning") == 1
    assert value(m, "runq_active_phases", phase="plan", mode="local", pool="") == 1
    assert value(m, "runq_scheduling_latency_seconds_count", type="plan", phase="plan") == 1
    assert value(m, "runq_scheduling_latency_seconds_bucket", type="plan", phase="plan", le="+Inf")
    run_phase(rt, plan.id, PLAN_NO_CHANGES)
    m = metrics()
    assert value(m, "runq_tasks", type="plan", status="success") == 1
    assert value(m, "runq_active_phases", phase="plan", mode="local", pool="") == 0
    assert value(m, "runq_task_successes_total", type="plan", status="success") == 1

    # Two plan+applies: the first is planned, confirmed and applied while the
    # second waits; the second is claimed the moment the first ends (a hand-off).
    first = tasks.submit(rt, ws, PA)
    second = tasks.submit(rt, ws, PA)
    assert dispatcher.dispatch(rt, ws).task_id == first.id
    run_phase(rt, first.id, PLAN_WITH_CHANGES)
    tasks.confirm(rt, first.id)
    m = metrics()
    assert value(m, "runq_tasks", type=PA, status="apply_queued") == 1
    assert value(m, "runq_workspace_queue_depth", workspace=ws) == 1
    assert value(m, "runq_oldest_pending_task_age_seconds", type=PA) > 0
    assert dispatcher.dispatch(rt, ws).action == "claimed_apply"
    apply = last_handoff(rt, first.id)
    m = metrics()
    assert value(m, "runq_active_phases", phase="apply", mode="local", pool="") == 1
    assert value(m, "runq_scheduling_latency_seconds_count", type=PA, phase="apply") == 1
    assert value(m, "runq_scheduling_latency_seconds_count", type=PA, phase="plan") == 1
    run_phase(rt, apply, APPLY_OK)
    assert dispatcher.dispatch(rt, ws).task_id == second.id
    m = metrics()
    assert value(m, "runq_task_successes_total", type=PA, status="applied") == 1
    assert value(m, "runq_handoff_gap_seconds_count") == 1
    assert value(m, "runq_scheduling_latency_seconds_count", type=PA, phase="plan") == 2
    assert value(m, "runq_workspace_queue_depth", workspace=ws) == 0
    assert value(m, "runq_oldest_pending_task_age_seconds", type=PA) == 0

    # Failures, by reason.
    run_phase(rt, second.id, PLAN_FAILED)
    doomed = tasks.submit(rt, ws, TaskType.PLAN)
    tasks.cancel(rt, doomed.id)
    m = metrics()
    assert value(m, "runq_task_failures_total", type=PA, reason="terraform_error") == 1
    assert value(m, "runq_task_failures_total", type="plan", reason="cancelled") == 1
    assert value(m, "runq_tasks", type=PA, status="failed") == 1
    assert value(m, "runq_tasks", type="plan", status="cancelled") == 1

    # Dispatch decisions, from Redis: the claims above, and a busy lock.
    assert value(m, "runq_dispatch_decisions_total", outcome="claimed_plan") == 2
    assert value(m, "runq_dispatch_decisions_total", outcome="claimed_apply") == 1
    busy = value(m, "runq_dispatch_decisions_total", outcome="lock_busy")
    with workspace_lock(rt.redis, ws, ttl=30) as held:
        assert held
        assert dispatcher.dispatch(rt, ws).action == "lock_busy"
    m = metrics()
    assert value(m, "runq_dispatch_decisions_total", outcome="lock_busy") == busy + 1

    # A scrape with nothing new folds nothing twice.
    again = metrics()
    for key in ("runq_task_successes_total", "runq_task_failures_total"):
        assert sum(v for (n, _), v in again.items() if n == key) == sum(
            v for (n, _), v in m.items() if n == key
        )


def test_history_is_folded_on_the_first_scrape(rt: Runtime, ws: str) -> None:
    """A collector started after the work counts it: the database is the truth."""
    t = tasks.submit(rt, ws, TaskType.PLAN)
    assert dispatcher.claim_plan(rt, t.id).claimed
    run_phase(rt, t.id, PLAN_FAILED)
    server, thread = serve(rt, "127.0.0.1", free_port())
    try:
        host, port = server.server_address[:2]
        url = f"http://{host}:{port}/metrics"
        m = scrape(url)
        # Every family the dashboard may name is there, with its type.
        assert {f.name: f.type for f in families(url)} == FAMILIES
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert value(m, "runq_task_failures_total", type="plan", reason="terraform_error") == 1
    assert value(m, "runq_scheduling_latency_seconds_count", type="plan", phase="plan") == 1


def test_a_failed_count_never_fails_a_dispatch(
    rt: Runtime, ws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise ConnectionError("redis went away")

    t = tasks.submit(rt, ws, PA)
    monkeypatch.setattr(rt.redis, "hincrby", broken)
    decision = dispatcher.dispatch(rt, ws)
    assert decision.claimed and decision.task_id == t.id
    assert rt.redis.hgetall(DISPATCH_COUNTS_KEY) == {}


RUNQ = Path(sys.prefix) / "bin" / "runq"


def test_runq_metrics_command(sqlite_url: str, redis_url: str, tmp_path: Path) -> None:
    """The console script serves the same figures, read from the database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNQ_")}
    env.update(RUNQ_DATABASE_URL=sqlite_url, RUNQ_REDIS_URL=redis_url, RUNQ_DATA_DIR=str(tmp_path))
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(
        [str(RUNQ), "workspace", "create", "net", "--dir", str(src)], env=env, check=True
    )
    subprocess.run([str(RUNQ), "submit", "net", "--type", "plan"], env=env, check=True)
    port = free_port()
    proc = subprocess.Popen(
        [str(RUNQ), "metrics", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                m = scrape(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "runq metrics did not start"
                time.sleep(0.2)
        assert value(m, "runq_tasks", type="plan", status="pending") == 1
        assert value(m, "runq_workspace_queue_depth", workspace="net") == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
