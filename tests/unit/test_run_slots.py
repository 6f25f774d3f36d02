"""The amqp prefetch bookkeeping (celery_app.prefetch) against a fake consumer
that runs its event loop the way Celery's asynloop does: the pending
``basic.qos`` first, then the callbacks deferred with ``call_soon``. The real
thing, on RabbitMQ with busy workers, is measured in
tests/scenario/test_busy_worker.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.common import QoS

from celery_app import prefetch
from celery_app.prefetch import RunSlots


@dataclass
class Wire:
    """What went to the broker, in order."""

    sent: list[str] = field(default_factory=list)


class Hub:
    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)


class TaskConsumer:
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    def cancel(self) -> None:
        self.wire.sent.append("basic.cancel")

    def consume(self) -> None:
        self.wire.sent.append("basic.consume")


def make_consumer(wire: Wire, processes: int) -> Any:
    def basic_qos(prefetch_count: int) -> None:
        wire.sent.append(f"basic.qos {prefetch_count}")

    qos = QoS(basic_qos, processes)
    qos.update()
    return SimpleNamespace(
        hub=Hub(), qos=qos, initial_prefetch_count=processes, task_consumer=TaskConsumer(wire)
    )


def turn(consumer: Any) -> None:
    """One turn of Celery's asynloop: pending QoS, then deferred callbacks."""
    if consumer.qos.prev != consumer.qos.value:
        consumer.qos.update()
    todo, consumer.hub.soon = consumer.hub.soon, []
    for fn in todo:
        fn()


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The ids of the requests the worker runs (celery.worker.state)."""
    ids: set[str] = set()
    monkeypatch.setattr(prefetch, "state", SimpleNamespace(active_requests=_Requests(ids)))
    yield ids


class _Requests:
    def __init__(self, ids: set[str]) -> None:
        self.ids = ids

    def __iter__(self) -> Iterator[SimpleNamespace]:
        return iter([SimpleNamespace(id=i) for i in self.ids])


def test_the_prefetch_shrinks_before_the_ack_goes_out(running: set[str]) -> None:
    wire = Wire()
    consumer = make_consumer(wire, processes=3)
    slots = RunSlots()
    slots.attach(consumer)
    turn(consumer)
    wire.sent.clear()

    running.add("run-1")
    assert slots.hold("run-1", lambda: wire.sent.append("basic.ack run-1"))
    assert wire.sent == []  # nothing yet: the ack waits for the loop
    turn(consumer)
    assert wire.sent == ["basic.qos 2", "basic.ack run-1"]


def test_every_process_busy_cancels_the_consumer_until_one_is_free(
    running: set[str],
) -> None:
    wire = Wire()
    consumer = make_consumer(wire, processes=2)
    slots = RunSlots()
    slots.attach(consumer)
    turn(consumer)
    wire.sent.clear()

    for run in ("a", "b"):
        running.add(run)
        slots.hold(run, lambda run=run: wire.sent.append(f"basic.ack {run}"))
        turn(consumer)
    # RabbitMQ reads prefetch 0 as unlimited: the floor is 1, and the
    # consumer stops instead, before the second ack frees anything.
    assert wire.sent == ["basic.qos 1", "basic.ack a", "basic.cancel", "basic.ack b"]
    wire.sent.clear()

    slots.tick()  # both still run
    turn(consumer)
    assert wire.sent == []

    running.discard("a")  # run a ended
    slots.tick()
    turn(consumer)
    assert wire.sent == ["basic.consume"]  # prefetch stays 1: one process free
    running.discard("b")
    slots.tick()
    turn(consumer)
    assert wire.sent == ["basic.consume", "basic.qos 2"]
    assert slots.held == set()


def test_a_reconnected_consumer_gets_the_count_the_running_runs_leave(
    running: set[str],
) -> None:
    wire = Wire()
    slots = RunSlots()
    slots.attach(make_consumer(wire, processes=3))
    running.add("long")
    slots.hold("long", lambda: None)
    # The connection drops and Celery builds a new consumer at full prefetch;
    # the run goes on and still holds its slot.
    fresh = make_consumer(wire, processes=3)
    wire.sent.clear()
    slots.attach(fresh)
    turn(fresh)
    assert wire.sent == ["basic.qos 2"]


def test_without_a_consumer_the_ack_goes_at_once() -> None:
    slots = RunSlots()
    assert slots.hold("x", lambda: None) is False  # the caller acks itself
    assert slots.held == set()


def test_a_reconnect_with_every_process_busy_consumes_only_once_one_is_free(
    running: set[str],
) -> None:
    wire = Wire()
    slots = RunSlots()
    slots.attach(make_consumer(wire, processes=2))
    for run in ("a", "b"):
        running.add(run)
        slots.hold(run, lambda: None)
    fresh = make_consumer(wire, processes=2)
    wire.sent.clear()
    slots.attach(fresh)  # Celery's bootstep start, before the event loop
    assert wire.sent == ["basic.qos 1"]
    fresh.task_consumer.consume()  # what asynloop does next: held back
    turn(fresh)
    assert wire.sent == ["basic.qos 1"]

    running.discard("a")
    slots.tick()
    turn(fresh)
    assert wire.sent == ["basic.qos 1", "basic.consume"]
