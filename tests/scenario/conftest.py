"""Scenario tests: real celery workers. A failing test shows their logs.

Each test module gets its own cluster (workers started once per module) and
says which with module attributes: ``CLUSTER_MODE`` (a DispatchMode),
``CLUSTER_REDIS_DB`` (a database of the private redis-server no other module
uses) and optionally ``CLUSTER_DATABASE = "sqlite"`` (default: the session's
PostgreSQL database), ``CLUSTER_WORKERS`` (default 2) and
``CLUSTER_CONCURRENCY`` (default 3 processes each), ``CLUSTER_SEPARATE_HOSTS``
(a data directory per worker; default False), ``CLUSTER_AGENTS`` /
``CLUSTER_AGENT_CAPACITY`` (``runq agent`` processes, default none),
``CLUSTER_EXECUTION_MODE`` (the workspaces' default mode) and
``CLUSTER_BROKERS`` (default ``("redis",)``): with ``("redis", "amqp")``
every test of the module runs on both brokers, one cluster each; the amqp
cluster's broker is a private vhost on the machine's RabbitMQ (Redis still
holds the lock).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.db import make_engine, upgrade
from scheduler.states import ExecutionMode
from scheduler.supervise import RedisServer
from tests.scenario.cluster import Cluster, redis_db, start_cluster
from tests.workers import RabbitMQ


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    brokers = getattr(metafunc.module, "CLUSTER_BROKERS", None)
    if brokers is not None and "broker" in metafunc.fixturenames:
        metafunc.parametrize("broker", brokers, scope="module")


@pytest.fixture(scope="module")
def broker() -> str:
    """The cluster's broker, where the module names no CLUSTER_BROKERS."""
    return "redis"


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest,
    broker: str,
    private_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    terraform_bin: str,
    terraform_env: dict[str, str],
) -> Iterator[Cluster]:
    module = request.module
    root = Path(tmp_path_factory.mktemp(f"cluster-{module.__name__.rsplit('.', 1)[-1]}"))
    if getattr(module, "CLUSTER_DATABASE", "postgres") == "sqlite":
        url = f"sqlite:///{root / 'runq.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
    else:
        url = str(request.getfixturevalue("pg_database_url"))
    rabbitmq: RabbitMQ | None = None
    broker_url = ""
    if broker == "amqp":
        rabbitmq = request.getfixturevalue("rabbitmq")
        broker_url = rabbitmq.vhost()
    with start_cluster(
        mode=module.CLUSTER_MODE,
        database_url=url,
        redis_url=redis_db(private_redis.url, module.CLUSTER_REDIS_DB),
        root=root,
        terraform_bin=terraform_bin,
        terraform_env=terraform_env,
        broker_url=broker_url,
        workers=getattr(module, "CLUSTER_WORKERS", 2),
        concurrency=getattr(module, "CLUSTER_CONCURRENCY", 3),
        separate_hosts=getattr(module, "CLUSTER_SEPARATE_HOSTS", False),
        agents=getattr(module, "CLUSTER_AGENTS", 0),
        agent_capacity=getattr(module, "CLUSTER_AGENT_CAPACITY", 2),
        execution_mode=getattr(module, "CLUSTER_EXECUTION_MODE", ExecutionMode.LOCAL),
    ) as c:
        yield c
    if rabbitmq is not None:
        rabbitmq.delete(broker_url)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    cluster = getattr(item, "funcargs", {}).get("cluster")
    if isinstance(cluster, Cluster):
        for name, text in cluster.logs().items():
            what = "runq agent" if name.startswith("a") else "celery worker"
            report.sections.append((f"{what} {name} log (last lines)", text))
