"""runq's scheduler overhead against bare Celery, on this machine (issue 7).

Real ``celery worker`` processes (:class:`tests.workers.WorkerPool`) on a
private ``redis-server`` and a fresh PostgreSQL database, running phases with
the fake executor (``RUNQ_EXECUTOR=fake``, phases of 0 s), so what is measured
is the scheduler, not Terraform. Three systems, each with the same worker
flags: runq's default mode (``new``), ``RUNQ_DISPATCH_MODE=legacy``, and bare
Celery (:mod:`bench.bare`). Each repetition starts every system's workers in
turn (the order rotates from one repetition to the next) and measures:

* plan start latency: submit -> the executor's Started (``tasks.
  phase_started_at``), one plan at a time; bare Celery: ``apply_async`` -> the
  no-op task's start;
* throughput: N plans submitted (round robin over W workspaces) -> all
  finished (``tasks.finished_at``); bare Celery: N no-ops -> the last start.

Prints a markdown table (medians over repetitions, with min-max, and the
ratios to bare Celery) and writes ``bench/results/<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis import Redis
from sqlalchemy import func, select

from celery_app.runtime import build_runtime, private_app
from scheduler import tasks, workspaces
from scheduler.api import wait
from scheduler.models import Task
from scheduler.settings import ExecutorKind, Settings
from scheduler.states import DispatchMode, TaskStatus, TaskType
from tests.conftest import create_database, drop_database
from tests.workers import RedisServer, WorkerPool

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("new", "legacy", "celery")


@dataclass
class BareWorkerPool(WorkerPool):
    """Workers of :mod:`bench.bare`, with every flag runq's workers get."""

    def argv(self, name: str) -> list[str]:
        argv = super().argv(name)
        argv[argv.index("celery_app")] = "bench.bare"
        return argv


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    redis: RedisServer
    database_url: str

    def settings(self, mode: DispatchMode) -> Settings:
        return Settings(
            database_url=self.database_url,
            redis_url=self.redis.url,
            data_dir=self.root / "client",
            dispatch_mode=mode,
            executor=ExecutorKind.FAKE,
        )

    def env(self, mode: DispatchMode) -> dict[str, str]:
        return {
            "RUNQ_DATABASE_URL": self.database_url,
            "RUNQ_REDIS_URL": self.redis.url,
            "RUNQ_DATA_DIR": str(self.root / "workers"),
            "RUNQ_DISPATCH_MODE": str(mode),
            "RUNQ_EXECUTOR": "fake",
            "RUNQ_FAKE_PLAN_SECONDS": "0",
            "RUNQ_FAKE_APPLY_SECONDS": "0",
        }

    @contextmanager
    def workers(self, system: str) -> Iterator[None]:
        flush = Redis.from_url(self.redis.url)
        flush.flushdb()
        flush.close()
        mode = DispatchMode.NEW if system == "celery" else DispatchMode(system)
        kind = BareWorkerPool if system == "celery" else WorkerPool
        pool = kind(
            self.args.workers,
            self.env(mode),
            self.root / "logs" / system,
            concurrency=self.args.concurrency,
        )
        pool.start()
        try:
            yield
        finally:
            pool.stop()

    def run_runq(self, mode: DispatchMode, rep: int) -> dict[str, Any]:
        settings = self.settings(mode)
        app = private_app(settings, f"bench-{mode}")
        rt = build_runtime(app, settings, actor="bench")
        src = self.root / "src"
        src.mkdir(exist_ok=True)
        names = [f"{mode}-{rep}-{i}" for i in range(self.args.workspaces)]
        try:
            for name in names:
                workspaces.create(rt, name, source_dir=str(src))

            def one_plan() -> float:
                began = time.time()
                task = tasks.submit(rt, names[0], TaskType.PLAN)
                [done] = wait(rt, [task.id], timeout=60, poll=0.01)
                assert done.status is TaskStatus.SUCCESS, done
                assert done.phase_started_at is not None
                return done.phase_started_at.timestamp() - began

            latencies = self.latencies(one_plan)
            began = time.time()
            ids = [
                tasks.submit(rt, names[i % len(names)], TaskType.PLAN).id
                for i in range(self.args.plans)
            ]
            views = wait(rt, ids, timeout=600, poll=0.1)
            assert all(v.status is TaskStatus.SUCCESS for v in views)
            with rt.sessions() as s:
                last = s.scalar(select(func.max(Task.finished_at)).where(Task.id.in_(ids)))
            assert last is not None
            return {"latency_ms": latencies, "per_s": self.args.plans / (last.timestamp() - began)}
        finally:
            rt.close()
            app.close()

    def run_celery(self) -> dict[str, Any]:
        from bench.bare import STARTED

        settings = self.settings(DispatchMode.NEW)
        app = private_app(settings, "bench-client")
        redis = Redis.from_url(self.redis.url)
        try:

            def one_task() -> float:
                redis.delete(STARTED)
                began = time.time()
                app.send_task("bench.noop")
                while not (got := redis.lrange(STARTED, 0, -1)):
                    time.sleep(0.002)
                return float(got[0]) - began

            latencies = self.latencies(one_task)
            redis.delete(STARTED)
            began = time.time()
            for _ in range(self.args.plans):
                app.send_task("bench.noop")
            deadline = time.monotonic() + 600
            while redis.llen(STARTED) < self.args.plans:
                assert time.monotonic() < deadline, "bare Celery did not drain"
                time.sleep(0.05)
            last = max(float(t) for t in redis.lrange(STARTED, 0, -1))
            return {"latency_ms": latencies, "per_s": self.args.plans / (last - began)}
        finally:
            redis.close()
            app.close()

    def latencies(self, one: Callable[[], float]) -> list[float]:
        for _ in range(self.args.warmup):
            one()
        return [1000 * one() for _ in range(self.args.samples)]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Per system: each repetition's p50 latency (ms) and throughput (per s)."""
    return {
        system: {
            "latency_p50_ms": [statistics.median(r["latency_ms"]) for r in reps],
            "throughput_per_s": [r["per_s"] for r in reps],
        }
        for system, reps in runs.items()
    }


def table(summary: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    def cell(values: list[float], fmt: str, unit: str = "") -> str:
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{mid:{fmt}}{unit} ({low:{fmt}}-{high:{fmt}})"

    def ratios(key: str, system: str) -> str:
        mine, base = summary[system][key], summary["celery"][key]
        return cell([a / b for a, b in zip(mine, base, strict=True)], ".2f", "x")

    rows = [
        ("plan start latency p50, ms (submit → executor started)", "latency_p50_ms", ".1f"),
        (f"throughput, per s ({args.plans} plans: submit → all done)", "throughput_per_s", ".0f"),
    ]
    lines = [
        "| figure | runq (new) | runq (legacy) | bare Celery | new ÷ Celery | legacy ÷ Celery |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, fmt in rows:
        values = [cell(summary[s][key], fmt) for s in SYSTEMS]
        lines.append(
            f"| {label} | {' | '.join(values)} | {ratios(key, 'new')} | {ratios(key, 'legacy')} |"
        )
    lines.append(
        f"\nMedians of {args.reps} repetitions (min-max); ratios per repetition. "
        f"{args.workers} workers x {args.concurrency} processes, fake executor (0 s phases), "
        f"{args.samples} latency samples per repetition, throughput plans over "
        f"{args.workspaces} workspaces."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--samples", type=int, default=30, help="latency samples per repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--plans", type=int, default=1000, help="plans in the throughput run")
    parser.add_argument("--workspaces", type=int, default=10)
    args = parser.parse_args(argv)

    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runq-bench-")))
        redis = RedisServer(root)
        redis.start()
        stack.callback(redis.stop)
        name, url = create_database("runq_bench")
        stack.callback(drop_database, name)
        bench = Bench(args, root, redis, url)
        for rep in range(args.reps):
            order = SYSTEMS[rep % 3 :] + SYSTEMS[: rep % 3]  # alternate who goes first
            for system in order:
                with bench.workers(system):
                    if system == "celery":
                        result = bench.run_celery()
                    else:
                        result = bench.run_runq(DispatchMode(system), rep)
                runs[system].append(result)
                print(
                    f"rep {rep + 1} {system:>6}: p50 {statistics.median(result['latency_ms']):.1f}"
                    f" ms, {result['per_s']:.0f}/s",
                    file=sys.stderr,
                    flush=True,
                )
    summary = summarize(runs)
    text = table(summary, args)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"{stamp}.json"
    record = {
        "at": stamp,
        "host": {"cpus": _cpus(), "python": platform.python_version()},
        "args": vars(args),
        "seconds": round(time.monotonic() - started, 1),
        "summary": summary,
        "runs": runs,
        "table": text,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
