"""The per-process runtime of a Celery worker (or of any publisher)."""

from __future__ import annotations

import getpass
import os
import socket

from celery import Celery

from scheduler.brokers import not_taken
from scheduler.messages import Message
from scheduler.runtime import Runtime
from scheduler.settings import Settings


class CeleryPublisher:
    """Publishes runq messages through a Celery app's producer pool.

    A send the broker did not take raises kombu's ``OperationalError`` (the
    type the workers and the reconciler treat as "the broker was away"),
    after Celery's own publish retries. On RabbitMQ that includes a message
    the broker refused (publisher confirms, see celery_app.config), which
    kombu reports with an empty message: the error says which message, which
    queue and which broker.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, message: Message) -> str:
        from kombu.exceptions import OperationalError

        try:
            # argsrepr: what Flower shows as the task's arguments.
            result = self.app.send_task(
                message.task,
                args=list(message.args),
                queue=message.queue,
                argsrepr=message.describe(),
            )
        except OperationalError as exc:
            raise not_taken(message, self.app.connection_for_write().as_uri(), exc) from exc
        return str(result.id)

    def depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue``, not counting those a worker holds."""
        from scheduler.status import queue_depths

        return queue_depths(self.app, [queue])[queue]


def private_app(settings: Settings, name: str) -> Celery:
    """A Celery app of its own, configured from ``settings``, that does not
    become the process's current app: for a process that only publishes
    (the tests' clients, the benchmark), beside whatever app is loaded."""
    from celery_app.config import celery_config

    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def build_runtime(
    app: Celery,
    settings: Settings | None = None,
    actor: str | None = None,
    *,
    worker: bool = False,
) -> Runtime:
    """``worker``: for runq's own processes (workers, beat), which dispatch a
    freed workspace themselves and retry once on a lost database connection
    instead of pre-pinging (see :class:`Runtime`)."""
    settings = settings or Settings()
    return Runtime(
        settings=settings,
        publisher=CeleryPublisher(app),
        actor=actor or f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}",
        inline_wakeups=worker,
        pre_ping=not worker,
    )
