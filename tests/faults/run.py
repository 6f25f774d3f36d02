"""A fault run: load, faults, heal, check. ``python -m tests.faults.run``.

1. Start the cluster (:mod:`tests.faults.harness`) and its workspaces.
2. Submit the load (:mod:`tests.faults.load`) over the window, confirming
   or discarding plan+applies as a human would, while the injector
   (:mod:`tests.faults.injector`) works through its schedule.
3. Heal: end every fault (restart, continue, Redis back) and note the time.
4. Wait, with a deadline, until every task has finished (decisions are made
   at once from here on, so only runq can be slow).
5. Read ``tasks``, ``task_events``, ``state_versions`` and the invocation
   log; check I1..I5 (:mod:`tests.faults.checker`); measure recovery.

Prints one summary line, writes the details to ``<run dir>/faults.json``,
and exits 1 if any invariant was violated or a terraform outlived its runner.

Recovery of one fault: from its injection until every task that held a phase
(``planning`` or ``applying``) at that moment made its next transition (a
re-claim, a result, a failure). ``longest_recovery`` is the largest over all
faults; tasks untouched by the fault move on by themselves within a phase's
length, so the figure is the fault's cost (e.g. a lost executor: one lease
TTL plus a reconciler interval, plus the re-run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from scheduler.states import TERMINAL
from tests.faults import checker
from tests.faults.harness import FaultCluster
from tests.faults.injector import Fault, Injector, Kind, plan_faults
from tests.faults.load import Human, plan_load
from tests.workers import REPO_ROOT

log = logging.getLogger("faults")

UNFINISHED_SQL = "SELECT count(*) FROM tasks WHERE status NOT IN ({})".format(
    ", ".join(f"'{s}'" for s in sorted(TERMINAL))
)


@dataclass
class Config:
    seed: int
    tasks: int = 1000
    workspaces: int = 30
    #: Seconds over which the tasks are submitted; faults stop at 85% of it.
    window: float = 600.0
    faults: int = 40
    #: Only these kinds of fault (all kinds if None).
    kinds: list[Kind] | None = None
    workers: int = 3
    concurrency: int = 3
    #: I3: every task settled at most this long after healing.
    bound: float = 180.0
    #: Range of each workspace's pause before plan and apply, seconds.
    pause: tuple[float, float] = (0.5, 3.0)
    out: Path = field(default_factory=lambda: REPO_ROOT / ".runq" / "faults")
    keep_database: bool = False


@dataclass
class Records:
    tasks: list[checker.TaskRow]
    events: list[checker.Event]
    states: list[checker.StateVersion]
    invocations: list[checker.Invocation]


@dataclass
class Outcome:
    config: Config
    #: The run's directory: logs, invocation log, terraform sources.
    root: Path
    verdict: checker.Verdict
    faults: list[Fault]
    recoveries: dict[int, checker.Recovery]
    records: Records
    started_at: float
    healed_at: float
    settled_at: float | None
    finished_at: float
    decisions: dict[str, int]

    @property
    def orphans(self) -> int:
        return sum(len(f.detail.get("orphans", [])) for f in self.faults)

    @property
    def ok(self) -> bool:
        return self.verdict.ok and self.orphans == 0

    def longest_recovery(self) -> tuple[float, Fault | None]:
        worst: tuple[float, Fault | None] = (0.0, None)
        for f in self.faults:
            r = self.recoveries.get(f.index)
            if r is not None and r.seconds > worst[0]:
                worst = (r.seconds, f)
        return worst

    def summary(self, details: Path) -> str:
        kinds = Counter(f.kind for f in self.faults if f.injected_at is not None)
        faults = " ".join(f"{k}:{kinds[k]}" for k in Kind if kinds[k])
        violations = " ".join(f"{i}={n}" for i, n in self.verdict.counts.items())
        seconds, fault = self.longest_recovery()
        where = f" ({fault.kind} #{fault.index})" if fault is not None else ""
        return (
            f"faults: seed={self.config.seed} faults={sum(kinds.values())} [{faults}] "
            f"tasks={len(self.records.tasks)} workspaces={self.config.workspaces} "
            f"violations: {violations} orphans={self.orphans} "
            f"longest_recovery={_secs(seconds)}{where} "
            f"settled_after_heal={_secs(self._settle_time())} "
            f"run={_secs(self.finished_at - self.started_at)} details={details}"
        )

    def _settle_time(self) -> float:
        return math.inf if self.settled_at is None else self.settled_at - self.healed_at

    def to_json(self) -> dict[str, Any]:
        statuses = Counter(t.status for t in self.records.tasks)
        commands = Counter(i.command for i in self.records.invocations)
        return {
            "seed": self.config.seed,
            "config": {**asdict(self.config), "out": str(self.config.out)},
            "started_at": _iso(self.started_at),
            "healed_at": _iso(self.healed_at),
            "settled_after_heal": _finite(self._settle_time()),
            "duration": self.finished_at - self.started_at,
            "tasks": len(self.records.tasks),
            "statuses": dict(sorted(statuses.items())),
            "decisions": self.decisions,
            "failed_because": self._failed_because(),
            "terraform_commands": dict(sorted(commands.items())),
            "state_versions": len(self.records.states),
            "violations": self.verdict.counts,
            "violation_details": [asdict(v) for v in self.verdict.violations[:500]],
            "orphans": self.orphans,
            "longest_recovery": _finite(self.longest_recovery()[0]),
            "recovery_by_kind": self._recovery_by_kind(),
            "log_errors": self._log_errors(),
            "reconciler": self._sweeps(),
            "faults": [self._fault_json(f) for f in self.faults],
        }

    def _failed_because(self) -> dict[str, int]:
        """Why tasks failed (their last event's reason, numbers and times
        blanked), most common first: lost applies and the broken workspace
        are expected; anything else is worth a look."""
        last = {e.task_id: e for e in self.records.events}
        reasons = Counter(
            re.sub(r"[0-9][0-9:.T+-]*", "#", re.sub(r"\([^)]*\)", "(...)", last[t.id].reason))[:120]
            for t in self.records.tasks
            if t.status == "failed" and t.id in last
        )
        return dict(reasons.most_common())

    def _recovery_by_kind(self) -> dict[str, dict[str, float | int | None]]:
        """Per kind: how many, and the longest and median recovery."""
        seconds: dict[str, list[float]] = {}
        for f in self.faults:
            r = self.recoveries.get(f.index)
            if r is not None:
                seconds.setdefault(str(f.kind), []).append(r.seconds)
        return {
            kind: {"n": len(s), "max": _finite(max(s)), "median": _finite(statistics.median(s))}
            for kind, s in sorted(seconds.items())
        }

    def _log_errors(self) -> dict[str, int]:
        """ERROR and CRITICAL lines per celery process log: expected after
        faults (a lost connection is logged), worth a look when they are not."""
        return {
            path.stem: sum(
                1
                for line in path.read_text(errors="replace").splitlines()
                if "ERROR/" in line or "CRITICAL/" in line
            )
            for path in sorted((self.root / "logs").glob("*.log"))
        }

    def _sweeps(self) -> dict[str, float | int]:
        """How regularly the reconciler ran, from beat's log (beat sweeps on
        a thread of its own and logs one line a sweep)."""
        stamp = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
        done: list[float] = []
        for path in (self.root / "logs").glob("beat*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if "reconciler: swept in" in line and (m := stamp.match(line)):
                    at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                    done.append(at.timestamp())
        done.sort()
        gaps = [b - a for a, b in itertools.pairwise(done)]
        return {"sweeps": len(done), "longest_gap": max(gaps, default=0.0)}

    def _fault_json(self, f: Fault) -> dict[str, Any]:
        r = self.recoveries.get(f.index)
        return {
            "index": f.index,
            "kind": str(f.kind),
            "planned": f.planned,
            "injected_at": _iso(f.injected_at),
            "at": None if f.injected_at is None else round(f.injected_at - self.started_at, 2),
            "ended_at": _iso(f.ended_at),
            "target": f.target,
            "skipped": f.skipped,
            "detail": f.detail,
            "recovery": None
            if r is None
            else {
                "seconds": _finite(r.seconds),
                "affected": list(r.affected),
                "slowest": r.slowest,
            },
        }


def _finite(s: float) -> float | None:
    """JSON has no infinity: None stands for "never"."""
    return s if math.isfinite(s) else None


def _secs(s: float) -> str:
    return f"{s:.1f}s" if math.isfinite(s) else "never"


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t).astimezone().isoformat()


# ---------------------------------------------------------------- the run


def run(config: Config) -> Outcome:
    rng = random.Random(config.seed)
    load = plan_load(
        rng,
        tasks=config.tasks,
        workspaces=config.workspaces,
        window=config.window,
        pause=config.pause,
    )
    # Faults begin once the load is under way and stop before it ends, so
    # the last submissions meet a healed cluster.
    schedule = plan_faults(
        config.seed, config.faults, 0.1 * config.window, 0.85 * config.window, config.kinds
    )
    root = config.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{config.seed}"
    cluster = FaultCluster(
        root,
        workers=config.workers,
        concurrency=config.concurrency,
        keep_database=config.keep_database,
    )
    human = Human(random.Random(f"{config.seed}/human"))
    with cluster.running():
        log.info("cluster up in %s: database %s", root, cluster.database)
        for spec in load.workspaces:
            cluster.workspace(
                spec.name,
                spec.config,
                auto_apply=spec.auto_apply,
                plan_seconds=spec.plan_seconds,
                apply_seconds=spec.apply_seconds,
            )
        injector = Injector(cluster, config.seed, schedule)
        started = time.time()
        todo = list(load.submissions)
        next_poll = 0.0
        while todo or any(f.injected_at is None and f.skipped is None for f in schedule):
            elapsed = time.time() - started
            while todo and todo[0].at <= elapsed:
                s = todo.pop(0)
                cluster.submit(s.workspace, s.type, message=f"load +{s.at:.1f}s")
            injector.tick(elapsed)
            if time.time() >= next_poll:
                _human(cluster, human, hurry=False)
                next_poll = time.time() + 0.5
            time.sleep(0.05)
        log.info("load submitted; healing")
        healed = injector.heal()
        log.info("healed %.1fs after the start; waiting for every task to finish", healed - started)
        settled = _drain(cluster, human, healed + config.bound)
        records = collect(cluster)
    finished = time.time()
    verdict = checker.check(
        records.tasks,
        records.events,
        records.invocations,
        records.states,
        healed_at=healed,
        bound=config.bound,
    )
    recoveries = {
        f.index: checker.recovery(records.events, f.injected_at)
        for f in schedule
        if f.injected_at is not None
    }
    return Outcome(
        config,
        root,
        verdict,
        schedule,
        recoveries,
        records,
        started,
        healed,
        settled,
        finished,
        {"confirmed": human.confirmed, "discarded": human.discarded},
    )


def _human(cluster: FaultCluster, human: Human, *, hurry: bool) -> None:
    now = time.time()
    for (task_id,) in cluster.query("SELECT id FROM tasks WHERE status = 'apply_pending'"):
        human.saw(task_id, now)
    for task_id, confirm in human.due(now, hurry=hurry):
        if cluster.decide(task_id, confirm):
            if confirm:
                human.confirmed += 1
            else:
                human.discarded += 1


def _drain(cluster: FaultCluster, human: Human, deadline: float) -> float | None:
    """Wait until no task is left unfinished; when that happened, or None
    if the deadline passed first."""
    while time.time() < deadline:
        _human(cluster, human, hurry=True)
        [(left,)] = cluster.query(UNFINISHED_SQL)
        if left == 0:
            return time.time()
        time.sleep(0.5)
    return None


def collect(cluster: FaultCluster) -> Records:
    tasks = [
        checker.TaskRow(int(i), int(ws), str(ty), str(st), int(seq), int(fence))
        for i, ws, ty, st, seq, fence in cluster.query(
            "SELECT id, workspace_id, type, status, queue_seq, fence FROM tasks ORDER BY id"
        )
    ]
    events = [
        checker.Event(int(i), int(t), fr, str(to), int(fence), at.timestamp(), str(actor), rs or "")
        for i, t, fr, to, fence, at, actor, rs in cluster.query(
            "SELECT id, task_id, from_status, to_status, fence, at, actor, reason "
            "FROM task_events ORDER BY id"
        )
    ]
    states: list[checker.StateVersion] = []
    [(has_states,)] = cluster.query("SELECT to_regclass('state_versions') IS NOT NULL")
    if has_states:
        states = [
            checker.StateVersion(int(i), int(ws), t, fence, int(serial), at.timestamp())
            for i, ws, t, fence, serial, at in cluster.query(
                "SELECT id, workspace_id, task_id, fence, serial, created_at "
                "FROM state_versions ORDER BY id"
            )
        ]
    return Records(tasks, events, states, checker.read_invocations(cluster.invocation_log))


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults.run", description=__doc__)
    seed_env = os.environ.get("FAULTS_SEED")
    p.add_argument("--seed", type=int, default=int(seed_env) if seed_env else None)
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--workspaces", type=int, default=30)
    p.add_argument("--window", type=float, default=600.0, help="seconds to submit over")
    p.add_argument("--faults", type=int, default=40)
    p.add_argument(
        "--kinds",
        type=lambda v: [Kind(k) for k in v.split(",")],
        help=f"only these faults, comma-separated: {','.join(Kind)}",
    )
    p.add_argument(
        "--pause", type=float, nargs=2, default=(0.5, 3.0), help="range of phase pauses, s"
    )
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--bound", type=float, default=180.0, help="I3 bound after healing, s")
    p.add_argument("--out", type=Path, default=REPO_ROOT / ".runq" / "faults")
    p.add_argument("--keep-database", action="store_true")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    # The harness's own submits and confirms: one line each is noise here.
    logging.getLogger("scheduler").setLevel(logging.WARNING)
    print(f"faults: seed {seed} (FAULTS_SEED={seed} replays this schedule)", flush=True)
    config = Config(
        seed=seed,
        tasks=args.tasks,
        workspaces=args.workspaces,
        window=args.window,
        faults=args.faults,
        kinds=args.kinds,
        pause=tuple(args.pause),
        workers=args.workers,
        concurrency=args.concurrency,
        bound=args.bound,
        out=args.out,
        keep_database=args.keep_database,
    )
    outcome = run(config)
    print(outcome.summary(report(outcome)), flush=True)
    return 0 if outcome.ok else 1


def report(outcome: Outcome) -> Path:
    """Write the details next to the run's logs, the summary line among
    them; their path."""
    path = outcome.root / "faults.json"
    details = {"summary": outcome.summary(path), **outcome.to_json()}
    path.write_text(json.dumps(details, indent=2, default=str))
    return path


if __name__ == "__main__":
    sys.exit(main())
