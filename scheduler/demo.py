"""``runq demo``: the whole system on one machine, end to end.

With no configuration it needs nothing but ``redis-server`` and ``terraform``
on PATH:

* the database is a fresh SQLite file in ``<data dir>/demo-<timestamp>/``
  (unless ``RUNQ_DATABASE_URL`` names one), migrated first;
* Redis is a private ``redis-server`` on a free port (unless
  ``RUNQ_REDIS_URL`` is set), used for the workspace lock and as the broker,
  unless ``RUNQ_BROKER_URL`` names another (RabbitMQ: ``amqp://...``);
* ``--workers`` real Celery workers run the queued phases with real
  terraform, through a small generated wrapper that sleeps before each plan
  and apply so the timeline has something to show;
* a mixed scenario runs over three workspaces, with progress printed as it
  goes, and ends with a per-workspace timeline built from ``task_events``
  and the overlap facts computed from it (:mod:`scheduler.timeline`).

Everything it started is stopped before it returns, on success or not.

This module runs the demo; the parts live beside it: what it runs against
(:mod:`scheduler.demo_setup`), what it does (:mod:`scheduler.demo_scenario`)
and what it shows (:mod:`scheduler.demo_render`). Redis and the workers are
started and stopped by :mod:`scheduler.supervise`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from scheduler import demo_render
from scheduler.demo_render import DemoReport
from scheduler.demo_scenario import Say, Scenario, create_workspaces
from scheduler.demo_setup import (
    APPLY_SECONDS,
    PLAN_SECONDS,
    WORKER_CONCURRENCY,
    Setup,
    find_redis_server,
    find_terraform,
    fresh_dir,
    prepare,
)
from scheduler.errors import DemoError
from scheduler.settings import Settings
from scheduler.supervise import (
    STOP_SECONDS,
    Exited,
    NotReady,
    Proc,
    WorkerPool,
    worker_argv,
)
from scheduler.timeline import timelines

#: Seconds the scenario may take, from the first submit to the last task settling.
DEADLINE_SECONDS = 180.0
WORKER_START_SECONDS = 60.0


# ---------------------------------------------------------------- workers


@dataclass
class _Workers(WorkerPool):
    """The demo's workers, ``demo0``, ``demo1``, ...: ``demo0`` also runs beat
    (the reconciler, as ``celery -A celery_app beat`` runs it). Ready once
    they answer a ping through this process's Celery app."""

    prefix: str = "demo"

    def names(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.count)]

    def argv(self, name: str) -> list[str]:
        return worker_argv(name, self.concurrency, beat=name == f"{self.prefix}0")

    def up(self) -> set[str]:
        return {host.split("@", 1)[0] for host in _ping(0.5)}


def _ping(timeout: float = 1.0) -> set[str]:
    from celery_app.app import app

    replies = app.control.ping(timeout=timeout) or []
    return {host for reply in replies for host in reply}


def _start_workers(count: int, demo_dir: Path, env: dict[str, str], stack: ExitStack) -> _Workers:
    """Start ``count`` workers and wait until they answer; they are stopped
    when ``stack`` closes."""
    pool = _Workers(count, env, demo_dir / "workers", concurrency=WORKER_CONCURRENCY, cwd=demo_dir)
    stack.callback(pool.stop, STOP_SECONDS)
    try:
        pool.start(WORKER_START_SECONDS)
    except Exited as exc:
        raise DemoError(f"worker {exc.proc.exit_report(lines=15, indent='    ')}") from exc
    except NotReady as exc:
        missing = ", ".join(sorted(exc.names))
        raise DemoError(f"workers {missing} not ready after {WORKER_START_SECONDS:g}s") from exc
    return pool


# ---------------------------------------------------------------- run


def run_demo(
    *,
    workers: int = 2,
    data_dir: Path | None = None,
    quiet: bool = False,
    plan_seconds: float = PLAN_SECONDS,
    apply_seconds: float = APPLY_SECONDS,
    deadline: float = DEADLINE_SECONDS,
) -> DemoReport:
    """Run the demo; print progress and the timeline unless ``quiet``.

    Raises :class:`DemoError` if something it needs is missing, or if the
    scenario did not end as runq promises (the report is still written to
    ``report.json`` in the demo directory).
    """
    if workers < 1:
        raise DemoError("--workers must be at least 1")

    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    started = time.monotonic()
    base = Settings()
    # What may be missing is checked before anything is created.
    real_tf = find_terraform(base.terraform_bin)
    redis_server = None if os.environ.get("RUNQ_REDIS_URL") else find_redis_server()
    root = (data_dir or base.data_dir).expanduser().resolve()
    demo_dir = fresh_dir(root)
    # Every process the demo starts; closing it stops the workers, then Redis.
    stack = ExitStack()
    restore = _sigterm_as_interrupt()
    try:
        setup = prepare(base, demo_dir, stack, real_tf, redis_server, plan_seconds, apply_seconds)
        return _run(
            setup, stack, workers=workers, say=say, quiet=quiet, deadline=deadline, started=started
        )
    except DemoError:
        raise
    except KeyboardInterrupt:
        if not quiet:
            print(f"interrupted; demo files and worker logs: {demo_dir}", file=sys.stderr)
        raise
    except Exception as exc:
        raise DemoError(
            f"{type(exc).__name__}: {exc} (demo files and worker logs: {demo_dir})"
        ) from exc
    finally:
        stack.close()
        restore()


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM unwind like Ctrl-C, so the workers and the private Redis
    (in sessions of their own) are stopped too. Returns the undo."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _run(
    setup: Setup,
    stack: ExitStack,
    *,
    workers: int,
    say: Say,
    quiet: bool,
    deadline: float,
    started: float,
) -> DemoReport:
    from scheduler.api import Client
    from scheduler.db import make_engine, upgrade

    demo_dir = setup.demo_dir
    setup.describe(say, workers)
    engine = make_engine(setup.settings.database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()

    from celery_app.app import use_settings

    # The demo pings its workers through the process's Celery app, so that
    # app must speak to the demo's broker (a Client loads Celery only when it
    # first publishes).
    use_settings(setup.settings)
    client = Client.from_env(setup.settings, actor="runq-demo")
    try:
        if setup.shared_broker:
            # Workers already on this broker would take the demo's messages
            # and run them against their own database.
            others = _ping()
            if others:
                hint = (
                    "give the demo a RabbitMQ vhost of its own (amqp://host/<vhost>)"
                    if setup.settings.broker_url
                    else "unset RUNQ_REDIS_URL for a private Redis, or use another Redis "
                    "database number"
                )
                raise DemoError(
                    "other celery workers already consume this broker "
                    f"({', '.join(sorted(others))}); {hint}"
                )
        say(f"starting {workers} worker(s)...")
        pool = _start_workers(workers, demo_dir, setup.worker_env(), stack)
        say(f"workers ready after {time.monotonic() - started:.1f}s")
        # A process that dies ends the demo.
        watch: list[Proc] = list(pool.workers)
        if setup.redis is not None and setup.redis.process is not None:
            watch.insert(0, setup.redis.process)

        names_by_ws = create_workspaces(client, demo_dir, say)
        say("")
        run = Scenario(client, names_by_ws, watch, say, deadline)
        problems = run.play()
        views = [client.get(i) for i in run.ids.values()]
        events = client.events(list(run.ids.values()))
    finally:
        client.close()
        from celery_app.app import app

        app.close()  # its connection pool points at a broker that is going away

    lines = timelines(events)  # each phase and wait of each task, for all three
    report = demo_render.report(
        views, events, lines, names_by_ws, problems, setup, workers, time.monotonic() - started
    )
    report.timeline = str(demo_render.picture(views, lines, demo_dir))
    (demo_dir / "report.json").write_text(demo_render.dumps(report.to_json()))
    if not quiet:
        say("")
        say(demo_render.render(views, events, lines, names_by_ws, report))
        say(f"timeline picture: {report.timeline} (runq timeline --out FILE draws one any time)")
    if not report.ok:
        raise DemoError(
            f"{report.verdict} (report: {demo_dir / 'report.json'}; "
            f"worker logs: {demo_dir / 'workers'})"
        )
    return report
