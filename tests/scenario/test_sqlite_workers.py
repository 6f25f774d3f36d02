"""runq's embedded default: several worker processes sharing one SQLite file
(WAL, BEGIN IMMEDIATE, busy timeout). The dispatch storm and the three
concurrent plans, the heaviest write contention of the scenarios, on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.db import make_engine, upgrade
from scheduler.states import DispatchMode, TaskStatus
from tests.conftest import RedisServer
from tests.scenario import scenarios
from tests.scenario.cluster import Cluster, describe, redis_db, start_cluster

pytestmark = [pytest.mark.scenario, pytest.mark.terraform]


@pytest.fixture(scope="module")
def cluster(
    private_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    terraform_bin: str,
    terraform_env: dict[str, str],
) -> Iterator[Cluster]:
    root = Path(tmp_path_factory.mktemp("cluster-sqlite"))
    url = f"sqlite:///{root / 'runq.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    with start_cluster(
        mode=DispatchMode.NEW,
        database_url=url,
        redis_url=redis_db(private_redis.url, 3),
        root=root,
        terraform_bin=terraform_bin,
        terraform_env=terraform_env,
    ) as c:
        yield c


def test_sqlite_three_plans_run_at_the_same_time(cluster: Cluster) -> None:
    lives = scenarios.three_plans(cluster)
    timeline = describe(lives)
    assert all(life.task.status is TaskStatus.SUCCESS for life in lives), timeline
    assert max(life.claimed for life in lives) < min(life.ended for life in lives), timeline


def test_sqlite_dispatch_storm(cluster: Cluster) -> None:
    scenarios.check_storm(*scenarios.dispatch_storm(cluster))
