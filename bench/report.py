"""Turn the raw samples of a run into issue 7's table, a JSON record and a
chart.

Every figure is first reduced to one value per repetition and system
(:func:`summarize`); a table cell is the median over repetitions with the
min-max, and a ratio is taken per repetition (runq ÷ baseline) before its
median. "met?" applies the issue's goal to runq ``new``'s median.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import percentile

Summary = dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    fmt: str
    goal: str = ""
    #: Applied to new's median ratio (or to its median value, ``on_value``).
    check: Callable[[float], bool] | None = None
    on_value: bool = False


def _p(q: float) -> Callable[[list[float]], float]:
    return lambda xs: percentile(xs, q)


def summarize(raw: dict[str, Any]) -> tuple[Summary, list[Row]]:
    s: Summary = {}
    rows: list[Row] = []

    def put(key: str, **cols: list[float]) -> None:
        kept = {k: v for k, v in cols.items() if v}
        if kept:
            s[key] = kept

    if lat := raw.get("latency"):
        for q in (50, 99):
            f = _p(q)
            put(f"lat_p{q}", **{k: [f(x) for x in lat[c]] for k, c in _cols(lat)})
            rows.append(
                Row(
                    f"lat_p{q}",
                    f"plan start latency p{q}, ms (submit → executor started; Celery: "
                    "apply_async → task start)",
                    ".1f",
                    "≤ 2x Celery",
                    lambda r: r <= 2,
                )
            )
    for shape, by in (raw.get("throughput") or {}).items():
        put(f"tput_{shape}", **{k: list(by[c]) for k, c in _cols(by)})
        procs = eval_procs(shape)
        rows.append(
            Row(
                f"tput_{shape}",
                f"plan throughput, per s ({raw['args']['plans_at'][shape]} plans, "
                f"{shape} = {procs} worker process{'es' if procs > 1 else ''}; "
                "Celery: no-op drain)",
                ".0f",
                "≥ 0.6x Celery",
                lambda r: r >= 0.6,
            )
        )
    _floor_rows(raw, put, rows)
    if ser := raw.get("serial"):
        put(
            "claims",
            new=[r["claims_per_s"] for r in ser["new"]],
            legacy=[r["claims_per_s"] for r in ser["legacy"]],
            base=list(raw.get("floor") or []),
        )
        rows.append(
            Row(
                "claims",
                f"serialized plan+apply dispatch, claims/s ({raw['args']['serial_workspaces']} "
                "workspaces; floor: minimal lock/select/update/commit/publish loop)",
                ".0f",
                "≥ 0.7x floor",
                lambda r: r >= 0.7,
            )
        )
    for key, what, goals in (
        ("gap1", "one workspace", {50: 5.0, 99: 20.0}),
        ("serial", f"{raw['args'].get('serial_workspaces')} busy workspaces", {50: 20.0}),
    ):
        if data := raw.get(key):
            for q in (50, 99):
                f = _p(q)
                put(
                    f"{key}_gap_p{q}",
                    new=[f(r["gaps_ms"]) for r in data["new"]],
                    legacy=[f(r["gaps_ms"]) for r in data["legacy"]],
                )
                goal = goals.get(q)
                check = _at_most(goal) if goal is not None else None
                rows.append(
                    Row(
                        f"{key}_gap_p{q}",
                        f"hand-off gap p{q}, ms (applied → next plan+apply planning; {what})",
                        ".1f",
                        f"≤ {goal:g} ms" if goal else "",
                        check,
                        on_value=True,
                    )
                )
    if inf := raw.get("inflight"):
        med = statistics.median
        put(
            "inflight",
            new=[med(r["with_ms"]) for r in inf["new"]],
            legacy=[med(r["with_ms"]) for r in inf["legacy"]],
            base=[med(r["without_ms"]) for r in inf["new"]],
            base_legacy=[med(r["without_ms"]) for r in inf["legacy"]],
        )
        rows.append(
            Row(
                "inflight",
                "plan start p50, ms, with a slow plan+apply in flight in the plan's workspace "
                "(baseline: the same applies in flight elsewhere)",
                ".1f",
                "≤ 1.2x without",
                lambda r: r <= 1.2,
            )
        )
    if sc := raw.get("scale"):
        small, large = sc["small"], sc["large"]
        for op, name in (("claim_ms", "claim_plan"), ("dispatch_ms", "dispatch")):

            def med_of(reps: list[dict[str, Any]], op: str = op) -> list[float]:
                return [statistics.median(r[op]) for r in reps]

            put(
                f"scale_{op}",
                new=med_of(large["new"]),
                legacy=med_of(large["legacy"]),
                base=med_of(small["new"]),
                base_legacy=med_of(small["legacy"]),
            )
            rows.append(
                Row(
                    f"scale_{op}",
                    f"one {name}, ms, at {large['queued']:,} queued tasks "
                    f"(baseline: at {small['queued']:,})",
                    ".2f",
                    "≤ 1.25x at 1k",
                    lambda r: r <= 1.25,
                )
            )
    if rec := raw.get("reconcile"):
        put(
            "rec_messages",
            new=[r["messages"] for r in rec["new"]],
            legacy=[r["messages"] for r in rec["legacy"]],
            base=[float(rec["owed"])] * len(rec["new"]),
        )
        rows.append(
            Row(
                "rec_messages",
                f"reconciler sweep, messages published ({rec['backlog']:,}-task backlog older "
                f"than RUNQ_RESEND_AFTER; baseline: the {rec['owed']} genuinely owed)",
                ".0f",
                "O(owed) (≤ 2x owed)",
                lambda r: r <= 2,
            )
        )
        put(
            "rec_seconds",
            new=[r["seconds"] for r in rec["new"]],
            legacy=[r["seconds"] for r in rec["legacy"]],
        )
        rows.append(Row("rec_seconds", "reconciler sweep, seconds (same backlog)", ".2f"))
    return s, rows


Put = Callable[..., None]


def _floor_rows(raw: dict[str, Any], put: Put, rows: list[Row]) -> None:
    """runq against :mod:`bench.floor_plan`, and that floor against Celery:
    what durability plus one hop costs, and what runq adds to it."""
    lat = raw.get("latency")
    fp = raw.get("floor_plan") or {}
    if lat and fp.get("latency"):
        p50 = _p(50)
        floor_p50 = [p50(x) for x in fp["latency"]]
        put(
            "lat_floor",
            new=[p50(x) for x in lat["new"]],
            legacy=[p50(x) for x in lat["legacy"]],
            base=floor_p50,
        )
        rows.append(
            Row(
                "lat_floor",
                "plan start latency p50, ms, against the durable floor (bench/floor_plan.py: "
                "INSERT+COMMIT, one hop, claim UPDATE+COMMIT in raw psycopg)",
                ".1f",
            )
        )
        put("floor_lat", new=floor_p50, base=[p50(x) for x in lat["celery"]])
        rows.append(
            Row(
                "floor_lat",
                "the durable floor itself (first column; not runq): plan start p50, ms, "
                "against bare Celery",
                ".1f",
            )
        )
    if fp.get("throughput"):
        main = raw["args"]["shape"]
        by = raw["throughput"][main]
        put(
            "tput_floor",
            new=list(by["new"]),
            legacy=list(by["legacy"]),
            base=list(fp["throughput"]),
        )
        rows.append(
            Row(
                "tput_floor",
                f"plan throughput, per s ({main}), against the durable floor (claim and "
                "finish, each UPDATE+COMMIT)",
                ".0f",
            )
        )
        put("floor_tput", new=list(fp["throughput"]), base=list(by["celery"]))
        rows.append(
            Row(
                "floor_tput",
                f"the durable floor itself (first column; not runq): plan throughput, per s "
                f"({main}), against bare Celery",
                ".0f",
            )
        )


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda v: v <= limit


def eval_procs(shape: str) -> int:
    w, c = shape.split("x")
    return int(w) * int(c)


def _cols(by: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (k, c) for k, c in (("new", "new"), ("legacy", "legacy"), ("base", "celery")) if c in by
    ]


def cell(values: Sequence[float], fmt: str, unit: str = "") -> str:
    if not values:
        return "—"
    low, mid, high = min(values), statistics.median(values), max(values)
    if len(values) == 1:
        return f"{mid:{fmt}}{unit}"
    return f"{mid:{fmt}}{unit} ({low:{fmt}}-{high:{fmt}})"


def ratios(col: dict[str, list[float]], system: str) -> list[float]:
    base = col.get("base_legacy" if system == "legacy" else "base") or col.get("base") or []
    mine = col.get(system) or []
    return [a / b for a, b in zip(mine, base, strict=False) if b]


def table(summary: Summary, rows: list[Row], note: str) -> str:
    lines = [
        "| figure | runq new | runq legacy | bare Celery / floor / baseline | ratio new; legacy "
        "| goal | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        col = summary.get(row.key)
        if not col:
            continue
        base = cell(col.get("base", []), row.fmt)
        if "base_legacy" in col:
            base = f"new: {base}; legacy: {cell(col['base_legacy'], row.fmt)}"
        rn, rl = ratios(col, "new"), ratios(col, "legacy")
        ratio = f"{cell(rn, '.2f', 'x')}; {cell(rl, '.2f', 'x')}" if rn else "—"
        met = "—"
        if row.check is not None and col.get("new"):
            probe = rn if not row.on_value else col["new"]
            if probe:
                met = "yes" if row.check(statistics.median(probe)) else "**no**"
        lines.append(
            f"| {row.label} | {cell(col.get('new', []), row.fmt)} | "
            f"{cell(col.get('legacy', []), row.fmt)} | {base} | {ratio} | {row.goal or '—'} "
            f"| {met} |"
        )
    return "\n".join(lines) + "\n\n" + note


def write(
    results: Path, stamp: str, record: dict[str, Any], text: str, latest: str = "latest"
) -> list[Path]:
    """``<stamp>.json/.md/.png``, the last two copied to ``<latest>.md/.png``."""
    results.mkdir(exist_ok=True)
    out = [results / f"{stamp}.json", results / f"{stamp}.md"]
    out[0].write_text(json.dumps(record, indent=2, default=str) + "\n")
    out[1].write_text(text + "\n")
    shutil.copyfile(out[1], results / f"{latest}.md")
    from bench.chart import draw

    png = results / f"{stamp}.png"
    draw(record["summary"], record["raw"], png)
    shutil.copyfile(png, results / f"{latest}.png")
    out.append(png)
    return out
