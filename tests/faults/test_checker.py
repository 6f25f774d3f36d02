"""The checker can fail: synthetic histories, each with one invariant broken.

A clean history (two workspaces, plans and plan+applies, a re-claimed plan,
state versions) passes every check; each test then breaks it in one way and
asserts that exactly that invariant is reported. No services: records only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scheduler.states import TaskStatus, TaskType
from tests.faults.checker import (
    CLAIMS,
    Event,
    Invocation,
    StateVersion,
    TaskRow,
    check,
    parse_invocations,
    recovery,
)

S = TaskStatus
PA, PLAN = TaskType.PLAN_AND_APPLY, TaskType.PLAN
HEALED, BOUND = 100.0, 30.0


@dataclass
class History:
    """Builds tasks, events, invocations and state versions as runq and the
    wrapper would record them; fences follow the claims."""

    tasks: dict[int, TaskRow] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    invocations: list[Invocation] = field(default_factory=list)
    states: list[StateVersion] = field(default_factory=list)
    seqs: dict[int, int] = field(default_factory=dict)

    def task(self, task_id: int, ws: int, kind: TaskType, at: float) -> int:
        seq = self.seqs[ws] = self.seqs.get(ws, 0) + 1
        self.tasks[task_id] = TaskRow(task_id, ws, kind, S.PENDING, seq, 0)
        self._event(task_id, None, S.PENDING, 0, at)
        return task_id

    def _event(self, task_id: int, frm: S | None, to: S, fence: int, at: float) -> None:
        self.events.append(Event(len(self.events) + 1, task_id, frm, to, fence, at))

    def move(self, task_id: int, to: S, at: float, *, fence: int | None = None) -> int:
        """``fence``: what the event records; default, what runq would."""
        row = self.tasks[task_id]
        frm = S(row.status)
        new = row.fence + 1 if (frm, to) in CLAIMS else row.fence
        self.tasks[task_id] = TaskRow(row.id, row.workspace_id, row.type, to, row.queue_seq, new)
        self._event(task_id, frm, to, new if fence is None else fence, at)
        return new

    def run(
        self, task_id: int, command: str, fence: int, start: float, end: float, rc: int = 0
    ) -> None:
        phase = "plan" if command == "plan" else "apply"
        pid = 1000 + len(self.invocations)
        self.invocations.append(Invocation(task_id, phase, fence, command, pid, start, end, rc))

    def plan(self, task_id: int, at: float, to: S) -> None:
        """Claim, plan (exit 2: changes), report ``to``."""
        fence = self.move(task_id, S.PLANNING, at)
        self.run(task_id, "plan", fence, at + 0.1, at + 1.0, rc=2)
        self.move(task_id, to, at + 1.2)

    def apply(self, task_id: int, at: float, *, state: bool = True) -> None:
        """Claim the apply, run it (storing a state version), report applied."""
        fence = self.move(task_id, S.APPLYING, at)
        self.run(task_id, "apply", fence, at + 0.1, at + 1.0)
        if state:
            ws = self.tasks[task_id].workspace_id
            serial = 1 + sum(1 for s in self.states if s.workspace_id == ws)
            self.states.append(
                StateVersion(len(self.states) + 1, ws, task_id, fence, serial, at + 0.5)
            )
        self.move(task_id, S.APPLIED, at + 1.2)

    def verdict(self) -> dict[str, int]:
        v = check(
            list(self.tasks.values()),
            self.events,
            self.invocations,
            self.states,
            healed_at=HEALED,
            bound=BOUND,
        )
        return v.counts


def clean() -> History:
    """Workspace 1: A and B plan+apply in order, a plan P beside them; a plan
    re-claimed after a lost executor. Workspace 2: C discarded, D no changes."""
    h = History()
    a = h.task(1, 1, PA, 0.0)
    b = h.task(2, 1, PA, 0.5)
    p = h.task(3, 1, PLAN, 1.0)
    h.plan(a, 1.0, S.APPLY_QUEUED)
    h.plan(p, 1.5, S.SUCCESS)
    h.apply(a, 3.0)
    h.plan(b, 5.0, S.APPLY_PENDING)
    h.move(b, S.APPLY_QUEUED, 7.0)  # confirmed
    h.apply(b, 8.0)
    # A plan whose executor was lost: its lease expired and it was claimed
    # again under a new fence; the old run has a start line and no end.
    q = h.task(4, 1, PLAN, 9.0)
    first = h.move(q, S.PLANNING, 9.5)
    h.invocations.append(Invocation(q, "plan", first, "plan", 77, 9.6))
    second = h.move(q, S.PLANNING, 20.0)
    h.run(q, "plan", second, 20.1, 21.0, rc=0)
    h.move(q, S.SUCCESS, 21.5)
    c = h.task(5, 2, PA, 0.0)
    d = h.task(6, 2, PA, 0.1)
    h.plan(c, 1.0, S.APPLY_PENDING)
    h.move(c, S.DISCARDED, 4.0)
    h.plan(d, 4.5, S.SUCCESS)
    return h


NONE = {"I1": 0, "I2": 0, "I3": 0, "I4": 0, "I5": 0}


def only(invariant: str, n: int = 1) -> dict[str, int]:
    return {**NONE, invariant: n}


def test_a_clean_history_passes() -> None:
    assert clean().verdict() == NONE


def test_i1_two_plan_and_applies_active_at_once() -> None:
    h = clean()
    # E is claimed in workspace 2 while F, claimed before it, waits for a
    # confirmation (apply_pending still holds the workspace).
    f = h.task(7, 2, PA, 30.0)
    e = h.task(8, 2, PA, 30.1)
    h.plan(f, 31.0, S.APPLY_PENDING)
    h.plan(e, 33.0, S.APPLY_PENDING)
    h.move(f, S.DISCARDED, 35.0)
    h.move(e, S.DISCARDED, 36.0)
    assert h.verdict() == only("I1")


def test_i2_plan_started_twice_under_one_fence() -> None:
    h = clean()
    # A duplicated execute message the start-once guard let through.
    h.run(1, "plan", 1, 1.3, 2.0, rc=2)
    assert h.verdict() == only("I2")


def test_i2_apply_executed_twice() -> None:
    h = clean()
    # An apply re-run under a new claim: two fences, one apply each, but the
    # task's apply ran twice. (The second claim is recorded as runq would.)
    t = h.task(9, 2, PA, 40.0)
    h.plan(t, 41.0, S.APPLY_QUEUED)
    fence = h.move(t, S.APPLYING, 43.0)
    h.run(t, "apply", fence, 43.1, 44.0)
    h.run(t, "apply", fence + 1, 45.1, 46.0)
    h.events.append(Event(len(h.events) + 1, t, S.APPLYING, S.FAILED, fence, 44.5))
    h.tasks[t] = TaskRow(t, 2, PA, S.FAILED, h.tasks[t].queue_seq, fence)
    verdict = h.verdict()
    # Ran twice, and the second under a fence never handed out.
    assert verdict == only("I2", 2)


def test_i2_phase_run_under_a_replayed_stale_fence() -> None:
    h = clean()
    # A replayed execute (task 2's plan fence) ran terraform apply.
    h.run(2, "apply", 1, 12.0, 13.0)
    verdict = h.verdict()
    assert verdict["I2"] >= 1
    assert verdict == {**NONE, "I2": verdict["I2"]}


def test_i3_task_left_running() -> None:
    h = clean()
    t = h.task(10, 2, PLAN, 50.0)
    h.move(t, S.PLANNING, 50.5)  # claimed, and nothing ever moved it again
    assert h.verdict() == only("I3")


def test_i3_task_settled_too_late() -> None:
    h = clean()
    t = h.task(11, 2, PLAN, 50.0)
    h.move(t, S.PLANNING, 50.5)
    h.run(t, "plan", 1, HEALED + BOUND + 5, HEALED + BOUND + 6)
    h.move(t, S.SUCCESS, HEALED + BOUND + 7)
    assert h.verdict() == only("I3")


def test_i4_plan_and_apply_claimed_out_of_queue_order() -> None:
    h = clean()
    early = h.task(12, 3, PA, 60.0)
    late = h.task(13, 3, PA, 60.1)
    h.plan(late, 61.0, S.SUCCESS)
    h.plan(early, 63.0, S.SUCCESS)
    assert h.verdict() == only("I4")


def test_i4_claim_while_an_earlier_task_is_still_pending() -> None:
    h = clean()
    h.task(14, 3, PA, 60.0)  # never claimed, never cancelled
    late = h.task(15, 3, PA, 60.1)
    h.plan(late, 61.0, S.SUCCESS)
    # Task 14 still pending also breaks I3; I4 is what this test is about.
    assert h.verdict() == {**NONE, "I3": 1, "I4": 1}


def test_i5_report_accepted_under_a_stale_fence() -> None:
    h = clean()
    # The plan was re-claimed (fence 2); the old executor's (fence 1) plan
    # finished and its report was accepted before the new one's plan ended.
    t = h.task(16, 2, PLAN, 70.0)
    old = h.move(t, S.PLANNING, 70.5)
    h.run(t, "plan", old, 70.6, 80.0, rc=0)
    new = h.move(t, S.PLANNING, 78.0)
    h.run(t, "plan", new, 78.1, 85.0, rc=0)
    h.move(t, S.SUCCESS, 80.5)  # records the fence in force, 2
    assert h.verdict() == only("I5")


def test_i5_fence_changed_without_a_claim() -> None:
    h = clean()
    t = h.task(17, 2, PLAN, 70.0)
    fence = h.move(t, S.PLANNING, 70.5)
    h.run(t, "plan", fence, 70.6, 71.0, rc=0)
    h.move(t, S.SUCCESS, 71.5, fence=fence + 1)
    h.tasks[t] = TaskRow(t, 2, PLAN, S.SUCCESS, h.tasks[t].queue_seq, fence + 1)
    # Reported twice: the fence moved without a claim, and the result then
    # names a fence no plan ran under.
    assert h.verdict() == only("I5", 2)


def test_i5_state_written_under_a_stale_fence() -> None:
    h = clean()
    # Task 1 applied under fence 2; a write under fence 1 (its plan's
    # token) was stored while it applied.
    h.states.append(StateVersion(99, 1, 1, 1, 9, 3.5))
    # Reported twice: the fence was not in force, and no apply ran under it.
    assert h.verdict() == only("I5", 2)


def test_i5_state_written_after_the_apply_ended() -> None:
    h = clean()
    # A stale apply resumed after its task failed and wrote state.
    h.states.append(StateVersion(99, 1, 1, 2, 9, 30.0))
    assert h.verdict() == only("I5")


def test_parse_invocations_pairs_start_and_end_and_keeps_killed_runs() -> None:
    lines = [
        "1.5 start 7 plan 3 plan 101 -",
        "1.6 start 8 apply - apply 102 -",
        "2.0 end 7 plan 3 plan 101 2",
        "2.5 start 9 plan 1 init 103 -",
        "3.0 start 9 plan 1 pl",  # torn by a kill
    ]
    runs = parse_invocations(lines)
    assert [(r.task_id, r.command, r.fence, r.end, r.rc) for r in runs] == [
        (7, "plan", 3, 2.0, 2),
        (8, "apply", None, None, None),
        (9, "init", 1, None, None),
    ]


def test_recovery_is_the_slowest_running_task_to_move_again() -> None:
    h = clean()
    # At 9.7 only task 4 held a phase (its executor lost); it was claimed
    # again at 20.0. Task 2's apply had ended at 9.2.
    r = recovery(h.events, 9.7)
    assert r.affected == (4,)
    assert r.slowest == 4
    assert math.isclose(r.seconds, 20.0 - 9.7)
    assert recovery(h.events, 200.0).seconds == 0.0
