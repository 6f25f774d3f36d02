"""Settings -> Celery configuration, and queue routing.

Two brokers are supported: Redis (the default, ``RUNQ_REDIS_URL``) and
RabbitMQ (``RUNQ_BROKER_URL=amqp://...``). Redis holds the workspace lock
either way. What differs by broker is kept in :func:`broker_specific`.
"""

from __future__ import annotations

from typing import Any

from scheduler.brokers import broker_kind, durable_queue, transport_options
from scheduler.messages import (
    ALL_QUEUES,
    QUEUE_DISPATCH,
    QUEUE_PLANS,
    QUEUE_RUNS,
    TASK_CLAIM_PLAN,
    TASK_DISPATCH,
    TASK_EXECUTE,
    TASK_RECONCILE,
)
from scheduler.settings import Settings

__all__ = ["broker_kind", "broker_specific", "celery_config", "durable_queue", "worker_config"]


def worker_config(settings: Settings) -> dict[str, Any]:
    """What every runq Celery app shares: the core workers' and the agents'."""
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_connection_retry_on_startup": True,
        # Messages carry ids and small dicts; JSON only, so no pickle ever
        # deserializes attacker-controlled bytes.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # Outcomes live in the database; Celery results would be a second,
        # weaker copy.
        "task_ignore_result": True,
        "result_backend": None,
        # Flower needs task events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A worker must not hoard messages it cannot start: with prefetch 1 a
        # long terraform run holds one message, not four. But prefetch counts
        # unacknowledged messages, and `execute` is acknowledged when it
        # starts, so on its own this still lets a worker whose processes all
        # run terraform reserve claims and dispatches it cannot start for
        # minutes while other workers sit idle. How each broker is kept from
        # that: see broker_specific.
        "worker_prefetch_multiplier": 1,
        # On a lost broker connection, let running claims and dispatches
        # finish: their late acks fail and the broker re-delivers them, and a
        # second run of either is a stale hint. Killing them mid-transaction
        # would gain nothing. (Celery 5.7 still logs a pending-deprecation
        # warning on each reconnect with this off.)
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_delivery_mode": "persistent",
        "worker_hijack_root_logger": True,
        **broker_specific(settings.resolved_broker_url),
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        **worker_config(settings),
        "task_queues": [durable_queue(name) for name in ALL_QUEUES],
        "task_default_queue": QUEUE_DISPATCH,
        "task_routes": {
            TASK_CLAIM_PLAN: {"queue": QUEUE_PLANS},
            TASK_DISPATCH: {"queue": QUEUE_DISPATCH},
            TASK_EXECUTE: {"queue": QUEUE_RUNS},
            TASK_RECONCILE: {"queue": QUEUE_DISPATCH},
        },
        # No schedule: beat runs the reconciler itself, on a thread (see
        # celery_app.app._start_reconciler). As a scheduled task it waited
        # for a free pool process, and when every process ran terraform or
        # was paused, sweeps expired unrun: the moment healing is needed most.
        "beat_schedule": {},
        # Beat's bookkeeping lives with runq's other files, not in the cwd.
        "beat_schedule_filename": str(settings.data_dir.resolve() / "celerybeat-schedule"),
    }


def broker_specific(url: str) -> dict[str, Any]:
    """The Celery settings that differ by broker (both apps use them)."""
    kind = broker_kind(url)
    if kind == "redis":
        return {
            # Fetch only into a free process (Celery >= 5.6; Redis transport
            # only: on any other broker Celery logs a warning and ignores it).
            "worker_disable_prefetch": True,
        }
    if kind == "amqp":
        return {
            # Publisher confirms: see scheduler.brokers.transport_options.
            "broker_transport_options": transport_options(url),
            # Celery ignores worker_disable_prefetch here (with a warning in
            # every worker's log): RabbitMQ pushes up to the channel's
            # prefetch count, so celery_app.prefetch shrinks that count while
            # `execute` runs terraform instead. It owns the count: Celery's
            # own cut after a reconnect (by every running task, then raised
            # step by step as tasks end) would fight it.
            "worker_disable_prefetch": False,
            "worker_enable_prefetch_count_reduction": False,
        }
    return {}
