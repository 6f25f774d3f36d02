"""The Celery wiring the issue asks for: JSON only, events on, prefetch 1,
late acks only where a task is idempotent, and routing by queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from celery_app import tasks
from celery_app.config import broker_kind, celery_config
from celery_app.prefetch import ExecuteRequest
from scheduler import messages
from scheduler.settings import Settings


def test_config_maps_settings_and_is_json_only(tmp_path: Path) -> None:
    conf = celery_config(
        Settings(redis_url="redis://example:1/2", broker_url="", data_dir=tmp_path)
    )
    assert conf["broker_url"] == "redis://example:1/2"
    assert conf["accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["worker_send_task_events"] is True
    assert conf["task_send_sent_event"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_ignore_result"] is True
    assert {q.name for q in conf["task_queues"]} == set(messages.ALL_QUEUES)
    assert conf["beat_schedule_filename"].startswith(str(tmp_path.resolve()))


def test_broker_url_overrides_redis_url() -> None:
    conf = celery_config(Settings(redis_url="redis://a:1/0", broker_url="amqp://b//"))
    assert conf["broker_url"] == "amqp://b//"


def test_routes_send_each_message_to_its_queue() -> None:
    routes = celery_config(Settings())["task_routes"]
    assert routes[messages.TASK_CLAIM_PLAN]["queue"] == messages.QUEUE_PLANS
    assert routes[messages.TASK_DISPATCH]["queue"] == messages.QUEUE_DISPATCH
    assert routes[messages.TASK_EXECUTE]["queue"] == messages.QUEUE_RUNS
    assert messages.claim_plan(7) == messages.Message(
        messages.TASK_CLAIM_PLAN, messages.QUEUE_PLANS, (7,)
    )
    assert messages.dispatch("ws").queue == messages.QUEUE_DISPATCH


def test_only_dispatch_acks_late() -> None:
    # dispatch re-reads the database, so a redelivery is safe.
    assert tasks.dispatch.acks_late is True
    assert tasks.dispatch.reject_on_worker_lost is True
    # claim_plan and execute run terraform (a local plan is claimed and run
    # in one go): acked at start, holding their prefetch slot, because
    # RabbitMQ closes a channel that holds a delivery unacked for longer
    # than its consumer_timeout. A hint lost with a dead worker is the
    # reconciler's to re-send; a redelivered execute would be a stale hint.
    for task in (tasks.claim_plan, tasks.execute):
        assert task.acks_late is False
        assert task.Request is ExecuteRequest


def test_beat_sweeps_itself_and_schedules_nothing_on_the_workers() -> None:
    # A scheduled reconcile task waited for a free pool process and expired
    # when every process ran terraform; beat's own thread sweeps instead
    # (its interval and liveness are covered by the scenario tests, whose
    # real beat heals killed workers, and by runq status).
    assert celery_config(Settings(reconcile_interval=12.5))["beat_schedule"] == {}
    from celery.signals import beat_init

    from celery_app.app import _start_reconciler

    assert any(
        getattr(receiver(), "__name__", None) == _start_reconciler.__name__
        for _, receiver in beat_init.receivers
    )


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/0", "redis"),
        ("rediss://cache:6380/1", "redis"),
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp"),
        ("AMQPS://mq/vhost", "amqp"),
        ("pyamqp://mq//", "amqp"),
        ("sqs://", "sqs"),
    ],
)
def test_broker_kind_from_the_url_scheme(url: str, kind: str) -> None:
    assert broker_kind(url) == kind


def test_redis_broker_fetches_only_into_a_free_process_and_has_no_confirms() -> None:
    conf = celery_config(Settings(redis_url="redis://a:1/0"))
    assert conf["worker_disable_prefetch"] is True
    assert "broker_transport_options" not in conf


def test_amqp_broker_confirms_publishes_and_leaves_prefetch_to_the_run_slots() -> None:
    conf = celery_config(Settings(redis_url="redis://a:1/0", broker_url="amqp://b//"))
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    # Celery ignores worker_disable_prefetch on amqp, with a warning in every
    # worker's log; celery_app.prefetch does that job there.
    assert conf["worker_disable_prefetch"] is False
    assert conf["worker_enable_prefetch_count_reduction"] is False
    assert conf["worker_prefetch_multiplier"] == 1


@pytest.mark.parametrize("url", ["redis://a:1/0", "amqp://b//"])
def test_every_queue_is_durable_on_its_own_direct_exchange(url: str) -> None:
    conf = celery_config(Settings(broker_url=url))
    for queue in conf["task_queues"]:
        assert queue.durable is True
        assert (queue.exchange.name, queue.exchange.type) == (queue.name, "direct")
        assert queue.exchange.durable is True
        assert queue.routing_key == queue.name
    assert conf["task_default_delivery_mode"] == "persistent"


def test_execute_keeps_its_prefetch_slot_while_it_runs() -> None:
    from celery_app.app import app
    from celery_app.prefetch import ExecuteRequest, HoldRunSlots

    assert tasks.execute.Request is ExecuteRequest
    assert HoldRunSlots in app.steps["consumer"]


@pytest.mark.parametrize(
    ("url", "options"),
    [("redis://a:1/0", {}), ("amqp://guest@mq:5672/runq", {"confirm_publish": True})],
)
def test_plain_kombu_connections_confirm_on_amqp_too(url: str, options: dict[str, bool]) -> None:
    # Agents' reports, the report consumer's replies: kombu connections of
    # their own, with the Celery apps' publish guarantee.
    from scheduler.brokers import transport_options

    assert transport_options(url) == options


@pytest.mark.parametrize("url", ["redis://a:1/0", "amqp://guest@mq:5672/runq"])
def test_agents_take_the_same_broker_specific_settings(url: str, tmp_path: Path) -> None:
    from celery_app import agent
    from celery_app.config import broker_specific
    from celery_app.prefetch import ExecuteRequest, HoldRunSlots

    agent.configure(Settings(broker_url=url, data_dir=tmp_path), "blue", 2, "agent-1")
    for key, value in broker_specific(url).items():
        assert agent.app.conf[key] == value
    assert agent.app.conf.worker_disable_prefetch is (broker_kind(url) == "redis")
    [queue] = agent.app.conf.task_queues
    assert (queue.name, queue.durable) == ("runq.pool.blue", True)
    assert agent.run.Request is ExecuteRequest
    assert HoldRunSlots in agent.app.steps["consumer"]
