"""The same scenarios under RUNQ_DISPATCH_MODE=legacy, the replaced
behaviour: every task, plans included, goes through the workspace lock and
waits for the one before it. The measurements of test_scenarios.py must come
out the opposite way here; if they did not, those tests could not tell the
two behaviours apart.
"""

from __future__ import annotations

import itertools

import pytest

from scheduler.states import DispatchMode, TaskStatus
from tests.scenario import scenarios
from tests.scenario.cluster import Cluster, describe

pytestmark = [pytest.mark.scenario, pytest.mark.postgres, pytest.mark.terraform]


CLUSTER_MODE = DispatchMode.LEGACY
CLUSTER_REDIS_DB = 2


def test_legacy_plan_delays_plan_and_apply(cluster: Cluster) -> None:
    a, b = scenarios.plan_then_plan_and_apply(cluster)
    timeline = describe([a, b])
    assert a.task.status is TaskStatus.SUCCESS, timeline
    assert b.task.status is TaskStatus.APPLY_PENDING, timeline
    # The opposite of the new mode: B waited for plan A to end.
    assert a.claimed < a.ended <= b.claimed, timeline


def test_legacy_plans_run_one_at_a_time(cluster: Cluster) -> None:
    lives = scenarios.three_plans(cluster)
    timeline = describe(lives)
    assert all(life.task.status is TaskStatus.SUCCESS for life in lives), timeline
    # No instant inside all three: each plan waited for the one before.
    assert max(life.claimed for life in lives) >= min(life.ended for life in lives), timeline
    ordered = sorted(lives, key=lambda life: life.claimed)
    assert [life.task.queue_seq for life in ordered] == sorted(
        life.task.queue_seq for life in lives
    )
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.ended <= later.claimed, timeline


def test_legacy_mixed_plan_waits_for_apply(cluster: Cluster) -> None:
    a, b, c = scenarios.mixed(cluster)
    timeline = describe([a, b, c])
    assert a.task.status is TaskStatus.APPLIED, timeline
    assert b.task.status is TaskStatus.SUCCESS, timeline
    assert c.task.status is TaskStatus.APPLIED, timeline
    # The opposite of the new mode: plan B waited for A to end...
    assert a.ended <= b.claimed, timeline
    # ...and C, behind B in the queue, for B.
    assert b.ended <= c.claimed, timeline
