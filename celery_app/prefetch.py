"""On RabbitMQ, a worker fetches only into a free process.

The hazard: ``execute`` acknowledges its message when terraform starts
(``acks_late=False``, see :mod:`celery_app.tasks`), and RabbitMQ's prefetch
(``basic.qos``, ``worker_prefetch_multiplier=1`` x processes) counts only
unacknowledged messages. So every running ``execute`` frees a prefetch slot:
a worker of 3 processes all running terraform for an hour is pushed up to 3
more messages (claims, dispatches, hand-offs) that wait in it for a free
process, while other workers sit idle. On Redis, Celery's
``worker_disable_prefetch`` stops fetching while every process is busy; on
RabbitMQ Celery ignores that setting.

So, in the worker's main process, each ``execute`` keeps holding its slot
from its acknowledgement until it ends:

* the ack is deferred to the event loop's next turn, and the lower prefetch
  count is applied in between (the loop sends ``basic.qos`` before running
  deferred callbacks), so RabbitMQ never sees the slot free. A turn can take
  up to the :data:`TICK` (the loop polls until its next timer), so a
  connection lost in that second finds the ack unsent and RabbitMQ
  re-delivers the ``execute``: seen in tests/scenario/test_busy_worker.py,
  and harmless, as any duplicate hand-off is (the start is once per fence);
* when every process runs terraform, the task consumer is cancelled
  (``basic.cancel``), because RabbitMQ reads a prefetch count of 0 as
  "unlimited"; it consumes again once a process is free;
* a tick every :data:`TICK` seconds gives back the slots of runs that ended.

After a lost connection the new consumer starts with the runs still going
held against it (:meth:`RunSlots.attach`). What is left: a message pushed in
the instant between a plain task's ack and the next accept can still wait
behind a run that starts then. The reconciler bounds that: it re-sends a
claim or hand-off that waits longer than ``RUNQ_RESEND_AFTER`` (another
worker takes it; the late copy is then a stale hint), and a dispatch every
sweep while work waits.

An agent (:mod:`celery_app.agent`) holds its phases' slots the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker import state
from celery.worker.request import Request

log = logging.getLogger(__name__)

#: Seconds between checks for ended runs (how late a freed slot is reopened).
TICK = 1.0


class RunSlots:
    """The prefetch slots held by running ``execute`` tasks (one consumer)."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.consumer: Any = None  # celery.worker.consumer.Consumer, untyped
        self.paused = False

    @property
    def active(self) -> bool:
        return self.consumer is not None and self.consumer.hub is not None

    def attach(self, consumer: Any) -> None:
        """Take over a (re)connected consumer before it starts consuming.

        Celery sets it to the full prefetch count, but runs that outlived
        the old connection still hold their slots: the count is lowered now
        (we run before the event loop, so a blocking basic.qos is fine), and
        if no process is free its first basic.consume is held back until one
        is, or RabbitMQ would push messages before the loop's first turn.
        """
        self.consumer, self.paused = consumer, False
        if consumer.qos is None:
            return
        self._apply()
        consumer.qos.update()
        if self.free <= 0:
            self.paused = True
            consumer.task_consumer.consume = _not_yet

    def detach(self) -> None:
        self.consumer = None

    def hold(self, request_id: str, ack: Callable[[], None]) -> bool:
        """Take a slot for ``request_id`` and send its ``ack`` once the
        smaller prefetch count is in force; False if not active (ack now)."""
        if not self.active:
            return False
        self.held.add(request_id)
        self._apply(then=ack)
        return True

    def tick(self) -> None:
        running = {r.id for r in state.active_requests}
        if self.held - running:
            self.held &= running
            self._apply()

    @property
    def free(self) -> int:
        """Processes not running terraform (the consumer's full prefetch
        count is one message per process; Celery's own reduction after a
        reconnect is off on amqp, see celery_app.config)."""
        return int(self.consumer.initial_prefetch_count) - len(self.held)

    def _apply(self, then: Callable[[], None] | None = None) -> None:
        c = self.consumer
        if c is None or c.qos is None:
            if then is not None:
                then()
            return
        delta = max(1, self.free) - c.qos.value
        # The event loop sends basic.qos before its next round of callbacks.
        if delta > 0:
            c.qos.increment_eventually(delta)
        elif delta < 0:
            c.qos.decrement_eventually(-delta)
        pause = self.free <= 0
        if pause == self.paused and then is None:
            return

        def later() -> None:
            self._pause_or_resume(pause)
            if then is not None:
                then()

        c.hub.call_soon(later)

    def _pause_or_resume(self, pause: bool) -> None:
        c = self.consumer
        if c is None or c.task_consumer is None or pause == self.paused:
            return
        self.paused = pause
        if pause:
            log.debug("every process runs terraform: not consuming until one is free")
            c.task_consumer.cancel()
        else:
            vars(c.task_consumer).pop("consume", None)  # attach()'s _not_yet
            c.task_consumer.consume()


def _not_yet(*_: Any, **__: Any) -> None:
    """A paused consumer's basic.consume (RunSlots resumes it)."""


#: The main process's slots (a worker has one task consumer).
SLOTS = RunSlots()


class HoldRunSlots(bootsteps.StartStopStep):
    """Consumer bootstep: wires :data:`SLOTS` to the task consumer on amqp."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        # Redis: worker_disable_prefetch does this (see celery_app.config).
        if parent.connection.transport.driver_type != "amqp" or parent.hub is None:
            return
        SLOTS.attach(parent)
        self.tref = parent.timer.call_repeatedly(TICK, SLOTS.tick)

    def stop(self, parent: Any) -> None:
        SLOTS.detach()
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


class ExecuteRequest(Request):
    """``execute``'s request: its early ack keeps the prefetch slot held."""

    _runq_ack_deferred = False

    def acknowledge(self) -> None:
        if self.acknowledged or self._runq_ack_deferred:
            return
        if SLOTS.hold(self.id, super().acknowledge):
            self._runq_ack_deferred = True
        else:
            super().acknowledge()
