"""The results chart (matplotlib, Agg): plan start latency p50/p99 per
system, plan throughput against worker processes, the hand-off gap p50/p99,
and plan start with slow plan+applies in flight. Medians over repetitions;
a panel whose figure was not measured says so."""

from __future__ import annotations

import importlib
import statistics
from pathlib import Path
from typing import Any

COLORS = {"new": "#1f77b4", "legacy": "#ff7f0e", "celery": "#2ca02c", "base": "#2ca02c"}


def _num(y: float) -> str:
    return f"{y:.0f}" if y >= 100 else f"{y:.3g}"


def _med(values: list[float] | None) -> float:
    return statistics.median(values) if values else 0.0


def draw(summary: dict[str, dict[str, list[float]]], raw: dict[str, Any], path: Path) -> None:
    # Imported by name: matplotlib is the bench extra, and make test's mypy
    # runs where it is not installed.
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (lat, tput), (gap, inf) = axes
    systems = [("new", "runq new"), ("legacy", "runq legacy"), ("base", "bare Celery")]

    def bars(ax: Any, keys: list[tuple[str, str]], cols: list[tuple[str, str]], title: str) -> None:
        present = [(k, lbl) for k, lbl in keys if k in summary]
        if not present:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center")
            ax.set_title(title)
            return
        width = 0.8 / len(cols)
        for j, (col, name) in enumerate(cols):
            xs = [i + j * width for i in range(len(present))]
            ys = [_med(summary[k].get(col)) for k, _ in present]
            ax.bar(xs, ys, width, label=name, color=COLORS.get(col))
            for x, y in zip(xs, ys, strict=True):
                if y:
                    ax.annotate(_num(y), (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(present))])
        ax.set_xticklabels([lbl for _, lbl in present])
        ax.set_title(title)
        ax.legend(fontsize=8)

    bars(lat, [("lat_p50", "p50"), ("lat_p99", "p99")], systems, "plan start latency, ms")
    if "lat_p50" in summary:
        lat.set_yscale("log")
    if floor := _med(summary.get("lat_floor", {}).get("base")):
        lat.axhline(floor, color="black", linestyle="--", linewidth=1)
        lat.annotate(f"durable floor p50 {_num(floor)}", (0, floor), va="bottom", fontsize=7)

    _throughput(tput, summary, raw, systems)

    n = raw.get("args", {}).get("serial_workspaces", 100)
    bars(
        gap,
        [
            ("gap1_gap_p50", "1 ws p50"),
            ("gap1_gap_p99", "1 ws p99"),
            ("serial_gap_p50", f"{n} ws p50"),
            ("serial_gap_p99", f"{n} ws p99"),
        ],
        systems[:2],
        "hand-off gap applied → next planning, ms",
    )
    if any(k in summary for k in ("gap1_gap_p50", "serial_gap_p50")):
        gap.set_yscale("log")
    _inflight(inf, summary)
    fig.suptitle("runq scheduler overhead (medians over repetitions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(
    tput: Any,
    summary: dict[str, dict[str, list[float]]],
    raw: dict[str, Any],
    systems: list[tuple[str, str]],
) -> None:
    shapes = sorted(raw.get("throughput") or {}, key=_processes)
    if shapes:
        for col, name in systems:
            xs, ys = [], []
            for shape in shapes:
                values = summary.get(f"tput_{shape}", {}).get(col)
                if values:
                    xs.append(_processes(shape))
                    ys.append(_med(values))
            tput.plot(xs, ys, marker="o", label=name, color=COLORS[col])
        if floor := _med(summary.get("tput_floor", {}).get("base")):
            main = _processes(raw.get("args", {}).get("shape", "2x2"))
            tput.plot([main], [floor], "kx", label="durable floor")
        tput.set_xlabel("worker processes")
        tput.set_xticks(sorted({_processes(s) for s in shapes}))
        tput.set_yscale("log")
        tput.legend(fontsize=8)
    else:
        tput.text(0.5, 0.5, "not measured", ha="center", va="center")
    tput.set_title("plan throughput, plans/s (Celery: no-op drain)")


def _processes(shape: str) -> int:
    w, c = shape.split("x")
    return int(w) * int(c)


def _inflight(inf: Any, summary: dict[str, dict[str, list[float]]]) -> None:
    if "inflight" in summary:
        col = summary["inflight"]
        labels = ["new without", "new with", "legacy without", "legacy with"]
        ys = [_med(col.get(k)) for k in ("base", "new", "base_legacy", "legacy")]
        inf.bar(labels, ys, color=[COLORS["new"]] * 2 + [COLORS["legacy"]] * 2)
        for i, y in enumerate(ys):
            inf.annotate(_num(y), (i, y), ha="center", va="bottom", fontsize=7)
        if all(y > 0 for y in ys):
            inf.set_yscale("log")
    else:
        inf.text(0.5, 0.5, "not measured", ha="center", va="center")
    inf.set_title("plan start p50 with a slow plan+apply in flight, ms")
