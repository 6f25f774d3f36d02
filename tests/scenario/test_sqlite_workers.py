"""runq's embedded default: several worker processes sharing one SQLite file
(WAL, BEGIN IMMEDIATE, busy timeout). The dispatch storm and the three
concurrent plans, the heaviest write contention of the scenarios, on it."""

from __future__ import annotations

import pytest

from scheduler.states import DispatchMode, TaskStatus
from tests.scenario import scenarios
from tests.scenario.cluster import Cluster, describe

pytestmark = [pytest.mark.scenario, pytest.mark.terraform]


CLUSTER_MODE = DispatchMode.NEW
CLUSTER_REDIS_DB = 3
CLUSTER_DATABASE = "sqlite"


def test_sqlite_three_plans_run_at_the_same_time(cluster: Cluster) -> None:
    lives = scenarios.three_plans(cluster)
    timeline = describe(lives)
    assert all(life.task.status is TaskStatus.SUCCESS for life in lives), timeline
    assert max(life.claimed for life in lives) < min(life.ended for life in lives), timeline


def test_sqlite_dispatch_storm(cluster: Cluster) -> None:
    scenarios.check_storm(*scenarios.dispatch_storm(cluster))
