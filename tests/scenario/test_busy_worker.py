"""A worker whose processes all run terraform takes no message it cannot start.

One worker of two processes; two plans run terraform in both. Dispatches
sent meanwhile must stay in the broker, where another worker could take them,
and be taken once a process is free. On Redis Celery's
``worker_disable_prefetch`` sees to it; on RabbitMQ ``celery_app.prefetch``
does, because ``execute`` acknowledges its message when it starts and so
frees its ``basic.qos`` slot. Without it the worker took 2 of these 3
messages on RabbitMQ and held them until a plan ended.
"""

from __future__ import annotations

import time

import pytest

from scheduler import messages, status
from scheduler.states import DispatchMode, TaskStatus
from tests.scenario.cluster import Cluster

pytestmark = [pytest.mark.scenario, pytest.mark.postgres, pytest.mark.terraform]

CLUSTER_MODE = DispatchMode.NEW
CLUSTER_REDIS_DB = 4
CLUSTER_BROKERS = ("redis", "amqp")
CLUSTER_WORKERS = 1
CLUSTER_CONCURRENCY = 2


def waiting(cluster: Cluster, queue: str) -> int | None:
    return status.collect(cluster.rt, cluster.app, ping_timeout=0.2).queues[queue]


def test_busy_worker_leaves_messages_it_cannot_start_in_the_broker(cluster: Cluster) -> None:
    busy = cluster.workspace("busy", plan_seconds=8)
    idle = cluster.workspace("idle")
    plans = [cluster.submit(busy, "plan").id for _ in range(2)]
    # Both processes run terraform once both phases have started.
    deadline = time.monotonic() + 60
    while not all(cluster.lives(plans)[i].task.started_at for i in plans):
        assert time.monotonic() < deadline, "the plans never both started"
        time.sleep(0.1)

    for _ in range(3):
        cluster.send_dispatch(idle, 1)
    time.sleep(1.5)  # time enough for the broker to push, and the worker to take
    held_back = waiting(cluster, messages.QUEUE_DISPATCH)
    assert held_back == 3, f"the busy worker took {3 - (held_back or 0)} of 3 dispatches"

    # Once a plan ends, the worker takes them.
    views = cluster.wait(plans)
    assert {v.status for v in views} == {TaskStatus.SUCCESS}
    deadline = time.monotonic() + 30
    while waiting(cluster, messages.QUEUE_DISPATCH) != 0:
        assert time.monotonic() < deadline, "the dispatches were never taken"
        time.sleep(0.2)
