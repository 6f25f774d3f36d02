"""The ``runq`` command line.

Every command takes ``--json``: stdout then carries JSON only. Errors go to
stderr (as JSON with ``--json``) with a non-zero exit status, and change
nothing.
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from scheduler.errors import InvalidInput, NotFound, SchedulerError
from scheduler.states import RUNNING, ExecutionMode

if TYPE_CHECKING:
    # Only for annotations: a command imports what it uses when it runs, so
    # `runq show` does not pay for Celery, Kubernetes or alembic (issue 8).
    from scheduler.views import EventView, TaskView, WorkspaceView
    from scheduler.workspaces import Overview

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_NOT_FOUND = 3
EXIT_TIMEOUT = 4


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: Any, human: Callable[[], object]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            human()


def _fail(as_json: bool, exc: Exception, code: int) -> None:
    if as_json:
        click.echo(json.dumps({"error": str(exc), "type": type(exc).__name__}), err=True)
    else:
        click.echo(f"runq: error: {exc}", err=True)
    sys.exit(code)


def command(group: click.Group, name: str | None = None) -> Callable[[F], F]:
    """A subcommand with ``--json``, runq's error handling, and a client."""

    def wrap(fn: F) -> F:
        @group.command(name=name or fn.__name__.replace("_", "-"), help=fn.__doc__)
        @click.option("--json", "as_json", is_flag=True, help="Print JSON only on stdout.")
        @functools.wraps(fn)
        def run(*args: Any, as_json: bool, **kwargs: Any) -> None:
            from scheduler.api import WaitTimeout

            try:
                fn(Output(as_json), *args, **kwargs)
            except WaitTimeout as exc:
                _fail(as_json, exc, EXIT_TIMEOUT)
            except NotFound as exc:
                _fail(as_json, exc, EXIT_NOT_FOUND)
            except SchedulerError as exc:
                _fail(as_json, exc, EXIT_ERROR)
            except Exception as exc:
                # Infrastructure down (database, Redis) and the like: one line,
                # not a traceback, but say what it was.
                logging.getLogger(__name__).debug("command failed", exc_info=True)
                _fail(as_json, RuntimeError(f"{type(exc).__name__}: {exc}"), EXIT_ERROR)

        return run  # type: ignore[return-value]

    return wrap


def client() -> Any:
    from scheduler.api import Client

    return Client.from_env(actor=f"cli:{getpass.getuser()}")


EXIT_USAGE = 2


class Group(click.Group):
    """Click's group, whose usage errors are JSON too when ``--json`` is given.

    Click prints usage errors (a missing argument, a bad option, an unknown
    command) as text before any command runs; a script that asked for JSON
    must still get JSON on stderr, with click's exit status 2.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        argv = list(args[0]) if args else sys.argv[1:]
        if "--json" not in argv:
            return super().main(*args, **kwargs)
        try:
            kwargs["standalone_mode"] = False
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            message = exc.format_message()
            click.echo(json.dumps({"error": message, "type": "UsageError"}), err=True)
            sys.exit(EXIT_USAGE)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            sys.exit(EXIT_ERROR)


@click.group(cls=Group)
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """runq: plans run free, plan+apply is serialized per workspace."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )


# ---------------------------------------------------------------- db


@main.group()
def db() -> None:
    """Database schema."""


@command(db)
def upgrade(out: Output) -> None:
    """Create or migrate the schema to the newest revision."""
    from scheduler.db import current_revision, make_engine
    from scheduler.db import upgrade as run_upgrade
    from scheduler.settings import Settings

    settings = Settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        run_upgrade(engine)
        revision = current_revision(engine)
    finally:
        engine.dispose()
    out.emit(
        {"revision": revision, "database": engine.url.render_as_string(hide_password=True)},
        lambda: click.echo(f"database at revision {revision}"),
    )


# ---------------------------------------------------------------- workspaces


@main.group()
def workspace() -> None:
    """Workspaces: create, list, lock."""


def _print_workspace(ws: WorkspaceView) -> None:
    lock = f"locked by {ws.locked_by}" + (f" ({ws.lock_reason})" if ws.lock_reason else "")
    click.echo(
        f"{ws.name}  mode={ws.execution_mode}  auto_apply={'yes' if ws.auto_apply else 'no'}"
        f"  {lock if ws.locked else 'unlocked'}"
        + (f"  dir={ws.source_dir}" if ws.source_dir else "")
        + (f"  pool={ws.agent_pool}" if ws.agent_pool else "")
        + (f"  plan_timeout={ws.plan_timeout:g}s" if ws.plan_timeout else "")
        + (f"  apply_timeout={ws.apply_timeout:g}s" if ws.apply_timeout else "")
    )


@command(workspace)
@click.argument("name")
@click.option("--mode", type=click.Choice([m.value for m in ExecutionMode]), default="local")
@click.option(
    "--dir",
    "source_dir",
    type=click.Path(),
    help="Terraform configuration; snapshotted at each submit, so executors never need it.",
)
@click.option("--auto-apply", is_flag=True, help="Apply without waiting for confirmation.")
@click.option("--agent-pool", help="Agent pool name (agent mode).")
@click.option(
    "--k8s",
    "k8s_json",
    help="Kubernetes settings this workspace overrides, as JSON "
    '(e.g. \'{"namespace": "tf", "image": "runq:1"}\'; k8s mode).',
)
@click.option(
    "--plan-timeout", type=float, help="Seconds a plan may run (default RUNQ_PLAN_TIMEOUT)."
)
@click.option("--apply-timeout", type=float, help="Seconds an apply may run (RUNQ_APPLY_TIMEOUT).")
def create(
    out: Output,
    name: str,
    mode: str,
    source_dir: str | None,
    auto_apply: bool,
    agent_pool: str | None,
    k8s_json: str | None,
    plan_timeout: float | None,
    apply_timeout: float | None,
) -> None:
    """Create workspace NAME."""
    k8s: dict[str, Any] | None = None
    if k8s_json:
        try:
            k8s = json.loads(k8s_json)
        except ValueError as exc:
            raise InvalidInput(f"--k8s is not JSON: {exc}") from exc
    ws = client().create_workspace(
        name,
        mode=mode,
        source_dir=source_dir,
        auto_apply=auto_apply,
        agent_pool=agent_pool,
        plan_timeout=plan_timeout,
        apply_timeout=apply_timeout,
        k8s=k8s,
    )
    out.emit(ws.to_json(), lambda: _print_workspace(ws))


def _timeout_option(value: str | None) -> float | None:
    """'default' means back to the settings' default; a number is seconds."""
    from scheduler import workspaces
    from scheduler.errors import InvalidInput

    if value is None:
        return workspaces.KEEP
    if value == "default":
        return None
    try:
        return float(value)
    except ValueError:
        raise InvalidInput(f"a timeout is seconds or 'default', got {value!r}") from None


@command(workspace, "set")
@click.argument("name")
@click.option("--plan-timeout", help="Seconds, or 'default'.")
@click.option("--apply-timeout", help="Seconds, or 'default'.")
def set_workspace(
    out: Output, name: str, plan_timeout: str | None, apply_timeout: str | None
) -> None:
    """Change workspace NAME's settings (running phases see it at once)."""
    from scheduler import workspaces

    ws = workspaces.set_timeouts(
        client().runtime,
        name,
        plan_timeout=_timeout_option(plan_timeout),
        apply_timeout=_timeout_option(apply_timeout),
    )
    out.emit(ws.to_json(), lambda: _print_workspace(ws))


@command(workspace, "list")
def list_workspaces(out: Output) -> None:
    """List workspaces."""
    from scheduler import workspaces

    items = workspaces.list_all(client().runtime)
    out.emit([w.to_json() for w in items], lambda: list(map(_print_workspace, items)))


@command(workspace, "show")
@click.argument("name")
def show_workspace(out: Output, name: str) -> None:
    """Show workspace NAME: its active plan+apply, its queue in order, its
    running plans, its lock and its latest state version."""
    from scheduler import workspaces

    o = workspaces.overview(client().runtime, name)
    out.emit(o.to_json(), lambda: _print_overview(o))


def _print_overview(o: Overview) -> None:
    from datetime import UTC, datetime

    from scheduler.views import when

    now = datetime.now(UTC)

    def line(t: TaskView) -> str:
        since = when(t.status_changed_at or t.created_at, now)
        started = "" if t.status not in RUNNING or t.executor_handle else " (not started yet)"
        return (
            f"task {t.id} {t.type}, {t.status}{started} since {since}"
            + (f", by {t.created_by}" if t.created_by else "")
            + (f': "{t.message}"' if t.message else "")
        )

    ws = o.workspace
    _print_workspace(ws)
    reason = f' ("{ws.lock_reason}")' if ws.lock_reason else ""
    lock = f"{ws.locked_by}{reason} since {when(ws.locked_at, now)}" if ws.locked else "none"
    click.echo(f"{'locked by':>14}: {lock}")
    click.echo(f"{'active':>14}: {line(o.active) if o.active else 'none'}")
    click.echo(f"{'queue':>14}:" + ("" if o.queue else " empty"))
    for i, t in enumerate(o.queue, 1):
        click.echo(f"{i:>16}. {line(t)}")
    click.echo(f"{'running plans':>14}:" + ("" if o.running_plans else " none"))
    for t in o.running_plans:
        click.echo(f"{'':>16}  {line(t)}")
    v = o.state
    state = (
        f"version {v.version} (serial {v.serial}, task {v.task_id or '-'}, {v.size} bytes, "
        f"{when(v.created_at, now)})"
        if v
        else "none stored yet"
    )
    click.echo(f"{'state':>14}: {state}")


@command(workspace)
@click.argument("name")
@click.option("--reason", help="Why (shown to whoever finds the workspace locked).")
def lock(out: Output, name: str, reason: str | None) -> None:
    """Lock NAME: plan+apply tasks stay queued; plans still run."""
    from scheduler import workspaces

    ws = workspaces.lock(client().runtime, name, holder=f"cli:{getpass.getuser()}", reason=reason)
    out.emit(ws.to_json(), lambda: _print_workspace(ws))


@command(workspace)
@click.argument("name")
def unlock(out: Output, name: str) -> None:
    """Unlock NAME and let its queued plan+apply tasks go."""
    from scheduler import workspaces

    ws = workspaces.unlock(client().runtime, name)
    out.emit(ws.to_json(), lambda: _print_workspace(ws))


# ---------------------------------------------------------------- tasks


def _when(view: TaskView) -> str:
    return view.created_at.strftime("%Y-%m-%d %H:%M:%S")


def _print_task(t: TaskView) -> None:
    changes = f"+{t.add} ~{t.change} -{t.destroy}" if t.add is not None else ""
    click.echo(
        f"{t.id:>6}  {t.workspace:<20} {t.type:<15} {t.status:<14} {_when(t)}  {changes}"
        + (f"  error: {t.error}" if t.error else "")
    )


def _ago(value: str | None) -> str:
    from datetime import UTC, datetime

    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - datetime.fromisoformat(value)).total_seconds()
    return f"{value} ({seconds:.0f}s ago)"


def _print_task_detail(t: TaskView, events: list[EventView]) -> None:
    for key, value in t.to_json().items():
        if value is not None and key not in {"executor", "cancel"}:
            click.echo(f"{key:>16}: {value}")
    executor = t.executor_json()
    if executor is not None:
        if executor["started"]:
            click.echo(
                f"{'executor':>16}: {executor['handle']}, last heard from "
                f"{_ago(executor['last_heard_at'])}; lease until {executor['lease_expires_at']}"
            )
        else:
            click.echo(
                f"{'executor':>16}: none has started it yet (hand-off sent "
                f"{executor['handoff_attempts']} time(s))"
            )
    if t.cancel_requested_at is not None and t.status in RUNNING:
        click.echo(
            f"{'cancel':>16}: requested by {t.cancel_requested_by}"
            f"{' (force)' if t.cancel_force else ''}, waiting for the executor to stop terraform"
        )
    click.echo("          events:")
    for e in events:
        click.echo(
            f"    {e.at.strftime('%H:%M:%S.%f')[:-3]}  {e.from_status or '-':>13} -> "
            f"{e.to_status:<13} by {e.actor}" + (f" ({e.reason})" if e.reason else "")
        )


@command(main)
@click.argument("workspace_name", metavar="NAME")
@click.option("--type", "task_type", required=True, help="plan | plan_and_apply")
@click.option("--message", help="Why this run (shown in lists and timelines).")
def submit(out: Output, workspace_name: str, task_type: str, message: str | None) -> None:
    """Queue a task in workspace NAME."""
    # The type is validated by the API, not click.Choice, so a bad one gets
    # runq's own error and exit status (as JSON with --json).
    t = client().submit(workspace_name, task_type, message=message)
    out.emit(t.to_json(), lambda: _print_task(t))


@command(main)
@click.argument("task_id", type=int)
def show(out: Output, task_id: int) -> None:
    """Show task ID with its events, and what it waits for if it is not running."""
    from scheduler import waiting

    c = client()
    t, why = waiting.show(c.runtime, task_id)
    events = c.events([task_id])

    def human() -> None:
        _print_task_detail(t, events)
        if why is not None:
            click.echo(f"{'why':>16}: {why.sentence}")

    out.emit(
        {
            **t.to_json(),
            "waiting_for": why.to_json() if why is not None else None,
            "events": [e.to_json() for e in events],
        },
        human,
    )


@command(main, "list")
@click.option("--workspace", "workspace_name", help="Only this workspace.")
@click.option("--status", "statuses", multiple=True, help="Only these statuses (repeatable).")
@click.option("--limit", default=200, show_default=True)
def list_cmd(
    out: Output, workspace_name: str | None, statuses: tuple[str, ...], limit: int
) -> None:
    """List tasks, newest first."""
    from scheduler import tasks

    parsed = [tasks.parse_status(s) for s in statuses]
    items = tasks.list_tasks(
        client().runtime, workspace=workspace_name, statuses=parsed, limit=limit
    )
    out.emit([t.to_json() for t in items], lambda: list(map(_print_task, items)))


@command(main)
@click.argument("task_id", type=int)
def confirm(out: Output, task_id: int) -> None:
    """Confirm the plan of plan+apply task ID; its apply is queued."""
    t = client().confirm(task_id)
    out.emit(t.to_json(), lambda: _print_task(t))


@command(main)
@click.argument("task_id", type=int)
def discard(out: Output, task_id: int) -> None:
    """Discard the plan of plan+apply task ID; the workspace moves on."""
    t = client().discard(task_id)
    out.emit(t.to_json(), lambda: _print_task(t))


@command(main)
@click.argument("task_id", type=int)
@click.option("--force", is_flag=True, help="Kill terraform at once instead of interrupting it.")
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Wait until the task has ended."
)
@click.option(
    "--timeout", type=float, default=None, help="Give up waiting after S seconds (exit 4)."
)
def cancel(out: Output, task_id: int, force: bool, wait: bool, timeout: float | None) -> None:
    """Cancel task ID. A running plan or apply is interrupted (SIGINT: terraform
    saves its state and stops; a cancelled apply keeps the state it wrote), or
    with --force killed at once; --force also ends a task whose executor is gone."""
    from scheduler.states import TERMINAL

    c = client()
    t = c.cancel(task_id, force=force)
    if wait and t.status not in TERMINAL:
        if not out.as_json:
            click.echo(f"task {task_id}: cancel requested; waiting for terraform to stop", err=True)
        [t] = c.wait([task_id], timeout=timeout, until=TERMINAL)
    out.emit(t.to_json(), lambda: _print_task(t))


@command(main)
@click.argument("task_id", type=int)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Stream the output as it arrives, until the task ends or waits for confirmation.",
)
def logs(out: Output, task_id: int, follow: bool) -> None:
    """Print the terraform output of task ID, phase by phase.

    The output is stored by runq as the executor sends it, so this works on
    any host, whichever worker, agent or Job ran the phase. With --follow it
    streams: executors send their output at every heartbeat (2 s), so it
    arrives a heartbeat behind terraform at most; with --json, one JSON
    object per piece.
    """
    c = client()
    c.get(task_id)  # unknown id: a clear error, not an empty answer
    if follow:
        _follow(c, task_id, out.as_json)
        return
    texts = c.logs(task_id)

    def human() -> None:
        if not texts:
            click.echo(f"(no logs yet for task {task_id})", err=True)
        for phase, text in texts.items():
            click.echo(f"===== {phase} =====")
            click.echo(text, nl=False)

    out.emit({"task_id": task_id, "logs": texts}, human)


def _follow(c: Any, task_id: int, as_json: bool) -> None:
    shown: tuple[str, int] | None = None
    for piece in c.follow_logs(task_id):
        text = piece.text.decode("utf-8", errors="replace")
        if as_json:
            click.echo(json.dumps({"phase": piece.phase, "fence": piece.fence, "text": text}))
            continue
        if shown != (piece.phase, piece.fence):
            again = shown is not None and shown[0] == piece.phase
            click.echo(f"===== {piece.phase}{' (run again)' if again else ''} =====")
            shown = (piece.phase, piece.fence)
        click.echo(text, nl=False)


@command(main)
@click.argument("task_ids", nargs=-1, type=int, required=True)
@click.option("--timeout", type=float, default=None, help="Give up after S seconds (exit 4).")
def wait(out: Output, task_ids: tuple[int, ...], timeout: float | None) -> None:
    """Wait until every task is finished or waiting for confirmation."""
    views = client().wait(task_ids, timeout=timeout)
    out.emit([v.to_json() for v in views], lambda: list(map(_print_task, views)))


@command(main)
@click.option("--check", is_flag=True, help="Exit 1 if anything is wrong.")
@click.option(
    "--check-beat", is_flag=True, help="Exit 1 if the reconciler's sweep is overdue (health check)."
)
@click.option("--ping-timeout", type=float, default=1.0, show_default=True)
def status(out: Output, check: bool, check_beat: bool, ping_timeout: float) -> None:
    """The reconciler's last sweep, the workers, queue depths and task counts."""
    from celery_app.app import app
    from scheduler.status import collect

    st = collect(client().runtime, app, ping_timeout=ping_timeout)

    def human() -> None:
        age = st.sweep_age
        sweep = "never" if age is None else f"{age:.0f}s ago"
        click.echo(
            f"reconciler: last sweep {sweep} (every {st.sweep_interval:g}s)"
            + ("  OVERDUE" if st.sweep_overdue else "")
        )
        workers = (
            "unknown (broker unreachable)"
            if st.workers is None
            else (", ".join(st.workers) or "none")
        )
        click.echo(f"workers: {workers}")
        click.echo(
            "queues: " + ", ".join(f"{q}={'?' if n is None else n}" for q, n in st.queues.items())
        )
        click.echo(
            "tasks: " + (", ".join(f"{k}={v}" for k, v in sorted(st.tasks.items())) or "none")
        )
        if st.lapsed:
            click.echo(f"lapsed leases: {st.lapsed} (the next sweep handles them)")
        for problem in st.problems():
            click.echo(f"PROBLEM: {problem}")

    out.emit(st.to_json(), human)
    if (check and st.problems()) or (check_beat and st.sweep_overdue):
        sys.exit(EXIT_ERROR)


@command(main)
@click.option("--port", type=int, required=True, help="TCP port to serve /metrics on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
def metrics(out: Output, port: int, host: str) -> None:
    """Serve Prometheus metrics on http://HOST:PORT/metrics until stopped.

    Each scrape reads the database and Redis, so the figures cover every
    worker; counters and histograms restart from the task history when this
    process restarts (see scheduler/metrics.py).
    """
    from scheduler.metrics import serve

    rt = client().runtime
    server, thread = serve(rt, host, port)
    bound_host, bound_port = server.server_address[:2]
    url = f"http://{bound_host}:{bound_port}/metrics"
    out.emit({"url": url}, lambda: click.echo(f"serving runq metrics on {url}"))
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()


# -- stored state ----------------------------------------------------------------


@main.group()
def state() -> None:
    """The Terraform state runq stores for each workspace, versioned."""


@command(state, "versions")
@click.argument("workspace_name", metavar="WORKSPACE")
def state_versions(out: Output, workspace_name: str) -> None:
    """List WORKSPACE's stored states, oldest first."""
    from scheduler import artifacts

    c = client()
    with c.session() as s:
        versions = artifacts.state_versions(s, workspace_name)
    rows = [v.to_json() for v in versions]

    def human() -> None:
        if not versions:
            click.echo(f"(no state stored for {workspace_name} yet)", err=True)
        for v in versions:
            click.echo(
                f"version {v.version}  serial {v.serial}  task {v.task_id or '-'}  "
                f"{v.size} bytes  {v.created_at:%Y-%m-%d %H:%M:%S}  lineage {v.lineage}"
            )

    out.emit(rows, human)


@command(state, "show")
@click.argument("workspace_name", metavar="WORKSPACE")
@click.option("--version", "number", type=int, help="Version number (default: the current).")
def state_show(out: Output, workspace_name: str, number: int | None) -> None:
    """Print WORKSPACE's current (or --version N) Terraform state."""
    from scheduler import artifacts

    c = client()
    with c.session() as s:
        v, content = artifacts.state_version(s, workspace_name, number)
    text = content.decode("utf-8", errors="replace")
    out.emit({**v.to_json(), "state": json.loads(text)}, lambda: click.echo(text, nl=False))


# -- agent pools and agents ----------------------------------------------------------


@main.group()
def pool() -> None:
    """Agent pools: named groups of agents that run agent-mode workspaces."""


@command(pool, "create")
@click.argument("name")
def pool_create(out: Output, name: str) -> None:
    """Create pool NAME and print its token (shown once: give it to its agents)."""
    from scheduler import pools

    view, token = pools.create(client().runtime, name)

    def human() -> None:
        click.echo(f"pool {view.name} created.")
        click.echo(f"token: {token}")
        click.echo("Start an agent: RUNQ_AGENT_TOKEN=<token> runq agent --pool " + view.name)

    out.emit({**view.to_json(), "token": token}, human)


@command(pool, "list")
def pool_list(out: Output) -> None:
    """List pools, with their live agents' capacity."""
    from scheduler import pools

    views = pools.list_all(client().runtime)

    def human() -> None:
        for v in views:
            click.echo(
                f"{v.name:<24} {v.kind:<6} live agents {v.agents}  capacity {v.capacity}  "
                f"busy {v.busy}"
            )

    out.emit([v.to_json() for v in views], human)


@main.group(invoke_without_command=True)
@click.option("--pool", "pool_name", help="The pool to serve (RUNQ_AGENT_TOKEN is its token).")
@click.option("--capacity", default=1, show_default=True, help="Phases run at once.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_context
def agent(ctx: click.Context, pool_name: str | None, capacity: int, loglevel: str) -> None:
    """Run an agent for --pool (needs RUNQ_BROKER_URL and RUNQ_AGENT_TOKEN,
    no database), or `runq agent list`."""
    if ctx.invoked_subcommand is not None:
        return
    if not pool_name:
        raise click.UsageError("runq agent needs --pool NAME (or: runq agent list)")
    if not 1 <= capacity <= 1000:
        raise click.UsageError("--capacity must be 1..1000")
    from celery_app.agent import main as agent_main
    from scheduler.settings import Settings

    agent_main(Settings(), pool_name, capacity, loglevel)


@command(agent, "list")
@click.option("--pool", "pool_name", help="Only this pool's agents.")
@click.option("--all", "show_all", is_flag=True, help="Include agents no longer live.")
def agent_list(out: Output, pool_name: str | None, show_all: bool) -> None:
    """List agents: pool, capacity, what each runs now, when last seen."""
    from scheduler import pools

    views = [a for a in pools.agents(client().runtime, pool_name) if show_all or a.live]

    def human() -> None:
        if not views:
            click.echo("(no live agents)", err=True)
        for a in views:
            running = ", ".join(f"task {r['task_id']} {r['phase']}" for r in a.running) or "idle"
            click.echo(
                f"{a.id:<40} pool {a.pool:<16} capacity {a.capacity}  running: {running}  "
                f"last seen {_ago(a.last_seen_at.isoformat())}{'' if a.live else '  (gone)'}"
            )

    out.emit([a.to_json() for a in views], human)


@main.command("run-phase")
@click.option(
    "--bundle-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The mounted hand-off: bundle.json, run_key, pool (and broker_url).",
)
def run_phase(bundle_dir: Path) -> None:
    """Run one phase from a mounted hand-off (a Kubernetes Job's container)."""
    from executors.remote import run_phase_from_dir
    from scheduler.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(run_phase_from_dir(bundle_dir, Settings()))


@command(main)
@click.option("--workspace", "workspace_name", default=None, help="Only this workspace's tasks.")
@click.option("--since", default=None, help="Tasks created since: 90s, 15m, 2h, 1d or ISO time.")
@click.option("--limit", default=500, show_default=True, help="At most this many (newest) tasks.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="FILE.svg, FILE.html or FILE.png (PNG needs Debian's chromium).",
)
def timeline(
    out: Output, workspace_name: str | None, since: str | None, limit: int, out_path: Path
) -> None:
    """Draw each task's phases and waits over time, from the event table."""
    from scheduler import timeline_picture, workspaces
    from scheduler.models import utcnow

    rt = client().runtime
    if workspace_name is not None:
        workspaces.get(rt, workspace_name)  # unknown name: a clear error
    after = timeline_picture.parse_since(since, utcnow())
    path, count = timeline_picture.draw(
        rt, out_path, workspace=workspace_name, since=after, limit=limit
    )
    out.emit(
        {"path": str(path), "tasks": count},
        lambda: click.echo(f"wrote {path} ({count} tasks)"),
    )


@command(main)
@click.option("--workers", default=2, show_default=True, help="Celery worker processes.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the demo keeps its files (default: $RUNQ_DATA_DIR or ./.runq).",
)
def demo(out: Output, workers: int, data_dir: Path | None) -> None:
    """Run a mixed scenario end to end and print per-workspace timelines."""
    from scheduler.demo import run_demo

    report = run_demo(workers=workers, data_dir=data_dir, quiet=out.as_json)
    out.emit(report.to_json(), lambda: None)


if __name__ == "__main__":  # pragma: no cover
    main()
