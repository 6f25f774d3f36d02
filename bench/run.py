"""runq's scheduler overhead against bare Celery and a minimal claim loop,
on this machine (issue 7): ``python -m bench.run [--quick]``.

Real ``celery worker`` processes (:class:`tests.workers.WorkerPool`) on a
private ``redis-server`` and fresh PostgreSQL databases, phases run by the
fake executor (``RUNQ_EXECUTOR=fake``, 0 s unless said), so what is
measured is the scheduler, not Terraform. Systems: runq ``new`` (default
``RUNQ_DISPATCH_MODE``), ``legacy``, and bare Celery (:mod:`bench.bare`),
with the same worker flags, in one invocation, the order rotating from one
repetition to the next. Figures, by module:

* :mod:`bench.figures.plans`: plan start latency p50/p99 and plan
  throughput, per pool shape (processes 1, 2, 4);
* :mod:`bench.figures.serial`: serialized plan+apply claims/s over 100
  workspaces (against :mod:`bench.floor`), and the hand-off gap, with one
  workspace and with 100 busy ones;
* :mod:`bench.figures.inflight`: plan start with slow plan+applies in flight;
* :mod:`bench.figures.scale`: one dispatch / plan claim at 100k queued vs 1k;
* :mod:`bench.figures.reconcile`: one reconciler sweep over a 50k backlog.

Prints the table (:mod:`bench.report`) and writes ``bench/results/<UTC
timestamp>.json`` (raw samples, args, host, seconds), ``.md`` and ``.png``,
copied to ``latest.md`` / ``latest.png``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import floor, report
from bench.figures import inflight, plans, reconcile, scale, serial
from bench.harness import RUNQ, SYSTEMS, Bench, Shape, host_info, log, pg_url, rotate, timed
from scheduler.states import DispatchMode

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("plans", "shapes", "gap", "serial", "inflight", "scale", "reconcile")
QUICK_GROUPS = ("plans", "gap", "reconcile")


def shape_of(text: str) -> Shape:
    w, c = text.split("x")
    return Shape(int(w), int(c))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the make bench-quick subset")
    p.add_argument("--only", help=f"comma-separated figure groups: {', '.join(GROUPS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shape", default="2x2", help="main pool: workers x processes each")
    p.add_argument("--shapes", default="1x1,1x2", help="more throughput pool shapes")
    p.add_argument("--samples", type=int, help="latency samples per rep (100; quick 30)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--plans", type=int, help="plans in the main throughput run (1000; quick 300)")
    p.add_argument("--shape-plans", type=int, default=250, help="plans at the other shapes")
    p.add_argument("--workspaces", type=int, default=10, help="throughput plans spread")
    p.add_argument("--serial-workspaces", type=int, default=100)
    p.add_argument("--serial-tasks", type=int, default=5, help="plan+applies per workspace")
    p.add_argument("--gap-tasks", type=int, help="queued in the one-workspace gap (50; quick 20)")
    p.add_argument("--inflight-shape", default="2x6")
    p.add_argument("--inflight-workspaces", type=int, default=10)
    p.add_argument("--inflight-cycles", type=int, default=2)
    p.add_argument("--inflight-apply-seconds", type=float, default=4.0)
    p.add_argument("--scale-small", default="100x10", help="workspaces x tasks")
    p.add_argument("--scale-large", default="10000x10", help="workspaces x tasks")
    p.add_argument("--scale-samples", type=int, default=30)
    p.add_argument("--backlog", type=int, help="reconciler backlog (50000; quick 5000)")
    args = p.parse_args(argv)
    quick = args.quick
    args.samples = args.samples or (30 if quick else 100)
    args.plans = args.plans or (300 if quick else 1000)
    args.gap_tasks = args.gap_tasks or (20 if quick else 50)
    args.backlog = args.backlog or (5000 if quick else 50000)
    args.groups = args.only.split(",") if args.only else list(QUICK_GROUPS if quick else GROUPS)
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        p.error(f"unknown figure groups: {', '.join(sorted(unknown))}")
    args.plans_at = {args.shape: args.plans}
    if "shapes" in args.groups:
        args.plans_at |= {s: args.shape_plans for s in args.shapes.split(",")}
    return args


def main_pool(bench: Bench, raw: dict[str, Any], rep: int) -> None:
    """Everything measured on the main pool shape, system by system."""
    args, groups = bench.args, bench.args.groups
    shape = shape_of(args.shape)
    for system in rotate(SYSTEMS, rep):
        if system == "celery" and "plans" not in groups:
            continue
        with bench.workers(system, shape):
            if system == "celery":
                client = plans.BareClient(bench)
                try:
                    raw["latency"][system].append(client.latency(args.samples, args.warmup))
                    tput = client.throughput(args.plans)
                    raw["floor_plan"]["latency"].append(
                        client.floor_latency(args.samples, args.warmup)
                    )
                    floor_tput = client.floor_throughput(args.plans)
                    raw["floor_plan"]["throughput"].append(floor_tput)
                finally:
                    client.close()
                raw["throughput"][shape.label][system].append(tput)
                log(f"rep {rep + 1} {system:>6} {shape.label}: {tput:.0f}/s")
                log(f"rep {rep + 1}  floor {shape.label}: {floor_tput:.0f} plans/s")
                continue
            with bench.runtime(DispatchMode(system)) as rt:
                if "plans" in groups:
                    lat = plans.runq_latency(bench, rt, args.samples, args.warmup)
                    raw["latency"][system].append(lat)
                    tput = plans.runq_throughput(bench, rt, args.plans, args.workspaces)
                    raw["throughput"][shape.label][system].append(tput)
                    log(f"rep {rep + 1} {system:>6} {shape.label}: {tput:.0f}/s")
                if "gap" in groups:
                    raw["gap1"][system].append(serial.run(bench, rt, 1, args.gap_tasks))
                if "serial" in groups:
                    got = serial.run(bench, rt, args.serial_workspaces, args.serial_tasks)
                    raw["serial"][system].append(got)
                    log(f"rep {rep + 1} {system:>6} serial: {got['claims_per_s']:.0f} claims/s")


def other_shapes(bench: Bench, raw: dict[str, Any], rep: int) -> None:
    args = bench.args
    for shape in map(shape_of, args.shapes.split(",")):
        for system in rotate(SYSTEMS, rep):
            with bench.workers(system, shape):
                if system == "celery":
                    client = plans.BareClient(bench)
                    try:
                        tput = client.throughput(args.shape_plans)
                    finally:
                        client.close()
                else:
                    with bench.runtime(DispatchMode(system)) as rt:
                        tput = plans.runq_throughput(bench, rt, args.shape_plans, args.workspaces)
            raw["throughput"][shape.label][system].append(tput)
            log(f"rep {rep + 1} {system:>6} {shape.label}: {tput:.0f}/s")


def in_flight(bench: Bench, raw: dict[str, Any], rep: int) -> None:
    args = bench.args
    extra = {"RUNQ_FAKE_APPLY_SECONDS": str(args.inflight_apply_seconds)}
    for system in rotate(RUNQ, rep):
        with (
            bench.workers(system, shape_of(args.inflight_shape), extra),
            bench.runtime(DispatchMode(system)) as rt,
        ):
            got = inflight.run(
                bench,
                rt,
                args.inflight_workspaces,
                args.inflight_cycles,
                args.inflight_apply_seconds,
            )
        raw["inflight"][system].append(got)


def measure(bench: Bench) -> tuple[dict[str, Any], dict[str, float]]:
    args = bench.args
    raw: dict[str, Any] = {
        "latency": {s: [] for s in SYSTEMS},
        "throughput": {shape: {s: [] for s in SYSTEMS} for shape in args.plans_at},
        "gap1": {s: [] for s in RUNQ},
        "serial": {s: [] for s in RUNQ},
        "floor": [],
        "floor_plan": {"latency": [], "throughput": []},
        "inflight": {s: [] for s in RUNQ},
    }
    spent: dict[str, float] = {}

    def clock(name: str, began: float) -> None:
        spent[name] = spent.get(name, 0.0) + time.monotonic() - began

    for rep in range(args.reps):
        began = time.monotonic()
        if {"plans", "gap", "serial"} & set(args.groups):
            main_pool(bench, raw, rep)
        clock("main pool", began)
        if "serial" in args.groups:
            began = time.monotonic()
            processes = shape_of(args.shape).processes
            per_s = floor.run(
                pg_url(bench.database_url),
                bench.redis.url,
                processes,
                args.serial_workspaces,
                2 * args.serial_tasks,
            )
            raw["floor"].append(per_s)
            log(f"rep {rep + 1}  floor: {per_s:.0f} claims/s")
            clock("floor", began)
        if "shapes" in args.groups:
            began = time.monotonic()
            other_shapes(bench, raw, rep)
            clock("shapes", began)
        if "inflight" in args.groups:
            began = time.monotonic()
            in_flight(bench, raw, rep)
            clock("inflight", began)
    if "scale" in args.groups:
        began = time.monotonic()
        sizes = {
            label: (int(w), int(k))
            for label, (w, k) in (
                ("small", args.scale_small.split("x")),
                ("large", args.scale_large.split("x")),
            )
        }
        raw["scale"] = scale.run(bench, sizes, args.reps, args.scale_samples)
        clock("scale", began)
    if "reconcile" in args.groups:
        began = time.monotonic()
        raw["reconcile"] = reconcile.run(bench, args.backlog, args.reps)
        clock("reconcile", began)
    return raw, spent


def describe(args: argparse.Namespace, host: dict[str, Any], seconds: float) -> str:
    """The table's footnote: how it was measured, on what, in how long."""
    parts = [
        f"Medians of {args.reps} repetitions (min-max); ratios per repetition. Main pool "
        f"{args.shape} (workers x processes each), the same worker flags for every system; "
        "fake executor with 0 s phases."
    ]
    if "plans" in args.groups:
        parts.append(f"{args.samples} latency samples per repetition, one plan at a time.")
    if "gap" in args.groups:
        parts.append(f"One-workspace gap: {args.gap_tasks} queued auto-apply plan+applies.")
    if "serial" in args.groups:
        parts.append(
            f"Claims/s and busy gap: {args.serial_workspaces} workspaces x "
            f"{args.serial_tasks} plan+applies; floor loop with as many processes."
        )
    if "inflight" in args.groups:
        parts.append(
            f"In flight: {args.inflight_workspaces} applies of {args.inflight_apply_seconds:g} s "
            f"on {args.inflight_shape} workers, {args.inflight_cycles} bursts per repetition."
        )
    if {"scale", "reconcile"} & set(args.groups):
        parts.append("Scale and reconciler backlogs are bulk-loaded, then ANALYZEd.")
    parts.append(
        f"Host: {host['cpus']} CPUs, Python {host['python']}, PostgreSQL {host['postgresql']}, "
        f"Redis {host['redis']}; load average (1 min) {host['loadavg_at_start'][0]:.2f} at "
        f"start, {host['loadavg_at_end'][0]:.2f} at end (other work on the machine shows "
        f"here). Took {seconds:.0f} s ({', '.join(args.groups)})."
    )
    return " ".join(parts)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    # Clean up on SIGTERM as on Ctrl-C; and take SIGINT even where the shell
    # that started us ignores it (a background job of a script).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runq-bench-")))
        bench = Bench.open(args, stack, root)
        host = host_info(bench.redis.url)
        raw, spent = measure(bench)
        host["loadavg_at_end"] = os.getloadavg()
        log("cleaning up: workers are stopped; dropping databases, stopping redis")
    seconds = timed(started)
    raw["args"] = {k: v for k, v in vars(args).items()}
    summary, rows = report.summarize(raw)
    note = describe(args, host, seconds)
    text = report.table(summary, rows, note)
    print(text)
    record = {
        "at": stamp,
        "host": host,
        "args": raw["args"],
        "seconds": seconds,
        "seconds_by_part": {k: round(v, 1) for k, v in spent.items()},
        "summary": summary,
        "raw": raw,
        "table": text,
    }
    # latest.md/.png (what the README shows) come from full runs only.
    latest = "latest-quick" if args.quick or args.only else "latest"
    for path in report.write(RESULTS, stamp, record, text, latest):
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    print(f"total {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
