"""Timeline pictures: a bar per task phase over time, one lane per task,
grouped by workspace, drawn from ``task_events`` (:mod:`scheduler.timeline`).

SVG is written by hand (no dependency, the picture is a few hundred
rectangles); HTML wraps the same SVG with a legend and hover titles; PNG is
the SVG rasterised by Debian's headless ``chromium`` when it is installed
(said plainly if it is not). Colours: the phase by the task's type (plans
blue, plan+applies orange for the plan and red for the apply), the waits
in grey (queued), yellow (waiting for confirmation) and light orange (a
confirmed apply waiting for its claim), and a task that failed, was
cancelled or discarded ends in a dark mark with its outcome in the title.
"""

from __future__ import annotations

import html
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from scheduler import tasks
from scheduler.browser import HEADLESS_FLAGS, find_chromium
from scheduler.errors import InvalidInput
from scheduler.models import utcnow
from scheduler.runtime import Runtime
from scheduler.states import TERMINAL, TaskStatus, TaskType
from scheduler.timeline import Segment, TaskTimeline, timelines
from scheduler.views import TaskView

FORMATS = ("svg", "html", "png")

#: Fill per (segment, task type); waits are the same for both types.
COLOURS: dict[tuple[Segment, TaskType | None], str] = {
    (Segment.QUEUED, None): "#c7c7c7",
    (Segment.CONFIRM, None): "#f2d16b",
    (Segment.APPLY_QUEUED, None): "#f7c59f",
    (Segment.PLAN, TaskType.PLAN): "#4e79a7",
    (Segment.PLAN, TaskType.PLAN_AND_APPLY): "#f28e2b",
    (Segment.APPLY, TaskType.PLAN_AND_APPLY): "#e15759",
}
BAD_END = "#333333"
LEGEND = (
    ("plan (plan task)", COLOURS[(Segment.PLAN, TaskType.PLAN)]),
    ("plan (plan+apply)", COLOURS[(Segment.PLAN, TaskType.PLAN_AND_APPLY)]),
    ("apply", COLOURS[(Segment.APPLY, TaskType.PLAN_AND_APPLY)]),
    ("queued", COLOURS[(Segment.QUEUED, None)]),
    ("waiting for confirmation", COLOURS[(Segment.CONFIRM, None)]),
    ("confirmed, waiting for the apply claim", COLOURS[(Segment.APPLY_QUEUED, None)]),
    ("failed / cancelled / discarded", BAD_END),
)

LANE, GAP, LEFT, TOP, WIDTH = 18, 10, 170, 40, 900


@dataclass(frozen=True)
class Bar:
    lane: int
    x: float
    width: float
    fill: str
    title: str


def fill_of(segment: Segment, task_type: TaskType) -> str:
    return COLOURS.get((segment, None)) or COLOURS[(segment, task_type)]


def svg(
    tasks: Sequence[TaskView], lines: dict[int, TaskTimeline], now: datetime, title: str
) -> str:
    """The timeline of ``tasks`` as an SVG document; an unfinished segment
    runs to ``now``."""
    shown = [t for t in sorted(tasks, key=lambda t: (t.workspace, t.id)) if t.id in lines]
    starts = [iv.start for t in shown for _, iv in lines[t.id].segments]
    if not starts:
        return _document(title, [], [], 0.0, 60)
    origin = min(starts)
    ends = [iv.end or now for t in shown for _, iv in lines[t.id].segments]
    span = max((max(ends) - origin).total_seconds(), 1e-3)
    scale = WIDTH / span
    bars: list[Bar] = []
    labels: list[tuple[float, str, bool]] = []
    y, workspace = TOP, None
    for task in shown:
        if task.workspace != workspace:
            workspace = task.workspace
            y += GAP
            labels.append((y + LANE - 4, f"workspace {workspace}", True))
            y += LANE
        labels.append((y + LANE - 5, f"#{task.id} {_kind(task.type)}", False))
        segments = lines[task.id].segments
        for i, (segment, iv) in enumerate(segments):
            start = (iv.start - origin).total_seconds()
            end = ((iv.end or now) - origin).total_seconds()
            last = i == len(segments) - 1
            if not last:
                outcome = ""
            elif task.status in TERMINAL:
                outcome = f", then {task.status}"
            else:
                outcome = ", still going"
            bars.append(
                Bar(
                    lane=int(y),
                    x=LEFT + start * scale,
                    width=max((end - start) * scale, 1.0),
                    fill=fill_of(segment, task.type),
                    title=f"task {task.id} {segment}: {start:.2f}s to {end:.2f}s{outcome}",
                )
            )
        if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DISCARDED):
            last_end = max((iv.end or now for _, iv in lines[task.id].segments), default=now)
            x = LEFT + (last_end - origin).total_seconds() * scale
            bars.append(Bar(int(y), x, 4.0, BAD_END, f"task {task.id} {task.status}"))
        y += LANE
    return _document(title, bars, labels, span, y + GAP + 30)


def _kind(task_type: TaskType) -> str:
    return "plan" if task_type is TaskType.PLAN else "plan+apply"


def _document(
    title: str,
    bars: list[Bar],
    labels: list[tuple[float, str, bool]],
    span: float,
    height: float,
) -> str:
    width = LEFT + WIDTH + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height:.0f}" fill="white"/>',
        f'<text x="10" y="20" font-size="14">{html.escape(title)}</text>',
    ]
    for y, text, bold in labels:
        weight = ' font-weight="bold"' if bold else ""
        out.append(f'<text x="10" y="{y:.0f}"{weight}>{html.escape(text)}</text>')
    for bar in bars:
        out.append(
            f'<rect x="{bar.x:.1f}" y="{bar.lane + 2}" width="{bar.width:.1f}" '
            f'height="{LANE - 4}" fill="{bar.fill}"><title>{html.escape(bar.title)}</title></rect>'
        )
    axis_y = height - 25
    out.append(
        f'<line x1="{LEFT}" y1="{axis_y:.0f}" x2="{LEFT + WIDTH}" y2="{axis_y:.0f}" stroke="#555"/>'
    )
    for i in range(6):
        x = LEFT + WIDTH * i / 5
        out.append(f'<text x="{x:.0f}" y="{axis_y + 15:.0f}" text-anchor="middle">')
        out.append(f"{span * i / 5:.1f}s</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def html_page(svg_text: str, title: str) -> str:
    legend = "".join(
        f'<li><span style="background:{colour}"></span>{html.escape(name)}</li>'
        for name, colour in LEGEND
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:16px} ul{list-style:none;padding:0}"
        "li{display:inline-block;margin-right:14px}"
        "li span{display:inline-block;width:12px;height:12px;margin-right:4px;"
        "vertical-align:middle}</style></head><body>\n"
        f"<ul>{legend}</ul>\n{svg_text}</body></html>\n"
    )


def write(path: Path, svg_text: str, title: str) -> Path:
    """Write the picture in the format ``path``'s suffix names."""
    kind = path.suffix.lstrip(".").lower()
    if kind not in FORMATS:
        raise InvalidInput(f"--out must end in .svg, .html or .png, not {path.name!r}")
    if kind == "svg":
        path.write_text(svg_text)
    elif kind == "html":
        path.write_text(html_page(svg_text, title))
    else:
        _png(path, svg_text)
    return path


def _png(path: Path, svg_text: str) -> None:
    """Rasterise with headless chromium (Debian's ``chromium`` package)."""
    browser = find_chromium()
    if browser is None:
        raise InvalidInput(
            "a PNG needs Debian's chromium (apt-get install chromium); "
            "--out FILE.svg or FILE.html need nothing"
        )
    width, height = _size(svg_text)
    with tempfile.TemporaryDirectory(prefix="runq-timeline-") as tmp:
        page = Path(tmp) / "timeline.svg"
        page.write_text(svg_text)
        subprocess.run(
            [
                browser,
                *HEADLESS_FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width},{height}",
                f"--screenshot={path.resolve()}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )


def _size(svg_text: str) -> tuple[int, int]:
    head = svg_text.split(">", 1)[0]
    width = int(float(head.split('width="', 1)[1].split('"', 1)[0]))
    height = int(float(head.split('height="', 1)[1].split('"', 1)[0]))
    return width, height


def parse_since(value: str | None, now: datetime) -> datetime | None:
    """``--since``: a duration back from now (``90s``, ``15m``, ``2h``,
    ``1d``) or an ISO 8601 time (UTC if it names no zone)."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip()
    if text and text[-1] in units:
        try:
            return now - timedelta(seconds=float(text[:-1]) * units[text[-1]])
        except ValueError:
            pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"--since takes a duration (90s, 15m, 2h, 1d) or an ISO time, got {value!r}"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def draw(
    rt: Runtime,
    out: Path,
    *,
    workspace: str | None = None,
    since: datetime | None = None,
    limit: int = 500,
) -> tuple[Path, int]:
    """Write the timeline of the newest ``limit`` tasks (of ``workspace``,
    created since ``since``) to ``out``; return the path and the task count."""
    now = utcnow()
    shown = [
        t
        for t in tasks.list_tasks(rt, workspace=workspace, limit=limit)
        if since is None or t.created_at >= since
    ]
    lines = timelines(tasks.events(rt, [t.id for t in shown])) if shown else {}
    scope = f"workspace {workspace}" if workspace else "all workspaces"
    title = f"runq timeline: {scope}, {len(shown)} tasks (until {now:%Y-%m-%d %H:%M:%S} UTC)"
    return write(out, svg(shown, lines, now, title), title), len(shown)
