"""The Celery application.

``celery -A celery_app worker`` imports this module. Importing it reads no
settings and opens no connection: Celery asks for its configuration only when
first used, and :func:`_configure` builds it from :class:`Settings` then.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_process_init, worker_ready, worker_shutting_down

from celery_app.config import celery_config
from celery_app.prefetch import HoldRunSlots
from celery_app.runtime import build_runtime
from scheduler.runtime import Runtime
from scheduler.settings import Settings

log = logging.getLogger(__name__)

app = Celery("runq", include=["celery_app.tasks"])
# RabbitMQ: a running `execute` keeps its prefetch slot (celery_app.prefetch).
app.steps["consumer"].add(HoldRunSlots)

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
    # beat keeps its schedule file in RUNQ_DATA_DIR and dies at start if the
    # directory is missing (its own init signal comes too late to make it).
    settings().data_dir.mkdir(parents=True, exist_ok=True)
    sender.config_from_object(celery_config(settings()))


def runtime() -> Runtime:
    """This process's runtime, built on first use."""
    global _runtime  # noqa: PLW0603
    if _runtime is None:
        _runtime = build_runtime(app, settings(), actor=f"worker@{_hostname()}", worker=True)
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


@worker_shutting_down.connect
def _interrupt_running_phases(**_: Any) -> None:
    """Pass the worker's SIGTERM on to its pool processes.

    ``docker stop`` signals only the main process, and its warm shutdown
    would wait for terraform until Docker's SIGKILL (10 s later) killed it
    mid-write. A pool process running a phase turns SIGTERM into an interrupt
    of terraform with a grace period shorter than Docker's
    (``RUNQ_SHUTDOWN_GRACE``), so the state is saved and the phase handed
    back; an idle pool process just exits, and its acks-late hint is
    re-delivered.
    """
    import os
    import signal
    from pathlib import Path

    me = os.getpid()
    try:
        children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    except OSError:
        return  # not Linux: the warm shutdown waits as Celery always has
    for pid in children:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGTERM)


@beat_init.connect
def _start_reconciler(**_: Any) -> None:
    """``celery beat`` is runq's reconciler: it sweeps every
    ``RUNQ_RECONCILE_INTERVAL`` seconds on a thread of its own.

    It does not send the sweep to the workers as a task: there it would wait
    for a free pool process, and when every process runs terraform or is
    paused (exactly when leases lapse) the sweeps expired unrun. Each sweep
    is recorded in the database, so ``runq status`` sees a beat that stopped.
    A second beat is harmless: every move a sweep makes is a compare-and-set.
    """
    import threading

    threading.Thread(target=_reconcile_forever, name="runq-reconciler", daemon=True).start()


def _reconcile_forever() -> None:
    import contextlib
    import time

    from celery_app.tasks import EXPECTED, _guarded
    from scheduler import reconciler

    global _runtime  # noqa: PLW0603
    _runtime = build_runtime(app, settings(), actor=f"reconciler@{_hostname()}")
    interval = settings().reconcile_interval
    log.info("reconciler: sweeping every %gs", interval, extra={"action": "reconciler_started"})
    first = True
    while True:
        started = time.monotonic()
        # A failed sweep was logged by _guarded; the next one tries again.
        with contextlib.suppress(*EXPECTED):
            _guarded("reconcile", lambda rt: reconciler.sweep(rt).summary())
        # One line a sweep (every 30 s by default): when beat was alive.
        log.info(
            "reconciler: swept in %.2fs%s",
            time.monotonic() - started,
            "; first sweep done" if first else "",
            extra={"action": "reconciler_swept"},
        )
        first = False
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


@worker_ready.connect
def _start_report_consumer(sender: Any = None, **_: Any) -> None:
    """Every core worker applies remote executors' reports (``runq.reports``)
    on a thread of its main process, for the reconciler's reason: as a task,
    a heartbeat would wait for a free pool process, and when every process
    runs terraform, agents' leases would lapse for want of one."""
    import os
    import threading

    from scheduler import remote

    if getattr(sender, "app", None) is not app:
        return  # an agent's worker (another app in this process)
    rt = build_runtime(app, settings(), actor=f"reports@{_hostname()}")
    # Pool processes forked later (a replaced child) must not use, or close,
    # this thread's database connections.
    os.register_at_fork(after_in_child=rt.after_fork)
    stop = threading.Event()
    threading.Thread(target=remote.serve, args=(rt, stop), name="runq-reports", daemon=True).start()
    log.info("consuming executor reports", extra={"action": "report_consumer_started"})
