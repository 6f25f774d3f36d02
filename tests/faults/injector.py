"""Faults on a schedule drawn from a seed, injected into a running cluster.

Kinds (:class:`Kind`):

* ``kill_worker``: SIGKILL of a worker's celery processes (main and pool
  children) as an OOM kill or lost container would; terraform under them
  must die of its parent's death (runq's executor sets a parent-death
  signal). The worker is restarted a few seconds later.
* ``kill_child``: SIGKILL of one pool child, preferably one running
  terraform; celery forks a replacement.
* ``stop_worker``: SIGSTOP of a worker's whole process tree, terraform
  included, for longer than both the lock TTL and the lease TTL, then
  SIGCONT: the paused executor wakes up holding a stale fence.
* ``redis_restart``: SIGKILL of the private redis-server, down for a moment,
  then started empty: every queued message, unacked delivery and lock lost.
* ``pg_terminate``: ``pg_terminate_backend`` of every session on the test
  database except the harness's own.
* ``msg_duplicate``: extra copies of live hints: ``execute`` under the
  current fence for running phases, ``claim_plan`` for pending and running
  plans, ``dispatch`` for random workspaces.
* ``msg_replay``: old messages again: ``execute`` under a superseded fence,
  ``execute`` and ``claim_plan`` of finished tasks.
* ``msg_drop``: for a few seconds, a competing consumer takes messages off
  the three queues (kombu's Redis transport keeps each queue as a list named
  after it) and throws them away.

Each fault's random choices come from ``Random(f"{seed}/{index}")``, so a
seed replays the same schedule (targets still depend on what is running).
Faults with an end (a restart, a SIGCONT, Redis coming back) schedule it as
a follow-up; :meth:`Injector.heal` runs every outstanding follow-up at once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from redis import Redis

from scheduler import messages
from scheduler.messages import QUEUE_RUNS, TASK_EXECUTE, Message
from scheduler.supervise import children, descendants
from tests.faults.harness import FaultCluster

log = logging.getLogger(__name__)


class Kind(StrEnum):
    KILL_WORKER = "kill_worker"
    KILL_CHILD = "kill_child"
    STOP_WORKER = "stop_worker"
    REDIS_RESTART = "redis_restart"
    PG_TERMINATE = "pg_terminate"
    MSG_DUPLICATE = "msg_duplicate"
    MSG_REPLAY = "msg_replay"
    MSG_DROP = "msg_drop"


#: Relative frequency of each kind after the first of each.
WEIGHTS = {
    Kind.KILL_WORKER: 2,
    Kind.KILL_CHILD: 3,
    Kind.STOP_WORKER: 2,
    Kind.REDIS_RESTART: 1,
    Kind.PG_TERMINATE: 2,
    Kind.MSG_DUPLICATE: 2,
    Kind.MSG_REPLAY: 2,
    Kind.MSG_DROP: 2,
}


def execute(task_id: int, fence: int) -> Message:
    """The hand-off message, as runq's launcher sends it: id and fence."""
    return Message(TASK_EXECUTE, QUEUE_RUNS, (task_id, fence))


@dataclass
class Fault:
    index: int
    kind: Kind
    #: Planned, in seconds after the start of the load.
    planned: float
    #: POSIX times: when it was injected, and when its effect ended (the
    #: worker restarted or continued, Redis back); None if instantaneous.
    injected_at: float | None = None
    ended_at: float | None = None
    target: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def plan_faults(
    seed: int, count: int, start: float, end: float, kinds: list[Kind] | None = None
) -> list[Fault]:
    """``count`` faults spread over [start, end): every kind at least once
    (if ``count`` allows), the rest weighted by :data:`WEIGHTS`."""
    rng = random.Random(f"{seed}/schedule")
    every = list(kinds or Kind)
    chosen = every[:count] + rng.choices(
        every, [WEIGHTS[k] for k in every], k=max(0, count - len(every))
    )
    rng.shuffle(chosen)
    slot = (end - start) / max(count, 1)
    return [
        Fault(i, kind, round(start + (i + rng.uniform(0.1, 0.9)) * slot, 2))
        for i, kind in enumerate(chosen)
    ]


@dataclass
class FollowUp:
    at: float
    what: str
    action: Callable[[], None]


class Injector:
    def __init__(self, cluster: FaultCluster, seed: int, faults: list[Fault]) -> None:
        self.cluster = cluster
        self.seed = seed
        self.faults = faults
        self.follow_ups: list[FollowUp] = []
        #: Workers neither dead nor paused: the only ones a fault may pick.
        self.healthy = {w.name for w in cluster.pool.workers}
        self.restarting: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._orphan_checks: list[tuple[float, Fault, list[int]]] = []

    # -- the loop's entry points ---------------------------------------------

    def tick(self, elapsed: float) -> None:
        """Inject what is due ``elapsed`` seconds into the load, and run due
        follow-ups."""
        now = time.time()
        for f in self.faults:
            if f.injected_at is None and f.skipped is None and f.planned <= elapsed:
                self.inject(f)
        for fu in [fu for fu in self.follow_ups if fu.at <= now]:
            self.follow_ups.remove(fu)
            fu.action()
        self._welcome_back()
        self._look_for_orphans(now)

    def heal(self, timeout: float = 90.0) -> float:
        """Inject nothing more; let every fault end as planned (a pause cut
        short would no longer outlast the lease); wait until every worker is
        ready again and every drop window closed. The POSIX time healing
        finished."""
        for fu in sorted(self.follow_ups, key=lambda f: f.at):
            time.sleep(max(0.0, fu.at - time.time()))
            fu.action()
        self.follow_ups.clear()
        for t in self._threads:
            t.join()
        deadline = time.monotonic() + timeout
        while self._welcome_back():
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(self.restarting)} not ready after healing")
            time.sleep(0.1)
        last = max((due for due, _, _ in self._orphan_checks), default=0.0)
        time.sleep(max(0.0, last - time.time()))
        self._look_for_orphans(last)
        return time.time()

    def _welcome_back(self) -> set[str]:
        """Count restarted workers that are ready as healthy again; the
        names still coming up."""
        for name in list(self.restarting):
            if self.cluster.worker(name).ready():
                self.restarting.discard(name)
                self.healthy.add(name)
        return self.restarting

    def _look_for_orphans(self, now: float) -> None:
        for check in [c for c in self._orphan_checks if c[0] <= now]:
            self._orphan_checks.remove(check)
            _, fault, pids = check
            fault.detail["orphans"] = [p for p in pids if _terraform_alive(p)]

    # -- injection -------------------------------------------------------------

    def inject(self, f: Fault) -> None:
        rng = random.Random(f"{self.seed}/{f.index}")
        handler = getattr(self, f"_{f.kind}")
        try:
            handler(f, rng)
        except Exception as exc:  # a fault that could not be injected is reported, not fatal
            log.exception("fault %s (%s) failed", f.index, f.kind)
            f.skipped = f"{type(exc).__name__}: {exc}"
            return
        if f.skipped is None:
            f.injected_at = f.injected_at or time.time()
        log.info("fault %d %s %s %s", f.index, f.kind, f.target or "", f.skipped or f.detail or "")

    def _pick_worker(self, f: Fault, rng: random.Random, *, takes_it: bool = True) -> str | None:
        """A healthy worker for ``f``. One that ``takes_it`` down (or pauses
        it) must leave another healthy: a cluster with no worker left would
        only measure how long the faults lasted."""
        if len(self.healthy) < (2 if takes_it else 1):
            f.skipped = f"{len(self.healthy)} healthy workers"
            return None
        f.target = rng.choice(sorted(self.healthy))
        return f.target

    def _kill_worker(self, f: Fault, rng: random.Random) -> None:
        name = self._pick_worker(f, rng)
        if name is None:
            return
        celery = self.cluster.celery_processes(name)
        below = [p for p in descendants(celery[0]) if p not in celery]
        for pid in celery:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        f.injected_at = time.time()
        self.healthy.discard(name)
        f.detail["killed"] = len(celery)
        self._check_orphans(f, below)
        down = rng.uniform(1.0, 4.0)

        def restart() -> None:
            self.cluster.pool.restart(name, wait=False)
            self.restarting.add(name)
            f.ended_at = time.time()

        self.follow_ups.append(FollowUp(time.time() + down, f"restart {name}", restart))

    def _kill_child(self, f: Fault, rng: random.Random) -> None:
        name = self._pick_worker(f, rng, takes_it=False)
        if name is None:
            return
        pool = self.cluster.celery_processes(name)[1:]
        busy = [p for p in pool if children(p)]
        if not pool:
            f.skipped = "no pool children"
            return
        victim = rng.choice(busy if busy and rng.random() < 0.8 else pool)
        below = descendants(victim)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        f.injected_at = time.time()
        f.detail.update(pid=victim, busy=bool(below))
        self._check_orphans(f, below)

    def _stop_worker(self, f: Fault, rng: random.Random) -> None:
        name = self._pick_worker(f, rng)
        if name is None:
            return
        pids = self.cluster.signal_tree(name, signal.SIGSTOP)
        f.injected_at = time.time()
        self.healthy.discard(name)
        hold = self.cluster.timings.longest_hold
        paused = rng.uniform(hold + 2.0, hold + 6.0)
        f.detail.update(processes=len(pids), seconds=round(paused, 2))

        def resume() -> None:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.healthy.add(name)
            f.ended_at = time.time()

        self.follow_ups.append(FollowUp(time.time() + paused, f"continue {name}", resume))

    def _redis_restart(self, f: Fault, rng: random.Random) -> None:
        self.cluster.redis.kill()
        f.injected_at = time.time()
        down = rng.uniform(0.3, 2.0)
        f.detail["down"] = round(down, 2)

        def start() -> None:
            self.cluster.redis.start()
            f.ended_at = time.time()

        self.follow_ups.append(FollowUp(time.time() + down, "start redis", start))

    def _pg_terminate(self, f: Fault, rng: random.Random) -> None:
        f.detail["terminated"] = self.cluster.terminate_backends()

    def _running(self, rng: random.Random, sql: str, k: int) -> list[tuple[Any, ...]]:
        rows = self.cluster.query(sql)
        return rng.sample(rows, min(k, len(rows)))

    def _send(self, f: Fault, sent: list[Message]) -> None:
        for m in sent:
            self.cluster.publish(m)
        f.detail["sent"] = [f"{m.task}{list(m.args)}" for m in sent]

    def _msg_duplicate(self, f: Fault, rng: random.Random) -> None:
        sent: list[Message] = [
            execute(int(i), int(fence))
            for i, fence in self._running(
                rng, "SELECT id, fence FROM tasks WHERE status IN ('planning', 'applying')", 4
            )
        ]
        sent += [
            messages.claim_plan(int(i))
            for (i,) in self._running(
                rng,
                "SELECT id FROM tasks WHERE type = 'plan' AND status IN ('pending', 'planning')",
                3,
            )
        ]
        sent += [
            messages.dispatch(str(name))
            for (name,) in self._running(rng, "SELECT name FROM workspaces", 3)
        ]
        self._send(f, sent)

    def _msg_replay(self, f: Fault, rng: random.Random) -> None:
        sent: list[Message] = [
            execute(int(i), int(fence) - 1)
            for i, fence in self._running(rng, "SELECT id, fence FROM tasks WHERE fence >= 2", 4)
        ]
        done = "('success', 'applied', 'failed', 'cancelled', 'discarded')"
        sent += [
            execute(int(i), int(fence))
            for i, fence in self._running(
                rng, f"SELECT id, fence FROM tasks WHERE fence >= 1 AND status IN {done}", 3
            )
        ]
        sent += [
            messages.claim_plan(int(i))
            for (i,) in self._running(
                rng, f"SELECT id FROM tasks WHERE type = 'plan' AND status IN {done}", 3
            )
        ]
        self._send(f, sent)

    def _msg_drop(self, f: Fault, rng: random.Random) -> None:
        window, most = rng.uniform(2.0, 6.0), rng.randint(2, 8)
        dropped: list[str] = []
        f.detail.update(window=round(window, 2), dropped=dropped)
        url = self.cluster.redis.url

        def consume() -> None:
            client = Redis.from_url(url, socket_timeout=5)
            deadline = time.monotonic() + window
            try:
                while time.monotonic() < deadline and len(dropped) < most:
                    # A blocking pop competes with the workers' own, so some
                    # messages reach us even when workers are idle.
                    got = client.brpop(list(messages.ALL_QUEUES), timeout=0.2)
                    if got is not None:
                        dropped.append(_describe(got[1]))
            except Exception as exc:  # Redis restarted under us: the window ends
                dropped.append(f"(window ended: {type(exc).__name__})")
            finally:
                client.close()
            log.info("fault %d msg_drop: window closed, dropped %s", f.index, dropped)

        thread = threading.Thread(target=consume, name=f"drop-{f.index}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _check_orphans(self, f: Fault, pids: list[int]) -> None:
        """In 3 s, note which of ``pids`` (terraform and its wrapper, not
        provider plugins) still run: they should have died with their
        parent."""
        watched = [p for p in pids if _is_terraform(p)]
        f.detail["terraform"] = len(watched)
        self._orphan_checks.append((time.time() + 3.0, f, watched))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_terraform(pid: int) -> bool:
    cmd = _cmdline(pid)
    return ("terraform" in cmd) and "terraform-provider" not in cmd


def _terraform_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z" and _is_terraform(pid)


def _describe(raw: bytes | str) -> str:
    """``task[args]`` of a kombu message taken off a queue list."""
    try:
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        return f"{envelope['headers']['task']}{body[0]}"
    except (ValueError, KeyError, TypeError):
        return "(undecodable)"
