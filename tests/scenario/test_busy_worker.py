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
from urllib.parse import urlsplit

import pytest

from celery_app.config import broker_kind
from scheduler import messages, status
from scheduler.states import DispatchMode, TaskStatus
from tests.scenario.cluster import Cluster
from tests.workers import RabbitMQ

pytestmark = [pytest.mark.scenario, pytest.mark.postgres, pytest.mark.terraform]

CLUSTER_MODE = DispatchMode.NEW
CLUSTER_REDIS_DB = 5
CLUSTER_BROKERS = ("redis", "amqp")
CLUSTER_WORKERS = 1
CLUSTER_CONCURRENCY = 2


def waiting(cluster: Cluster, queue: str) -> int | None:
    return status.collect(cluster.rt, cluster.app, ping_timeout=0.2).queues[queue]


def both_running(cluster: Cluster, plans: list[int]) -> None:
    """Until both plans' executors have started (a claim alone is not enough:
    the process that claimed is free until the hand-off reaches it)."""
    deadline = time.monotonic() + 60
    while not all(cluster.lives(plans)[i].task.executor_handle for i in plans):
        assert time.monotonic() < deadline, "the plans never both started"
        time.sleep(0.1)


def held_back(cluster: Cluster, workspace: str, sent: int = 3) -> None:
    """Send ``sent`` dispatches; the worker must leave them all queued."""
    cluster.send_dispatch(workspace, sent)
    time.sleep(1.5)  # time enough for the broker to push, and the worker to take
    waiting_now = waiting(cluster, messages.QUEUE_DISPATCH)
    assert waiting_now == sent, f"the busy worker took {sent - (waiting_now or 0)} of {sent}"


def taken_once_free(cluster: Cluster, plans: list[int]) -> None:
    views = cluster.wait(plans)
    assert {v.status for v in views} == {TaskStatus.SUCCESS}
    deadline = time.monotonic() + 30
    while waiting(cluster, messages.QUEUE_DISPATCH) != 0:
        assert time.monotonic() < deadline, "the dispatches were never taken"
        time.sleep(0.2)


def test_busy_worker_leaves_messages_it_cannot_start_in_the_broker(cluster: Cluster) -> None:
    busy = cluster.workspace("busy", plan_seconds=8)
    idle = cluster.workspace("idle")
    plans = [cluster.submit(busy, "plan").id for _ in range(2)]
    both_running(cluster, plans)  # both processes run terraform
    held_back(cluster, idle)
    taken_once_free(cluster, plans)  # once a plan ends, the worker takes them


def test_busy_worker_still_takes_nothing_after_losing_its_connection(
    cluster: Cluster, request: pytest.FixtureRequest
) -> None:
    """RabbitMQ closes every connection of the vhost mid-run: Celery
    reconnects at its full prefetch count while both runs go on, and the
    worker must still leave the dispatches queued. (An execute acked less
    than a second before the close may come back; it is refused as started.)"""
    if broker_kind(cluster.settings.resolved_broker_url) != "amqp":
        pytest.skip("RabbitMQ only: the fault run restarts Redis under busy workers")
    rabbitmq: RabbitMQ = request.getfixturevalue("rabbitmq")
    vhost = urlsplit(cluster.settings.resolved_broker_url).path.lstrip("/")
    busy = cluster.workspace("busy-reconnect", plan_seconds=10)
    idle = cluster.workspace("idle-reconnect")
    plans = [cluster.submit(busy, "plan").id for _ in range(2)]
    both_running(cluster, plans)

    rabbitmq.ctl("close_all_connections", "--vhost", vhost, "runq test: connection loss")
    worker = cluster.pool.workers[0]
    deadline = time.monotonic() + 20
    while worker.log.read_text(errors="replace").count("Connected to amqp://") < 2:
        assert time.monotonic() < deadline, f"the worker did not reconnect:\n{worker.tail()}"
        time.sleep(0.2)
    held_back(cluster, idle)
    taken_once_free(cluster, plans)
