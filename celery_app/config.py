"""Settings -> Celery configuration, and queue routing."""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

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


def celery_config(settings: Settings) -> dict[str, Any]:
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
        # long terraform run holds one message, not four.
        "worker_prefetch_multiplier": 1,
        # ...but prefetch 1 counts unacknowledged messages, and `execute` is
        # acknowledged when it starts: a worker whose processes all run
        # terraform would still reserve claim and dispatch messages it cannot
        # start for minutes, while other workers sit idle. Fetch only into a
        # free process (Redis broker; Celery >= 5.6).
        "worker_disable_prefetch": True,
        # One direct exchange per queue: a bare Queue(name) would bind every
        # queue to the default queue's exchange and routing key, so a publish
        # to that exchange would land in all three.
        "task_queues": [
            Queue(name, Exchange(name, "direct"), routing_key=name) for name in ALL_QUEUES
        ],
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
        "worker_hijack_root_logger": True,
    }
