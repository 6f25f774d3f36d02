"""Bare Celery, the baseline: one no-op task on runq's Celery configuration
(same broker, same queues, same worker flags), run with
``celery -A bench.bare worker``. Each run appends its start time
(``time.time()``) to the Redis list :data:`STARTED`. The same workers run
:mod:`bench.floor_plan`'s minimal durable plan.

Settings are read when Celery first asks for its configuration (and the
Redis client made at the first task), not at import, as runq's own app does.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

from celery import Celery
from redis import Redis

from bench import floor_plan
from celery_app.config import celery_config
from scheduler.settings import Settings

STARTED = "bench:started"

app = Celery("bench-bare")


@cache
def settings() -> Settings:
    return Settings()


@cache
def redis() -> Redis:
    return Redis.from_url(settings().redis_url)


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.config_from_object(celery_config(settings()))


@app.task(name="bench.noop")
def noop() -> None:
    at = time.time()
    redis().rpush(STARTED, at)


@app.task(name=floor_plan.TASK)
def floor_claim(url: str, task_id: int) -> None:
    floor_plan.run_plan(url, task_id)
