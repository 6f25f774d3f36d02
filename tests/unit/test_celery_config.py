"""The Celery wiring the issue asks for: JSON only, events on, prefetch 1,
late acks only where a task is idempotent, and routing by queue."""

from __future__ import annotations

from pathlib import Path

from celery_app import tasks
from celery_app.config import celery_config
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


def test_only_idempotent_tasks_ack_late() -> None:
    # claim_plan and dispatch re-read the database, so a redelivery is safe.
    for task in (tasks.claim_plan, tasks.dispatch):
        assert task.acks_late is True
        assert task.reject_on_worker_lost is True
    # Redelivering execute would run terraform apply twice.
    assert tasks.execute.acks_late is False


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
