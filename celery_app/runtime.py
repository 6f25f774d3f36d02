"""The per-process runtime of a Celery worker (or of any publisher)."""

from __future__ import annotations

import getpass
import os
import socket

from celery import Celery

from scheduler.messages import Message
from scheduler.runtime import Runtime
from scheduler.settings import Settings


class CeleryPublisher:
    """Publishes runq messages through a Celery app's producer pool."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, message: Message) -> str:
        result = self.app.send_task(message.task, args=list(message.args), queue=message.queue)
        return str(result.id)


def build_runtime(
    app: Celery, settings: Settings | None = None, actor: str | None = None
) -> Runtime:
    settings = settings or Settings()
    return Runtime(
        settings=settings,
        publisher=CeleryPublisher(app),
        actor=actor or f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}",
    )
