"""The invariants a fault run must keep, checked after the fact.

Two independent sources: the database's audit trail (``task_events``, plus
``tasks`` and ``state_versions``) and the terraform wrapper's invocation log
(what actually ran, written by a process runq does not control). The checks
are pure functions over plain records, so unit tests can feed them histories
with each invariant broken and see it reported.

* **I1** never two plan+applies active at once in one workspace. A
  plan+apply is active from its claim (``pending -> planning``) until it
  moves to a status outside ``ACTIVE_APPLY``.
* **I2** no phase started twice under one fencing token, no apply executed
  twice, and no phase run under a token that was not handed out for it.
* **I3** every task settled (terminal or ``apply_pending``) within a bound
  after healing.
* **I4** plan+applies first claimed in queue order per workspace.
* **I5** no report or state write accepted under a stale token: fences
  change only at claims; every phase result the database accepted is backed
  by a terraform command that ran under the fence in force and had finished;
  every stored state version was written under the fence in force while the
  task was applying, by an apply that ran under that fence.

All times are POSIX seconds (floats); database timestamps and the log's
``date +%s.%N`` come from the same machine clock.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.states import ACTIVE_APPLY, SETTLED, TaskStatus, TaskType

S = TaskStatus
INVARIANTS = ("I1", "I2", "I3", "I4", "I5")

#: (from, to) of the moves that hand out a new fencing token.
CLAIMS = frozenset(
    {(S.PENDING, S.PLANNING), (S.PLANNING, S.PLANNING), (S.APPLY_QUEUED, S.APPLYING)}
)
#: Moves that only an executor's Finished report of a successful phase makes.
PLAN_RESULTS = frozenset({S.SUCCESS, S.APPLY_PENDING, S.APPLY_QUEUED})
#: Exit codes of a successful ``terraform plan -detailed-exitcode``.
PLAN_OK = frozenset({0, 2})
#: An event's time is taken before its UPDATE, which may wait for a row lock:
#: a state write that held the task's row (FOR UPDATE) while the reconciler
#: ended the apply commits first yet carries a later time than the end event.
#: Seconds of such overlap tolerated; far below a lease TTL, so a superseded
#: executor's write after it resumed still shows.
STATE_SLACK = 0.5


@dataclass(frozen=True)
class TaskRow:
    id: int
    workspace_id: int
    type: str
    status: str
    queue_seq: int
    fence: int


@dataclass(frozen=True)
class Event:
    id: int
    task_id: int
    from_status: str | None
    to_status: str
    fence: int
    at: float
    actor: str = ""
    reason: str = ""

    @property
    def is_claim(self) -> bool:
        return (self.from_status, self.to_status) in CLAIMS


@dataclass(frozen=True)
class StateVersion:
    id: int
    workspace_id: int
    task_id: int | None
    fence: int | None
    serial: int
    created_at: float


@dataclass(frozen=True)
class Invocation:
    """One terraform command, from the wrapper's start and end lines."""

    task_id: int | None
    phase: str
    fence: int | None
    command: str
    pid: int
    start: float
    #: None: no end line (the wrapper was killed, or is still running).
    end: float | None = None
    rc: int | None = None


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str
    task_id: int | None = None


@dataclass
class Verdict:
    violations: list[Violation] = field(default_factory=list)

    def count(self, invariant: str) -> int:
        return sum(1 for v in self.violations if v.invariant == invariant)

    @property
    def counts(self) -> dict[str, int]:
        return {i: self.count(i) for i in INVARIANTS}

    @property
    def ok(self) -> bool:
        return not self.violations


# ---------------------------------------------------------------- the log


def _int_or_none(field_: str) -> int | None:
    return int(field_) if field_.lstrip("-").isdigit() else None


def parse_invocations(lines: Iterable[str]) -> list[Invocation]:
    """Pair the wrapper's start and end lines (by wrapper pid, in order).

    Line format: ``<time> start|end <task> <phase> <fence> <command> <pid>
    <rc or ->``; ``-`` marks a field the wrapper's environment lacked.
    """
    open_: dict[int, Invocation] = {}
    done: list[Invocation] = []
    for line in lines:
        parts = line.split()
        if len(parts) != 8:
            continue  # a line torn by a kill mid-write
        at, kind, task, phase, fence, command, pid_, rc = parts
        pid = int(pid_)
        if kind == "start":
            if pid in open_:  # its end line never came; the pid was reused
                done.append(open_.pop(pid))
            open_[pid] = Invocation(
                _int_or_none(task), phase, _int_or_none(fence), command, pid, float(at)
            )
        elif kind == "end" and pid in open_:
            started = open_.pop(pid)
            done.append(
                Invocation(
                    started.task_id,
                    started.phase,
                    started.fence,
                    started.command,
                    pid,
                    started.start,
                    float(at),
                    _int_or_none(rc),
                )
            )
    done.extend(open_.values())
    return sorted(done, key=lambda i: i.start)


def read_invocations(path: Path) -> list[Invocation]:
    if not path.is_file():
        return []
    return parse_invocations(path.read_text(errors="replace").splitlines())


# ---------------------------------------------------------------- helpers


def by_task(events: Iterable[Event]) -> dict[int, list[Event]]:
    grouped: dict[int, list[Event]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e.id):
        grouped[e.task_id].append(e)
    return grouped


def first_claim(events: Sequence[Event]) -> Event | None:
    return next(
        (e for e in events if e.from_status == S.PENDING and e.to_status == S.PLANNING), None
    )


def in_force(events: Sequence[Event], at: float) -> Event | None:
    """The task's last event at or before ``at``."""
    last = None
    for e in events:
        if e.at <= at:
            last = e
    return last


def active_interval(events: Sequence[Event]) -> tuple[float, float] | None:
    """When a plan+apply held its workspace: claim to leaving ACTIVE_APPLY."""
    claim = first_claim(events)
    if claim is None:
        return None
    for e in events:
        if e.id > claim.id and e.to_status not in ACTIVE_APPLY:
            return claim.at, e.at
    return claim.at, math.inf


# ---------------------------------------------------------------- I1..I5


def check_i1(tasks: Sequence[TaskRow], events: Iterable[Event]) -> list[Violation]:
    lives = by_task(events)
    per_ws: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    for t in tasks:
        if t.type != TaskType.PLAN_AND_APPLY:
            continue
        interval = active_interval(lives.get(t.id, []))
        if interval is not None:
            per_ws[t.workspace_id].append((*interval, t.id))
    found = []
    for ws, intervals in per_ws.items():
        intervals.sort()
        holder_end, holder = -math.inf, None
        for start, end, task_id in intervals:
            if start < holder_end:
                found.append(
                    Violation(
                        "I1",
                        f"workspace {ws}: task {task_id} claimed at {start:.3f} while task "
                        f"{holder} was active until {holder_end:.3f}",
                        task_id,
                    )
                )
            if end > holder_end:
                holder_end, holder = end, task_id
    return found


def check_i2(
    tasks: Sequence[TaskRow], events: Iterable[Event], invocations: Iterable[Invocation]
) -> list[Violation]:
    known = {t.id for t in tasks}
    claimed: dict[tuple[int, str], set[int]] = defaultdict(set)
    for e in events:
        if e.is_claim:
            phase = "plan" if e.to_status == S.PLANNING else "apply"
            claimed[(e.task_id, phase)].add(e.fence)
    starts: Counter[tuple[int | None, str, int | None]] = Counter()
    applies: Counter[int | None] = Counter()
    found = []
    for inv in invocations:
        if inv.command not in {"plan", "apply"}:
            continue
        if inv.task_id not in known:
            found.append(
                Violation("I2", f"terraform {inv.command} (pid {inv.pid}) for unknown task")
            )
            continue
        starts[(inv.task_id, inv.command, inv.fence)] += 1
        if inv.command == "apply":
            applies[inv.task_id] += 1
        assert inv.task_id is not None
        if inv.fence is not None and inv.fence not in claimed[(inv.task_id, inv.command)]:
            found.append(
                Violation(
                    "I2",
                    f"task {inv.task_id}: terraform {inv.command} ran under fence {inv.fence}, "
                    f"never handed out for its {inv.command} phase (pid {inv.pid})",
                    inv.task_id,
                )
            )
    for (task_id, command, fence), n in sorted(starts.items(), key=repr):
        if n > 1:
            found.append(
                Violation(
                    "I2",
                    f"task {task_id}: terraform {command} started {n} times under fence {fence}",
                    task_id,
                )
            )
    for task_id, n in sorted(applies.items(), key=repr):
        if n > 1:
            found.append(Violation("I2", f"task {task_id}: terraform apply ran {n} times", task_id))
    return found


def check_i3(
    tasks: Sequence[TaskRow], events: Iterable[Event], healed_at: float, bound: float
) -> list[Violation]:
    lives = by_task(events)
    found = []
    for t in tasks:
        if t.status not in SETTLED:
            found.append(Violation("I3", f"task {t.id} is still {t.status}", t.id))
            continue
        life = lives.get(t.id, [])
        settled = next((e.at for e in reversed(life) if e.to_status in SETTLED), None)
        if settled is not None and settled > healed_at + bound:
            found.append(
                Violation(
                    "I3",
                    f"task {t.id} settled {settled - healed_at:.1f}s after healing "
                    f"(bound {bound:.0f}s)",
                    t.id,
                )
            )
    return found


def check_i4(tasks: Sequence[TaskRow], events: Iterable[Event]) -> list[Violation]:
    lives = by_task(events)
    per_ws: dict[int, list[TaskRow]] = defaultdict(list)
    for t in tasks:
        if t.type == TaskType.PLAN_AND_APPLY:
            per_ws[t.workspace_id].append(t)
    found = []
    for queue in per_ws.values():
        queue.sort(key=lambda t: t.queue_seq)
        # When each task stopped waiting: its first claim, or its leaving
        # `pending` some other way (a cancel); never, if it is still pending.
        left: list[tuple[TaskRow, float, bool]] = []
        for t in queue:
            life = lives.get(t.id, [])
            claim = first_claim(life)
            if claim is not None:
                left.append((t, claim.at, True))
                continue
            gone = next((e.at for e in life if e.from_status == S.PENDING), math.inf)
            left.append((t, gone, False))
        for i, (earlier, earlier_left, _) in enumerate(left):
            for later, later_at, later_claimed in left[i + 1 :]:
                if later_claimed and later_at < earlier_left:
                    found.append(
                        Violation(
                            "I4",
                            f"task {later.id} (seq {later.queue_seq}) claimed at "
                            f"{later_at:.3f} before task {earlier.id} (seq "
                            f"{earlier.queue_seq}) left the queue",
                            later.id,
                        )
                    )
    return found


def check_i5(
    tasks: Sequence[TaskRow],
    events: Iterable[Event],
    invocations: Sequence[Invocation],
    state_versions: Iterable[StateVersion] = (),
) -> list[Violation]:
    lives = by_task(events)
    rows = {t.id: t for t in tasks}
    ran: dict[tuple[int, str], list[Invocation]] = defaultdict(list)
    for inv in invocations:
        if inv.task_id is not None:
            ran[(inv.task_id, inv.command)].append(inv)
    found = []

    def flag(task_id: int | None, detail: str) -> None:
        found.append(Violation("I5", detail, task_id))

    for t in tasks:
        life = lives.get(t.id, [])
        fence = 0
        for e in life:
            # The creation event starts at 0; then only claims add one.
            want = fence + 1 if e.is_claim else fence
            if e.fence != want:
                flag(
                    t.id,
                    f"task {t.id}: {e.from_status} -> {e.to_status} carries fence "
                    f"{e.fence}, expected {want}",
                )
            fence = e.fence
        if life and t.fence != fence:
            flag(t.id, f"task {t.id}: holds fence {t.fence}, its events end at {fence}")
        for e in life:
            if e.from_status == S.PLANNING and e.to_status in PLAN_RESULTS:
                command, ok_codes = "plan", PLAN_OK
            elif e.from_status == S.APPLYING and e.to_status == S.APPLIED:
                command, ok_codes = "apply", frozenset({0})
            else:
                continue
            backing = [
                inv
                for inv in ran[(t.id, command)]
                if inv.fence in {e.fence, None}
                and inv.end is not None
                and inv.end <= e.at
                and inv.rc in ok_codes
            ]
            if not backing:
                flag(
                    t.id,
                    f"task {t.id}: {e.from_status} -> {e.to_status} accepted under "
                    f"fence {e.fence} with no finished terraform {command} under that fence",
                )

    for sv in state_versions:
        if sv.task_id is None:
            continue  # imported or initial state, written by no executor
        task = rows.get(sv.task_id)
        if task is None or task.workspace_id != sv.workspace_id:
            flag(sv.task_id, f"state version {sv.id}: task {sv.task_id} is not of its workspace")
            continue
        life = lives.get(sv.task_id, [])
        claim = next(
            (e for e in life if e.to_status == S.APPLYING and e.is_claim and e.fence == sv.fence),
            None,
        )
        ended = next((e.at for e in life if claim and e.id > claim.id), math.inf)
        if claim is None or not claim.at <= sv.created_at <= ended + STATE_SLACK:
            held = "never applying" if claim is None else f"applying {claim.at:.3f}-{ended:.3f}"
            flag(
                sv.task_id,
                f"state version {sv.id} (serial {sv.serial}) stored at {sv.created_at:.3f} "
                f"under fence {sv.fence}; task {sv.task_id} under that fence: {held}",
            )
        if not any(
            inv.fence in {sv.fence, None} and inv.start <= sv.created_at
            for inv in ran[(sv.task_id, "apply")]
        ):
            flag(
                sv.task_id,
                f"state version {sv.id}: no terraform apply of task {sv.task_id} "
                f"under fence {sv.fence} had started",
            )
    return found


def check(
    tasks: Sequence[TaskRow],
    events: Sequence[Event],
    invocations: Sequence[Invocation],
    state_versions: Sequence[StateVersion] = (),
    *,
    healed_at: float,
    bound: float,
) -> Verdict:
    return Verdict(
        check_i1(tasks, events)
        + check_i2(tasks, events, invocations)
        + check_i3(tasks, events, healed_at, bound)
        + check_i4(tasks, events)
        + check_i5(tasks, events, invocations, state_versions)
    )


# ---------------------------------------------------------------- recovery


@dataclass(frozen=True)
class Recovery:
    """How long the tasks holding a phase when a fault hit took to move on.

    ``affected``: tasks in ``planning`` or ``applying`` at ``at`` (claimed,
    started or not). ``seconds``: until the last of them made its next
    transition (0.0 when none was running; inf when one never moved).
    """

    at: float
    affected: tuple[int, ...]
    seconds: float
    slowest: int | None


def recovery(events: Iterable[Event], at: float) -> Recovery:
    worst, slowest, affected = 0.0, None, []
    for task_id, life in by_task(events).items():
        now = in_force(life, at)
        if now is None or now.to_status not in {S.PLANNING, S.APPLYING}:
            continue
        affected.append(task_id)
        nxt = next((e.at for e in life if e.at > at), math.inf)
        if nxt - at > worst:
            worst, slowest = nxt - at, task_id
    return Recovery(at, tuple(affected), worst, slowest)
