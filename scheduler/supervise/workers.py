"""Celery workers, ``runq agent`` processes and ``celery beat``, supervised.

:class:`WorkerPool` starts N workers (prefork, each with its own node name),
waits until every one is ready (by default: has logged ``ready.``), and
stops them: SIGTERM (warm shutdown), then SIGKILL of each worker's whole
process group. Each worker runs in a session of its own, so a caller can
kill or pause one (and everything under it) without touching the others;
:meth:`WorkerPool.restart` brings back a worker that was killed, and
:class:`Beat` runs ``celery beat`` (the reconciler's clock) the same way.
Output goes to one log file per process. :class:`AgentPool` starts
``runq agent`` processes the same way.

Every process's environment is ``environ(env)`` (by default this process's
environment with ``env`` on top: :func:`~scheduler.supervise.processes.inherit`),
and ``env_for(name)`` on top of ``env`` for process ``name`` when given: each
may have an environment of its own (its own ``RUNQ_DATA_DIR``, as separate
containers would have).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.supervise.processes import (
    Proc,
    SupervisionError,
    inherit,
    parent_pid,
    stop,
    tail,
    wait_ready,
)

#: What a celery worker (and so a ``runq agent``) logs once it consumes.
READY = " ready."
#: What runq's beat schedule logs after the reconciler's first sweep.
#: Not "beat: Starting": beat logs that before it opens its schedule file,
#: and may still die doing so.
FIRST_SWEEP = "first sweep done"

Environ = Callable[[dict[str, str]], dict[str, str]]


def worker_argv(
    name: str, concurrency: int, *, app: str = "celery_app", beat: bool = False
) -> list[str]:
    """``celery worker`` for node ``name@%h``: prefork, no mingle or gossip
    (nothing to sync at start, no chatter between workers); with ``beat``,
    it also runs the beat schedule (the reconciler), as
    ``celery -A celery_app beat`` runs it."""
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-c", str(concurrency)]
    argv += ["-n", f"{name}@%h", "--without-mingle", "--without-gossip", "-P", "prefork"]
    argv += ["--loglevel", "INFO"]
    if beat:
        argv.append("--beat")
    return argv


def agent_argv(pool: str, capacity: int) -> list[str]:
    """``runq agent`` for agent pool ``pool``."""
    argv = [sys.executable, "-m", "scheduler.cli", "agent", "--pool", pool]
    return [*argv, "--capacity", str(capacity)]


def beat_argv(app: str = "celery_app") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", app, "beat", "--loglevel", "INFO"]


class Worker(Proc):
    """One worker process of a :class:`WorkerPool`."""

    def ready(self) -> bool:
        return self.logged(READY)


@dataclass
class WorkerPool:
    """``count`` celery workers (``w1``, ``w2``, ...) with ``env``; see the
    module docstring for their environment."""

    count: int
    env: dict[str, str]
    logdir: Path
    concurrency: int = 3
    workers: list[Worker] = field(default_factory=list)
    env_for: Callable[[str], dict[str, str]] | None = None
    #: Worker names are this and a number.
    prefix: str = "w"
    #: The Celery application the workers load (``-A``).
    app: str = "celery_app"
    environ: Environ = inherit
    cwd: Path | None = None

    def names(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.count + 1)]

    def argv(self, name: str) -> list[str]:
        return worker_argv(name, self.concurrency, app=self.app)

    def up(self) -> Collection[str]:
        """The names of the workers that are ready."""
        return {w.name for w in self.workers if w.ready()}

    def start(self, timeout: float = 90.0) -> None:
        """Start every worker and wait until all are ready; if one exits
        first, or the ``timeout`` passes, stop them all and raise
        :class:`~scheduler.supervise.processes.SupervisionError`."""
        for name in self.names():
            worker = Worker(name, self.logdir / f"{name}.log")
            self._spawn(worker)
            self.workers.append(worker)
        self._await_ready(self.workers, timeout)

    def _spawn(self, worker: Worker) -> None:
        extra = self.env_for(worker.name) if self.env_for else {}
        worker.start(self.argv(worker.name), env=self.environ({**self.env, **extra}), cwd=self.cwd)

    def _await_ready(self, workers: list[Worker], timeout: float) -> None:
        try:
            wait_ready(workers, self.up, timeout)
        except SupervisionError:
            self.stop()
            raise

    def named(self, name: str) -> Worker:
        [worker] = [w for w in self.workers if w.name == name]
        return worker

    def restart(self, name: str, *, wait: bool = True, timeout: float = 90.0) -> Worker:
        """Start a fresh process under the name of worker ``name``, which was
        killed or stopped; whatever is left of its process group is killed
        first. The new process logs to a new file. With ``wait``, return
        once it is ready (else poll :meth:`Worker.ready`)."""
        old = self.named(name)
        old.kill()
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
        """SIGTERM (warm shutdown), then SIGKILL of each process group."""
        stop(self.workers, timeout)


@dataclass
class AgentPool(WorkerPool):
    """``count`` ``runq agent --pool POOL --capacity CAPACITY`` processes
    (named ``a1``, ``a2``, ...), supervised like :class:`WorkerPool`'s
    workers: ready once each has logged ``ready.``, stopped with SIGTERM (warm
    shutdown, a signed "stopping" beat), then SIGKILL of its process group.

    ``env`` needs the broker (``RUNQ_REDIS_URL``) and ``RUNQ_AGENT_TOKEN``;
    an agent needs no database. Start the core workers first: an agent's
    first beat waits for one of them to answer.
    """

    pool: str = ""
    capacity: int = 2
    prefix: str = "a"

    def argv(self, name: str) -> list[str]:
        assert self.pool, "AgentPool needs a pool name"
        return agent_argv(self.pool, self.capacity)


@dataclass
class Beat:
    """A real ``celery -A celery_app beat``: runq's reconciler, sweeping every
    ``RUNQ_RECONCILE_INTERVAL`` seconds on a thread of its own."""

    env: dict[str, str]
    logdir: Path
    environ: Environ = inherit
    cwd: Path | None = None
    process: Proc | None = None

    @property
    def log(self) -> Path:
        return self.logdir / "beat.log"

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait for the reconciler's first sweep; if it exits
        first, or the ``timeout`` passes, stop it and raise
        :class:`~scheduler.supervise.processes.SupervisionError`."""
        self.process = Proc("beat", self.log)
        self.process.start(beat_argv(), env=self.environ(self.env), cwd=self.cwd)
        process = self.process
        try:
            wait_ready([process], lambda: {"beat"} if process.logged(FIRST_SWEEP) else (), timeout)
        except SupervisionError as exc:
            self.stop()
            raise SupervisionError(f"celery beat did not start:\n{self.tail()}") from exc

    def tail(self, lines: int = 50) -> str:
        return tail(self.log, lines)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            stop([self.process], timeout)
            self.process = None
