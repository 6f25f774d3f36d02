"""Settings from RUNQ_* environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from scheduler.settings import Settings
from scheduler.states import DispatchMode


def test_defaults(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = Settings()
    assert s.data_dir == Path(".runq")
    assert s.database_url == ""
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / '.runq' / 'runq.db'}"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.resolved_broker_url == s.redis_url
    assert s.dispatch_mode is DispatchMode.NEW
    assert s.terraform_bin == "terraform"
    assert s.lock_ttl > 0 and s.resend_after > 0
    # Dispatchers no longer wait for the workspace lock (issue 5): the
    # setting is gone, not merely unused.
    assert not hasattr(s, "lock_wait")
    # Leases, retries and timeouts: the design's defaults.
    assert (s.lease_ttl, s.heartbeat_interval, s.plan_retries, s.handoff_attempts) == (
        60.0,
        2.0,
        2,
        8,
    )
    assert (s.plan_timeout, s.apply_timeout, s.confirm_timeout) == (7200.0, 7200.0, 0.0)
    assert (s.kill_grace, s.shutdown_grace, s.reconcile_interval, s.resend_after) == (
        30.0,
        8.0,
        30.0,
        60.0,
    )
    assert (s.db_lock_timeout, s.db_statement_timeout, s.db_idle_in_transaction_timeout) == (
        5.0,
        30.0,
        30.0,
    )


def test_database_defaults_to_sqlite_under_data_dir(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.setenv("RUNQ_DATA_DIR", str(tmp_path / "somewhere"))
    s = Settings()
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'somewhere' / 'runq.db'}"
    assert s.logs_dir == tmp_path / "somewhere" / "logs"
    assert s.work_dir == tmp_path / "somewhere" / "work"
    assert s.state_dir == tmp_path / "somewhere" / "state"
    # A relative data dir is resolved against the working directory.
    env.setenv("RUNQ_DATA_DIR", "rel")
    assert Settings().resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'rel' / 'runq.db'}"


def test_explicit_database_url_wins(env: pytest.MonkeyPatch) -> None:
    env.setenv("RUNQ_DATA_DIR", "/ignored")
    env.setenv("RUNQ_DATABASE_URL", "postgresql://u@db/runq")
    assert Settings().resolved_database_url == "postgresql://u@db/runq"


def test_broker_defaults_to_redis_url(env: pytest.MonkeyPatch) -> None:
    env.setenv("RUNQ_REDIS_URL", "redis://cache:6380/3")
    s = Settings()
    assert s.redis_url == "redis://cache:6380/3"
    assert s.resolved_broker_url == "redis://cache:6380/3"
    env.setenv("RUNQ_BROKER_URL", "amqp://guest@mq//")
    s = Settings()
    assert (s.redis_url, s.resolved_broker_url) == ("redis://cache:6380/3", "amqp://guest@mq//")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("legacy", DispatchMode.LEGACY),
        ("LEGACY", DispatchMode.LEGACY),
        ("new", DispatchMode.NEW),
        ("New", DispatchMode.NEW),
    ],
)
def test_dispatch_mode(env: pytest.MonkeyPatch, value: str, expected: DispatchMode) -> None:
    env.setenv("RUNQ_DISPATCH_MODE", value)
    assert Settings().dispatch_mode is expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RUNQ_DISPATCH_MODE", "fast"),
        ("RUNQ_DISPATCH_MODE", ""),
        ("RUNQ_LOCK_TTL", "0"),
        ("RUNQ_LOCK_TTL", "soon"),
        ("RUNQ_LEASE_TTL", "0"),
        ("RUNQ_HEARTBEAT_INTERVAL", "0"),
        ("RUNQ_PLAN_RETRIES", "-1"),
        ("RUNQ_HANDOFF_ATTEMPTS", "0"),
        ("RUNQ_APPLY_TIMEOUT", "0"),
        ("RUNQ_CONFIRM_TIMEOUT", "-1"),
        ("RUNQ_RESEND_AFTER", "0"),
        ("RUNQ_RECONCILE_INTERVAL", "-5"),
        ("RUNQ_EXECUTOR", "docker"),
        ("RUNQ_FAKE_PLAN_SECONDS", "-1"),
        ("RUNQ_FAKE_APPLY_SECONDS", "x"),
    ],
)
def test_bad_values_are_errors(env: pytest.MonkeyPatch, key: str, value: str) -> None:
    env.setenv(key, value)
    field = key.removeprefix("RUNQ_").lower()
    with pytest.raises(ValidationError, match=field):
        Settings()


def test_numbers_and_unrelated_variables(env: pytest.MonkeyPatch) -> None:
    env.setenv("RUNQ_LOCK_TTL", "2.5")
    env.setenv("RUNQ_PLAN_RETRIES", "0")
    env.setenv("RUNQ_TERRAFORM_BIN", "/opt/tofu")
    env.setenv("RUNQ_SOMETHING_ELSE", "ignored")
    # Removed in issue 5; an old deployment's environment must still start.
    env.setenv("RUNQ_LOCK_WAIT", "5")
    s = Settings()
    assert (s.lock_ttl, s.plan_retries, s.terraform_bin) == (2.5, 0, "/opt/tofu")
    assert not hasattr(s, "lock_wait")


def test_heartbeat_must_fit_twice_in_the_lease(env: pytest.MonkeyPatch) -> None:
    env.setenv("RUNQ_LEASE_TTL", "10")
    env.setenv("RUNQ_HEARTBEAT_INTERVAL", "5")
    assert Settings().heartbeat_interval == 5.0
    env.setenv("RUNQ_HEARTBEAT_INTERVAL", "5.5")
    with pytest.raises(ValidationError, match="RUNQ_HEARTBEAT_INTERVAL"):
        Settings()


def test_settings_are_frozen(env: pytest.MonkeyPatch) -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.redis_url = "redis://other"  # type: ignore[misc]
