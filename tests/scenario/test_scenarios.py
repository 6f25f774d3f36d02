"""The seed's four scenarios and a dispatch race, in the new dispatch mode,
with two real ``celery -A celery_app worker`` processes, PostgreSQL, a
private Redis and the real terraform binary (paused by a wrapper so phases
last seconds), once with Redis as the broker and once with RabbitMQ.

Verdicts are orderings of recorded ``task_events`` timestamps. The legacy
contrast (tests/scenario/test_legacy_contrast.py) runs the same scenarios
with RUNQ_DISPATCH_MODE=legacy and asserts the opposite orderings.
"""

from __future__ import annotations

import pytest

from scheduler.states import DispatchMode
from tests.scenario import scenarios
from tests.scenario.cluster import Cluster, Life

pytestmark = [pytest.mark.scenario, pytest.mark.postgres, pytest.mark.terraform]


CLUSTER_MODE = DispatchMode.NEW
CLUSTER_REDIS_DB = 1
#: Everything here runs on Redis and on RabbitMQ (a cluster each).
CLUSTER_BROKERS = ("redis", "amqp")


def test_plan_does_not_delay_plan_and_apply(cluster: Cluster) -> None:
    scenarios.check_plan_does_not_delay_plan_and_apply(*scenarios.plan_then_plan_and_apply(cluster))


def test_three_plans_run_at_the_same_time(cluster: Cluster) -> None:
    scenarios.check_three_plans_at_once(scenarios.three_plans(cluster))


def test_plan_and_applies_never_overlap_and_keep_queue_order(cluster: Cluster) -> None:
    scenarios.check_plan_and_applies_serialized(*scenarios.two_plan_and_applies(cluster))


def test_mixed_plan_runs_beside_apply_next_plan_and_apply_waits(cluster: Cluster) -> None:
    scenarios.check_mixed(*scenarios.mixed(cluster))


def test_dispatch_storm_claims_each_task_once_in_queue_order(cluster: Cluster) -> None:
    scenarios.check_storm(*scenarios.dispatch_storm(cluster))


def worker_pid(actor_or_handle: str) -> int | None:
    """The process id in an actor ``worker@host:pid`` or an executor handle
    ``local:host:pid:run`` (the run token makes each handle unique)."""
    if actor_or_handle.startswith("worker@"):
        return int(actor_or_handle.rsplit(":", 1)[1])
    if actor_or_handle.startswith("local:"):
        _local, _host, pid, _run = actor_or_handle.split(":")
        return int(pid)
    return None


def test_work_is_spread_over_separate_worker_processes(cluster: Cluster) -> None:
    ws = cluster.workspace("spread", plan_seconds=2)
    ids = [cluster.submit(ws, "plan").id for _ in range(6)]
    cluster.wait(ids)

    lives: list[Life] = cluster.all_lives()  # this test's tasks and the ones before
    pids = {worker_pid(a) for life in lives for a in life.actors} - {None}
    pids |= {worker_pid(life.task.executor_handle or "") for life in lives} - {None}
    owners = {pid: cluster.pool.worker_of(pid) for pid in pids if pid is not None}
    assert None not in owners.values(), f"a pid outside the test's workers: {owners}"
    assert len(set(owners.values())) >= 2, f"one worker did everything: {owners}"
    assert len(owners) >= 3, owners  # pool processes, not one process
