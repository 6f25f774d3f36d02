"""What happened when: task phases as time intervals, built from ``task_events``.

Pure functions over :class:`~scheduler.views.EventView` and
:class:`~scheduler.views.TaskView`; no database, no clock. The demo draws its
timeline with them and tests check runq's central promise with them: in a
workspace, plans may run beside an apply, but two applies never overlap.

A task's life is cut into segments by its status events::

    pending -> planning -> apply_pending -> apply_queued -> applying -> applied
    QUEUED     PLAN        CONFIRM          APPLY_QUEUED    APPLY       (end)

Each segment runs from the event that entered its status to the next event of
the same task; the last one of an unfinished task has no end yet.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from scheduler.states import TaskStatus, TaskType
from scheduler.views import EventView, TaskView


class Segment(StrEnum):
    #: pending: waiting to be claimed (a plan+apply: for the workspace).
    QUEUED = "queued"
    #: planning: the plan phase runs.
    PLAN = "plan"
    #: apply_pending: planned, waiting for a human to confirm.
    CONFIRM = "confirm"
    #: apply_queued: confirmed (or auto-applied), waiting for the apply claim.
    APPLY_QUEUED = "apply_queued"
    #: applying: the apply phase runs.
    APPLY = "apply"


_SEGMENT_OF: Mapping[TaskStatus, Segment] = {
    TaskStatus.PENDING: Segment.QUEUED,
    TaskStatus.PLANNING: Segment.PLAN,
    TaskStatus.APPLY_PENDING: Segment.CONFIRM,
    TaskStatus.APPLY_QUEUED: Segment.APPLY_QUEUED,
    TaskStatus.APPLYING: Segment.APPLY,
}

#: Order within a task's life, to sort events that share a timestamp.
_RANK: Mapping[TaskStatus, int] = {status: i for i, status in enumerate(_SEGMENT_OF)}

#: The segments during which a plan+apply holds its workspace (the statuses
#: of :data:`scheduler.states.ACTIVE_APPLY`).
HOLDING: frozenset[Segment] = frozenset(
    {Segment.PLAN, Segment.CONFIRM, Segment.APPLY_QUEUED, Segment.APPLY}
)


@dataclass(frozen=True)
class Interval:
    """``[start, end)``; ``end`` None means it has not ended (yet)."""

    start: datetime
    end: datetime | None = None

    def overlaps(self, other: Interval) -> bool:
        """True if the two share any instant. Touching ends do not count: an
        apply that starts the moment another ends does not overlap it."""
        return overlaps(self, other)

    def seconds(self, origin: datetime) -> tuple[float, float | None]:
        """Start and end as seconds after ``origin``."""
        end = None if self.end is None else (self.end - origin).total_seconds()
        return (self.start - origin).total_seconds(), end


def overlaps(a: Interval, b: Interval) -> bool:
    """Whether intervals ``a`` and ``b`` overlap (open ends reach forever)."""
    a_before_b_ends = b.end is None or a.start < b.end
    b_before_a_ends = a.end is None or b.start < a.end
    return a_before_b_ends and b_before_a_ends


@dataclass(frozen=True)
class TaskTimeline:
    task_id: int
    segments: tuple[tuple[Segment, Interval], ...]

    def of(self, kind: Segment) -> list[Interval]:
        """Every interval of one kind (a phase runs once today; a re-claimed
        phase, once leases exist, would show twice)."""
        return [interval for seg, interval in self.segments if seg is kind]

    @property
    def plan(self) -> list[Interval]:
        return self.of(Segment.PLAN)

    @property
    def apply(self) -> list[Interval]:
        return self.of(Segment.APPLY)

    @property
    def holding(self) -> Interval | None:
        """From the first claim to the end of the last holding segment: while
        a plan+apply holds its workspace. None if it never left the queue."""
        held = [interval for seg, interval in self.segments if seg in HOLDING]
        if not held:
            return None
        ends = [i.end for i in held if i.end is not None]
        return Interval(held[0].start, max(ends) if len(ends) == len(held) else None)


def timelines(events: Iterable[EventView]) -> dict[int, TaskTimeline]:
    """Cut each task's events into segments, keyed by task id.

    Events may come in any order and mix tasks; within a task they are
    ordered by time, and events with the same timestamp by their place in the
    life of a task (pending before planning before ... before the end).
    """
    by_task: dict[int, list[EventView]] = defaultdict(list)
    for event in events:
        by_task[event.task_id].append(event)
    result: dict[int, TaskTimeline] = {}
    for task_id, evs in by_task.items():
        evs.sort(key=lambda e: (e.at, _RANK.get(e.to_status, len(_RANK))))
        segments: list[tuple[Segment, Interval]] = []
        for i, event in enumerate(evs):
            kind = _SEGMENT_OF.get(event.to_status)
            if kind is None:  # a terminal status: nothing runs after it
                continue
            end = evs[i + 1].at if i + 1 < len(evs) else None
            segments.append((kind, Interval(event.at, end)))
        result[task_id] = TaskTimeline(task_id, tuple(segments))
    return result


@dataclass(frozen=True)
class Overlap:
    """Task ``first``'s interval overlapped task ``second``'s."""

    first: int
    second: int


@dataclass(frozen=True)
class WorkspaceFacts:
    """What the intervals of one workspace's tasks show."""

    workspace: str
    #: (plan task, plan+apply task) whose plan phase overlapped that apply.
    plans_overlapping_apply: tuple[Overlap, ...]
    #: Pairs of plan+apply tasks whose apply phases overlapped. runq promises
    #: none.
    apply_overlaps: tuple[Overlap, ...]
    #: Pairs of plan+apply tasks that held the workspace (planning through
    #: applying) at the same time. runq promises none.
    holding_overlaps: tuple[Overlap, ...]

    @property
    def plans_overlapping_apply_count(self) -> int:
        """Plan tasks that ran beside at least one apply."""
        return len({o.first for o in self.plans_overlapping_apply})

    def to_json(self) -> dict[str, object]:
        return {
            "workspace": self.workspace,
            "plans_overlapping_an_apply": self.plans_overlapping_apply_count,
            "plan_apply_overlaps": [[o.first, o.second] for o in self.plans_overlapping_apply],
            "applies_overlapping_each_other": len(self.apply_overlaps),
            "apply_overlaps": [[o.first, o.second] for o in self.apply_overlaps],
            "plan_and_apply_holding_overlaps": [[o.first, o.second] for o in self.holding_overlaps],
        }


def _pairs(
    items: list[tuple[int, Interval]], others: list[tuple[int, Interval]] | None = None
) -> tuple[Overlap, ...]:
    """Overlapping pairs across two lists, or within one (each pair once)."""
    found: list[Overlap] = []
    if others is None:
        for i, (a_id, a) in enumerate(items):
            for b_id, b in items[i + 1 :]:
                if a_id != b_id and overlaps(a, b):
                    found.append(Overlap(a_id, b_id))
    else:
        for a_id, a in items:
            for b_id, b in others:
                if a_id != b_id and overlaps(a, b):
                    found.append(Overlap(a_id, b_id))
    return tuple(dict.fromkeys(found))  # a re-claimed phase must not count twice


def workspace_facts(
    tasks: Iterable[TaskView], lines: Mapping[int, TaskTimeline]
) -> dict[str, WorkspaceFacts]:
    """Overlaps per workspace, from the tasks and their timelines."""
    by_ws: dict[str, list[TaskView]] = defaultdict(list)
    for task in tasks:
        by_ws[task.workspace].append(task)
    facts: dict[str, WorkspaceFacts] = {}
    for ws, items in by_ws.items():
        plans: list[tuple[int, Interval]] = []
        applies: list[tuple[int, Interval]] = []
        holding: list[tuple[int, Interval]] = []
        for task in sorted(items, key=lambda t: t.id):
            line = lines.get(task.id)
            if line is None:
                continue
            if task.type is TaskType.PLAN:
                plans += [(task.id, i) for i in line.plan]
            else:
                applies += [(task.id, i) for i in line.apply]
                held = line.holding
                if held is not None:
                    holding.append((task.id, held))
        facts[ws] = WorkspaceFacts(
            workspace=ws,
            plans_overlapping_apply=_pairs(plans, applies),
            apply_overlaps=_pairs(applies),
            holding_overlaps=_pairs(holding),
        )
    return facts
