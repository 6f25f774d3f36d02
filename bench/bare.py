"""Bare Celery, the baseline: one no-op task on runq's Celery configuration
(same broker, same queues, same worker flags), run with
``celery -A bench.bare worker``. Each run appends its start time
(``time.time()``) to the Redis list :data:`STARTED`."""

from __future__ import annotations

import time

from celery import Celery
from redis import Redis

from celery_app.config import celery_config
from scheduler.settings import Settings

STARTED = "bench:started"

settings = Settings()
app = Celery("bench-bare")
app.conf.update(celery_config(settings))
_redis: list[Redis] = []


@app.task(name="bench.noop")
def noop() -> None:
    at = time.time()
    if not _redis:
        _redis.append(Redis.from_url(settings.redis_url))
    _redis[0].rpush(STARTED, at)
