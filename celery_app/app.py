"""The Celery application.

``celery -A celery_app worker`` imports this module. Importing it reads no
settings and opens no connection: Celery asks for its configuration only when
first used, and :func:`_configure` builds it from :class:`Settings` then.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from celery_app.config import celery_config
from celery_app.runtime import build_runtime
from scheduler.runtime import Runtime
from scheduler.settings import Settings

log = logging.getLogger(__name__)

app = Celery("runq", include=["celery_app.tasks"])

_settings: Settings | None = None
_runtime: Runtime | None = None


def settings() -> Settings:
    global _settings  # noqa: PLW0603 - built once per process, on first use
    if _settings is None:
        _settings = Settings()
    return _settings


def use_settings(value: Settings) -> None:
    """Configure this process explicitly (tests, the demo) before first use."""
    global _settings, _runtime
    _settings, _runtime = value, None
    # Configures the app now if it was not yet (through _configure, with the
    # new settings); updates it if it was.
    app.conf.update(celery_config(value))


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.config_from_object(celery_config(settings()))


def runtime() -> Runtime:
    """This process's runtime, built on first use."""
    global _runtime  # noqa: PLW0603
    if _runtime is None:
        _runtime = build_runtime(app, settings(), actor=f"worker@{_hostname()}")
    return _runtime


def _hostname() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


@worker_process_init.connect
def _fresh_runtime_after_fork(**_: Any) -> None:
    # A forked pool child must not share its parent's database connections.
    global _runtime  # noqa: PLW0603
    if _runtime is not None:
        _runtime.close()
    _runtime = None
