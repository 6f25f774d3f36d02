"""Process supervision for the demo, the tests and the benchmark.

One home for starting runq's processes on this machine and stopping them
cleanly:

* :mod:`~scheduler.supervise.processes`: a child in a session of its own
  with its output in a log file (:class:`Proc`), waiting until children are
  ready, stopping them (SIGTERM, then SIGKILL of the process group), log
  tails, free ports, and a process's children and descendants from /proc;
* :mod:`~scheduler.supervise.redis_server`: a private ``redis-server``;
* :mod:`~scheduler.supervise.workers`: celery workers, ``runq agent``
  processes and ``celery beat``.

Nothing here is used by a deployment: there, each role is a process (or a
container) of its own, started and stopped by whatever runs the machine.
"""

from __future__ import annotations

from scheduler.supervise.processes import (
    STOP_SECONDS,
    Exited,
    NotReady,
    Proc,
    SupervisionError,
    children,
    descendants,
    free_port,
    inherit,
    parent_pid,
    stop,
    tail,
    wait_ready,
)
from scheduler.supervise.redis_server import RedisServer, find_redis_server
from scheduler.supervise.workers import (
    FIRST_SWEEP,
    READY,
    AgentPool,
    Beat,
    Environ,
    Worker,
    WorkerPool,
    agent_argv,
    beat_argv,
    worker_argv,
)

__all__ = [
    "FIRST_SWEEP",
    "READY",
    "STOP_SECONDS",
    "AgentPool",
    "Beat",
    "Environ",
    "Exited",
    "NotReady",
    "Proc",
    "RedisServer",
    "SupervisionError",
    "Worker",
    "WorkerPool",
    "agent_argv",
    "beat_argv",
    "children",
    "descendants",
    "find_redis_server",
    "free_port",
    "inherit",
    "parent_pid",
    "stop",
    "tail",
    "wait_ready",
    "worker_argv",
]
