"""What ``runq demo`` shows at the end: the report (``--json``), the verdict,
and the per-workspace timeline drawn in text from ``task_events``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from scheduler.demo_scenario import EXPECTED_END, WORKSPACES
from scheduler.demo_setup import Setup
from scheduler.states import TERMINAL, TaskType
from scheduler.timeline import Segment, TaskTimeline, WorkspaceFacts, workspace_facts
from scheduler.views import EventView, TaskView

# ---------------------------------------------------------------- report


@dataclass
class DemoReport:
    """What ``runq demo`` found; ``to_json`` is what ``--json`` prints."""

    ok: bool
    verdict: str
    demo_dir: str
    database: str
    redis: str
    broker: str
    terraform: dict[str, Any]
    dispatch_mode: str
    workers: int
    wall_seconds: float
    scenario_seconds: float
    workspaces: dict[str, dict[str, Any]]
    tasks: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    #: The timeline picture (HTML; an SVG beside it), from task_events.
    timeline: str | None = None

    def to_json(self) -> dict[str, Any]:
        totals = {
            "plans_overlapping_an_apply": sum(
                w["plans_overlapping_an_apply"] for w in self.workspaces.values()
            ),
            "applies_overlapping_each_other": sum(
                w["applies_overlapping_each_other"] for w in self.workspaces.values()
            ),
            "tasks": len(self.tasks),
        }
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "problems": self.problems,
            "totals": totals,
            "demo_dir": self.demo_dir,
            "database": self.database,
            "redis": self.redis,
            "broker": self.broker,
            "terraform": self.terraform,
            "dispatch_mode": self.dispatch_mode,
            "workers": self.workers,
            "wall_seconds": round(self.wall_seconds, 2),
            "scenario_seconds": round(self.scenario_seconds, 2),
            "workspaces": self.workspaces,
            "tasks": self.tasks,
            "timeline": self.timeline,
        }


# ---------------------------------------------------------------- results


def find_problems(views: Sequence[TaskView], facts: Mapping[str, WorkspaceFacts]) -> list[str]:
    """Every way the run fell short of what runq promises."""
    problems = []
    for v in views:
        want = EXPECTED_END[v.type]
        if v.status not in TERMINAL:
            problems.append(f"task #{v.id} ({v.workspace}, {v.type}) did not finish: {v.status}")
        elif v.status is not want:
            problems.append(
                f"task #{v.id} ({v.workspace}, {v.type}) ended {v.status}, expected {want}"
                + (f": {v.error}" if v.error else "")
            )
    for f in facts.values():
        problems += [
            f"{f.workspace}: applies of #{o.first} and #{o.second} overlapped"
            for o in f.apply_overlaps
        ]
        problems += [
            f"{f.workspace}: plan+apply #{o.first} and #{o.second} held the workspace at once"
            for o in f.holding_overlaps
        ]
    return problems


def verdict(problems: Sequence[str], facts: Mapping[str, WorkspaceFacts], legacy: bool) -> str:
    overlapped = sum(f.plans_overlapping_apply_count for f in facts.values())
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return f"FAILED: {problems[0]}{more}"
    if legacy:
        return (
            f"OK (legacy dispatch): {overlapped} plans overlapped an apply; "
            "every task of a workspace waited for the one before it"
        )
    if overlapped:
        return (
            f"OK: {overlapped} plans ran while an apply was running in their workspace, "
            "and no two applies in a workspace ever overlapped"
        )
    return (
        "OK: no two applies in a workspace overlapped (though no plan happened to "
        "overlap an apply this time)"
    )


def task_json(v: TaskView, line: TaskTimeline | None, origin: datetime | None) -> dict[str, Any]:
    segments = []
    if line is not None and origin is not None:
        for seg, interval in line.segments:
            start, stop = interval.seconds(origin)
            segments.append(
                {
                    "kind": str(seg),
                    "start": round(start, 3),
                    "end": None if stop is None else round(stop, 3),
                }
            )
    return {
        "id": v.id,
        "workspace": v.workspace,
        "type": str(v.type),
        "message": v.message,
        "status": str(v.status),
        "error": v.error,
        "segments": segments,
    }


def report(
    views: Sequence[TaskView],
    events: Sequence[EventView],
    lines: Mapping[int, TaskTimeline],
    names: Mapping[str, str],
    problems: list[str],
    setup: Setup,
    workers: int,
    wall_seconds: float,
) -> DemoReport:
    """The report of a run: ``problems`` found while it ran, and those its
    events show (``lines``: their :func:`~scheduler.timeline.timelines`)."""
    facts = workspace_facts(views, lines)
    origin = min((e.at for e in events), default=None)
    end = max((e.at for e in events), default=None)
    problems = [*problems, *find_problems(views, facts)]
    auto = {w.name: w.auto_apply for w in WORKSPACES}
    workspaces = {
        name: {
            "auto_apply": auto[scenario_name],
            **(facts.get(name) or WorkspaceFacts(name, (), (), ())).to_json(),
        }
        for scenario_name, name in names.items()
    }
    return DemoReport(
        ok=not problems,
        verdict=verdict(problems, facts, setup.legacy),
        demo_dir=str(setup.demo_dir),
        database=setup.database,
        redis=setup.redis_note,
        broker=setup.broker_note,
        terraform={
            "binary": setup.real_terraform,
            "version": setup.terraform_version,
            "plan_delay_seconds": setup.plan_seconds,
            "apply_delay_seconds": setup.apply_seconds,
        },
        dispatch_mode=str(setup.settings.dispatch_mode),
        workers=workers,
        wall_seconds=wall_seconds,
        scenario_seconds=(end - origin).total_seconds() if origin and end else 0.0,
        workspaces=workspaces,
        tasks=[task_json(v, lines.get(v.id), origin) for v in sorted(views, key=lambda t: t.id)],
        problems=problems,
    )


# ---------------------------------------------------------------- timeline


#: Chart characters, by segment (the plan phase differs by task type).
CHARS: Mapping[str, str] = {
    "queued": ".",
    "plan": "-",
    "plan_of_apply": "=",
    "confirm": "?",
    "apply": "#",
}
LEGEND = (
    "legend: . queued   - plan (plan task)   = plan (of a plan+apply)   "
    "? waiting for confirmation   # apply"
)
#: Which kind wins a column both cover equally.
PRIORITY = ("apply", "plan", "plan_of_apply", "confirm", "queued")
MAX_COLUMNS = 72


def _kind(seg: Segment, task_type: TaskType) -> str:
    if seg is Segment.PLAN:
        return "plan" if task_type is TaskType.PLAN else "plan_of_apply"
    if seg is Segment.APPLY_QUEUED:
        return "queued"
    return str(seg)


def _bucket_seconds(total: float) -> float:
    bucket = 0.25
    while total / bucket > MAX_COLUMNS:
        bucket *= 2
    return bucket


def _row(
    line: TaskTimeline, task_type: TaskType, origin: datetime, bucket: float, columns: int
) -> str:
    cover: list[dict[str, float]] = [{} for _ in range(columns)]
    for seg, interval in line.segments:
        start, stop = interval.seconds(origin)
        end = columns * bucket if stop is None else stop
        kind = _kind(seg, task_type)
        first, last = int(start // bucket), min(columns - 1, math.ceil(end / bucket) - 1)
        for col in range(max(0, first), last + 1):
            lo, hi = col * bucket, (col + 1) * bucket
            share = min(hi, end) - max(lo, start)
            if share > 0:
                cover[col][kind] = cover[col].get(kind, 0.0) + share
    cells = []
    for c in cover:
        if not c:
            cells.append(" ")
            continue
        best = max(c.values())
        winner = next(k for k in PRIORITY if c.get(k, 0.0) >= best - 1e-9)
        cells.append(CHARS[winner])
    return "".join(cells)


def _ruler(columns: int, bucket: float) -> str:
    tick = next(t for t in (1, 2, 5, 10, 15, 30, 60, 120, 300) if t / bucket >= 6)
    cells = [" "] * (columns + 8)
    t = 0
    while t / bucket < columns:
        label = f"{t}s"
        col = int(t / bucket)
        cells[col : col + len(label)] = list(label)
        t += tick
    return "".join(cells).rstrip()


def render(
    views: Sequence[TaskView],
    events: Sequence[EventView],
    lines: Mapping[int, TaskTimeline],
    names: Mapping[str, str],
    report: DemoReport,
) -> str:
    if not events:
        return f"(no events recorded)\n\n{report.verdict}"
    origin = min(e.at for e in events)
    total = (max(e.at for e in events) - origin).total_seconds()
    bucket = _bucket_seconds(total)
    columns = max(1, math.ceil(total / bucket))
    label_width = 45
    out = [
        f"timeline (from task_events; one column = {bucket:g}s)",
        f"  {LEGEND}",
        "",
    ]
    for scenario_name, ws in names.items():
        auto = next(w.auto_apply for w in WORKSPACES if w.name == scenario_name)
        out.append(f"{ws} ({'auto-apply' if auto else 'applies wait for confirmation'})")
        for v in sorted((v for v in views if v.workspace == ws), key=lambda t: t.id):
            line = lines.get(v.id)
            kind = "plan+apply" if v.type is TaskType.PLAN_AND_APPLY else "plan"
            label = f"  #{v.id:<3} {kind:<10} {(v.message or '')[:26]:<26} "
            cells = _row(line, v.type, origin, bucket, columns) if line else " " * columns
            out.append(f"{label:<{label_width}}|{cells}| {v.status}")
        out.append(" " * (label_width + 1) + _ruler(columns, bucket))
        facts = report.workspaces.get(ws, {})
        pairs = facts.get("plan_apply_overlaps", [])
        detail = ""
        if pairs:
            during: dict[int, list[int]] = {}
            for plan_id, apply_id in pairs:
                during.setdefault(apply_id, []).append(plan_id)
            detail = (
                "  ("
                + "; ".join(
                    f"{', '.join(f'#{p}' for p in plans)} during the apply of #{a}"
                    for a, plans in sorted(during.items())
                )
                + ")"
            )
        count = facts.get("plans_overlapping_an_apply", 0)
        out.append(f"    plans that overlapped an apply: {count}{detail}")
        out.append(
            f"    applies overlapping each other: {facts.get('applies_overlapping_each_other', 0)}"
        )
        out.append("")
    for problem in report.problems:
        out.append(f"problem: {problem}")
    out.append(f"verdict: {report.verdict}")
    out.append(f"wall time {report.wall_seconds:.1f}s; files in {report.demo_dir}")
    return "\n".join(out)


def picture(views: list[TaskView], lines: dict[int, TaskTimeline], demo_dir: Path) -> Path:
    """The demo's timeline as SVG and HTML (the path of the HTML)."""
    from scheduler import timeline_picture

    title = f"runq demo: {len(views)} tasks"
    from scheduler.models import utcnow

    drawn = timeline_picture.svg(views, lines, utcnow(), title)
    timeline_picture.write(demo_dir / "timeline.svg", drawn, title)
    return timeline_picture.write(demo_dir / "timeline.html", drawn, title)


def dumps(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
