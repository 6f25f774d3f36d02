"""The scheduler state machine, with executors that get lost.

:class:`LeaseMachine` adds to :class:`SchedulerMachine`'s users, broker and
executors the crash-safety rules: an executor starts a phase and vanishes (a
SIGKILLed worker); time passes (leases lapse, phases run past their timeout,
hand-offs go unanswered) by moving the rows' deadlines into the past, never
by sleeping; the reconciler sweeps; lost executors come back from a pause and
report (heartbeats, state writes, finishes) under fences that may be stale;
users cancel running phases. After every step the fault suite's invariants
hold against the database:

* **I1** never two plan+applies active at once in one workspace (the base
  machine's row check, and here also from the event intervals);
* **I2** no phase started twice under one fence, and no apply started twice;
* **I3** after healing (every lease lapsed, every message delivered, the
  reconciler run) every task is terminal or ``apply_pending``;
* **I4** plan+applies claimed in queue order (the base machine's check);
* **I5** no report or state write accepted under a stale fence: every report
  accepted here carried the fence the task held, and every stored state
  version belongs to an apply under its then-current fence.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from sqlalchemy import select, update

from executors.base import (
    Directive,
    Finished,
    Handoff,
    Heartbeat,
    PhaseResult,
    Report,
    Started,
    StateWritten,
    StopReason,
)
from scheduler import leases, reconciler, reports, tasks
from scheduler.errors import ConcurrentChange
from scheduler.messages import TASK_EXECUTE, Message
from scheduler.models import StateVersion, Task, TaskEvent, utcnow
from scheduler.states import ACTIVE_APPLY, RUNNING, SETTLED, DispatchMode, Phase, TaskType
from tests.unit.test_state_machine import S, SchedulerMachine, run_machine

PA = TaskType.PLAN_AND_APPLY
LINEAGE = "machine-lineage"


@dataclass
class Lost:
    """An executor that started a phase and then stopped answering."""

    handoff: Handoff
    #: The next state serial it would write (applies only).
    serial: int


class LeaseMachine(SchedulerMachine):
    strict_delivery = False

    def __init__(self) -> None:
        super().__init__()
        self.lost: list[Lost] = []
        #: (task, fence) of every Started accepted: I2.
        self.starts: set[tuple[int, int]] = set()
        self.apply_starts: dict[int, int] = defaultdict(int)

    # ------------------------------------------------------------ reports

    def _fence_of(self, task_id: int) -> tuple[int, str]:
        with self.rt.sessions() as s:
            row = s.execute(select(Task.fence, Task.status).where(Task.id == task_id)).one()
        return row.fence, row.status

    def _report(self, report: Report) -> bool:
        """Deliver ``report`` and check I5 on the answer."""
        fence, status = self._fence_of(report.task_id)
        reply = reports.accept(self.rt, report)
        if reply.accepted:
            assert report.fence == fence, f"I5: {report} accepted under fence {fence}"
            assert status in RUNNING, f"I5: {report} accepted while {status}"
        else:
            assert reply.directive is Directive.KILL or isinstance(report, StateWritten), reply
        self._collect()
        return reply.accepted

    # ------------------------------------------------------------ executors

    @precondition(lambda self: any(m.task == TASK_EXECUTE for m in self.queue))
    @rule(data=st.data())
    def start_and_vanish(self, data: st.DataObject) -> None:
        """A worker takes an execute message, starts the phase, writes some
        state if it applies, and is killed before it reports its end."""
        executes = [i for i, m in enumerate(self.queue) if m.task == TASK_EXECUTE]
        self._start_and_vanish(self.queue.pop(data.draw(st.sampled_from(executes))), data)

    def _deliver(self, data: st.DataObject) -> None:
        """The broker delivers; often the worker that takes an execute is
        killed after it starts the phase (otherwise this machine's executors
        would rarely get lost: the base machine's run each phase to its end)."""
        executes = [i for i, m in enumerate(self.queue) if m.task == TASK_EXECUTE]
        if executes and data.draw(st.booleans()):
            self._start_and_vanish(self.queue.pop(data.draw(st.sampled_from(executes))), data)
        super()._deliver(data)

    def _start_and_vanish(self, message: Message, data: st.DataObject) -> None:
        self.delivered.append(message)
        task_id, fence = message.args
        try:
            with self.rt.sessions() as s:
                h = leases.load_handoff(s, self.rt.settings, task_id, fence)
        except ConcurrentChange:
            return  # late: someone else started it, or it moved on
        handle = f"lost:{task_id}:{fence}"
        if not self._report(Started(h.task_id, h.fence, h.phase, handle)):
            return
        key = (h.task_id, h.fence)
        assert key not in self.starts, f"I2: phase {key} started twice"
        self.starts.add(key)
        if h.phase is Phase.APPLY:
            self.apply_starts[h.task_id] += 1
            assert self.apply_starts[h.task_id] == 1, f"I2: apply of {h.task_id} started twice"
        lost = Lost(h, serial=self._next_serial(h))
        for _ in range(data.draw(st.integers(0, 2)) if h.phase is Phase.APPLY else 0):
            self._write_state(lost)
        self.lost.append(lost)

    def _next_serial(self, h: Handoff) -> int:
        with self.rt.sessions() as s:
            ws = s.scalars(select(Task.workspace_id).where(Task.id == h.task_id)).one()
            current = s.scalars(
                select(StateVersion.serial)
                .where(StateVersion.workspace_id == ws)
                .order_by(StateVersion.id.desc())
                .limit(1)
            ).first()
        return (current or 0) + 1

    def _write_state(self, lost: Lost) -> None:
        h = lost.handoff
        content = json.dumps({"serial": lost.serial, "lineage": LINEAGE, "by": h.task_id})
        if self._report(StateWritten(h.task_id, h.fence, lost.serial, LINEAGE, content.encode())):
            lost.serial += 1

    @precondition(lambda self: self.lost)
    @rule(data=st.data())
    def lost_executor_speaks(self, data: st.DataObject) -> None:
        """A lost executor wakes from a pause and reports: a heartbeat, a state
        write or its end. Accepted only while its fence is still current."""
        lost = data.draw(st.sampled_from(self.lost))
        h = lost.handoff
        kind = data.draw(st.sampled_from(["heartbeat", "state", "finish"]))
        if kind == "heartbeat":
            self._report(Heartbeat(h.task_id, h.fence, h.phase))
        elif kind == "state" and h.phase is Phase.APPLY:
            self._write_state(lost)
        elif kind == "finish":
            result = PhaseResult(ok=True, has_changes=data.draw(st.booleans()))
            if self._report(Finished(h.task_id, h.fence, h.phase, result)):
                self.lost.remove(lost)

    # ------------------------------------------------------------ time

    def _age(self, task_id: int, **deadlines: object) -> None:
        with self.rt.transaction() as s:
            s.execute(update(Task).where(Task.id == task_id).values(**deadlines))

    @precondition(lambda self: self.lost)
    @rule(data=st.data())
    def lease_lapses(self, data: st.DataObject) -> None:
        """No heartbeat for a lease TTL: the reconciler re-claims the plan or
        fails the apply (or ends it cancelled, if a cancel was asked)."""
        lost = data.draw(st.sampled_from(self.lost))
        self._age(lost.handoff.task_id, lease_expires_at=utcnow() - timedelta(seconds=1))
        self.sweep()

    @precondition(lambda self: any(x.handoff.phase is Phase.PLAN for x in self.lost))
    @rule(data=st.data())
    def plan_lost_and_taken_over(self, data: st.DataObject) -> None:
        """A lost plan's lease lapses, the reconciler re-claims it, and a new
        executor starts the new attempt at once (and is lost in turn): the
        old executor is now stale while the task runs, which is when a
        missing fence check would let it through."""
        lost = data.draw(st.sampled_from([x for x in self.lost if x.handoff.phase is Phase.PLAN]))
        self._age(lost.handoff.task_id, lease_expires_at=utcnow() - timedelta(seconds=1))
        self.sweep()
        mine = [
            i
            for i, m in enumerate(self.queue)
            if m.task == TASK_EXECUTE and m.args[0] == lost.handoff.task_id
        ]
        if mine:
            self._start_and_vanish(self.queue.pop(mine[-1]), data)

    @precondition(lambda self: self.lost)
    @rule(data=st.data())
    def times_out(self, data: st.DataObject) -> None:
        """The phase ran past its timeout: the next heartbeat says interrupt;
        the executor stops terraform and reports the timeout."""
        lost = data.draw(st.sampled_from(self.lost))
        h = lost.handoff
        limit = self.rt.settings.plan_timeout if h.phase is Phase.PLAN else 1e9
        self._age(h.task_id, phase_started_at=utcnow() - timedelta(seconds=limit + 1))
        fence, status = self._fence_of(h.task_id)
        reply = reports.accept(self.rt, Heartbeat(h.task_id, h.fence, h.phase))
        if fence != h.fence or status not in RUNNING:
            assert not reply.accepted
            return
        if h.phase is Phase.APPLY:  # apply_timeout is the default 7200 s: not yet
            return
        with self.rt.sessions() as s:
            asked = s.scalars(select(Task.cancel_requested_at).where(Task.id == h.task_id)).one()
        expected = StopReason.CANCEL if asked is not None else StopReason.TIMEOUT
        assert (reply.directive, reply.stop) == (Directive.INTERRUPT, expected), reply
        result = PhaseResult(ok=False, error="timed out", stopped=reply.stop)
        assert self._report(Finished(h.task_id, h.fence, h.phase, result))
        self.lost.remove(lost)
        done = tasks.get(self.rt, h.task_id).status
        assert done in {S.FAILED, S.CANCELLED}, f"timed-out task {h.task_id} is {done}"

    @precondition(lambda self: self.lost)
    @rule(data=st.data())
    def cancel_running(self, data: st.DataObject) -> None:
        """A user cancels a started phase: recorded; the executor hears it."""
        lost = data.draw(st.sampled_from(self.lost))
        h = lost.handoff
        fence, status = self._fence_of(h.task_id)
        view = tasks.get(self.rt, h.task_id)
        if fence != h.fence or status not in RUNNING or view.executor_handle is None:
            return
        after = tasks.cancel(self.rt, h.task_id, actor="canceller")
        assert after.status == status and after.cancel_requested_by == "canceller"
        reply = reports.accept(self.rt, Heartbeat(h.task_id, h.fence, h.phase))
        assert (reply.directive, reply.stop) == (Directive.INTERRUPT, StopReason.CANCEL)
        self._collect()

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """The base rule, except that a started phase (a lost executor's) is
        not ended at once: the cancel is recorded for its executor."""
        cancellable = set(tasks.CANCELLABLE) | set(RUNNING)
        tid = self._pick(data, cancellable)
        view = tasks.get(self.rt, tid)
        if view.status in RUNNING and view.executor_handle is not None:
            after = tasks.cancel(self.rt, tid, actor="canceller")
            assert after.status is view.status and after.fence == view.fence
            assert after.cancel_requested_by == "canceller"
            self._collect()
            return
        self._user("cancel", tid, cancellable, task_type=True, to=S.CANCELLED)

    @rule()
    def sweep(self) -> None:
        """The reconciler runs (at any moment: nothing it does may break an
        invariant, and everything it does is owed)."""
        reconciler.sweep(self.rt)
        self._collect()

    @rule()
    def handoffs_go_unanswered(self) -> None:
        """Every unstarted hand-off's message was lost, long ago."""
        with self.rt.transaction() as s:
            s.execute(
                update(Task)
                .where(Task.status.in_([str(x) for x in RUNNING]), Task.executor_handle.is_(None))
                .values(handoff_at=utcnow() - timedelta(days=1))
            )
        self.sweep()

    # ------------------------------------------------------------ invariants

    @invariant()
    def fenced_state_and_exclusive_intervals(self) -> None:
        with self.rt.sessions() as s:
            events = s.execute(
                select(
                    TaskEvent.id,
                    TaskEvent.task_id,
                    TaskEvent.from_status,
                    TaskEvent.to_status,
                    TaskEvent.fence,
                    TaskEvent.at,
                ).order_by(TaskEvent.id)
            ).all()
            rows = {r.id: r for r in s.execute(select(Task.id, Task.type, Task.workspace_id)).all()}
            versions = s.execute(
                select(StateVersion.id, StateVersion.task_id, StateVersion.fence)
            ).all()
        chains: dict[int, list[object]] = defaultdict(list)
        for e in events:
            chains[e.task_id].append(e)
        # I5: a stored state belongs to an apply claim of its task under
        # that very fence.
        for v in versions:
            applying = [
                e
                for e in chains[v.task_id]
                if e.to_status == S.APPLYING and e.fence == v.fence  # type: ignore[attr-defined]
            ]
            assert applying, f"I5: state version {v.id} under fence {v.fence} of no apply"
        # I1 from the events: each workspace's active intervals are disjoint.
        spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for task_id, chain in chains.items():
            if rows[task_id].type != PA:
                continue
            begin = end = None
            for e in chain:
                if e.to_status in ACTIVE_APPLY and begin is None:  # type: ignore[attr-defined]
                    begin = e.id  # type: ignore[attr-defined]
                if begin is not None and e.to_status not in ACTIVE_APPLY:  # type: ignore[attr-defined]
                    end = e.id  # type: ignore[attr-defined]
                    break
            if begin is not None:
                spans[rows[task_id].workspace_id].append((begin, end or 10**18))
        for ws, intervals in spans.items():
            for (_, a_end), (b_begin, _) in itertools.pairwise(sorted(intervals)):
                assert a_end < b_begin, f"I1: workspace {ws} has overlapping plan+applies"

    # ------------------------------------------------------------ the end

    def _drain_and_check_progress(self) -> None:
        """I3: heal (every lost executor's lease lapses, the reconciler runs,
        every message is delivered), then nothing may be left running."""
        for _ in range(10):
            with self.rt.transaction() as s:
                s.execute(
                    update(Task)
                    .where(Task.status.in_([str(x) for x in RUNNING]))
                    .values(
                        lease_expires_at=utcnow() - timedelta(seconds=1),
                        handoff_at=utcnow() - timedelta(days=1),
                    )
                )
            self.lost.clear()
            self.sweep()
            super()._drain_and_check_progress()
            if all(v.status in SETTLED for v in tasks.get_many(self.rt, self.task_ids)):
                break
        views = tasks.get_many(self.rt, self.task_ids)
        stuck = [(v.id, v.status) for v in views if v.status not in SETTLED | {S.PENDING}]
        assert not stuck, f"I3: not settled after healing: {stuck}"


@pytest.mark.parametrize("mode", [DispatchMode.NEW])
def test_lease_state_machine(
    template: Path, tmp_path: Path, redis_url: str, mode: DispatchMode
) -> None:
    run_machine(
        LeaseMachine,
        template=template,
        root=tmp_path,
        redis_url=redis_url,
        mode=mode,
        max_examples=25,
    )
