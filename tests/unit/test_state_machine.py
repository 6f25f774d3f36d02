"""A hypothesis state machine over the whole scheduler, in process.

Random users submit, confirm, discard, cancel, lock and unlock across two
workspaces (one auto-applies); a random "broker" delivers the published
messages in any order, sometimes twice; executors finish with random results,
and sometimes hear of a cancel while they run.
After every step the invariants below are checked against the database. At
the end every message is delivered: nothing may be stuck without a reason.

SQLite file per example (copied from one migrated template); the workspace
lock is the machine's Redis (db 15).
"""

from __future__ import annotations

import itertools
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from executors.base import (
    Changes,
    Directive,
    Finished,
    Handoff,
    PhaseResult,
    Reply,
    Report,
    Started,
)
from executors.fake import FAKE_PLAN, FakeRunner
from scheduler import bundles, dispatcher, reports, tasks, workspaces
from scheduler.errors import ConcurrentChange, IllegalTransition
from scheduler.messages import (
    TASK_CLAIM_PLAN,
    TASK_DISPATCH,
    TASK_EXECUTE,
    Message,
    RecordingPublisher,
)
from scheduler.models import Task, TaskEvent, Workspace
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import (
    ACTIVE_APPLY,
    CLAIMS,
    RUNNING,
    TERMINAL,
    DispatchMode,
    Phase,
    TaskStatus,
    TaskType,
    allowed,
)

S = TaskStatus
PA = TaskType.PLAN_AND_APPLY
WORKSPACES = ("manual", "auto")  # "auto" auto-applies

PLAN_RESULTS = st.sampled_from(
    [
        PhaseResult(ok=True, has_changes=True, changes=Changes(add=1)),
        PhaseResult(ok=True, has_changes=False, changes=Changes()),
        PhaseResult(ok=False, error="Error: plan failed"),
    ]
)
APPLY_RESULTS = st.sampled_from([PhaseResult(ok=True), PhaseResult(ok=False, error="Error: x")])


class SchedulerMachine(RuleBasedStateMachine):
    template: Path
    root: Path
    redis_url: str
    mode: DispatchMode = DispatchMode.NEW
    #: Every execute message is for a claim no one started, unless a user
    #: cancelled it. Machines whose executors get lost (leases lapse, the
    #: reconciler re-sends hand-offs) deliver late ones too.
    strict_delivery: bool = True
    _ids = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        n = next(self._ids)
        db = self.root / f"example-{n}.db"
        shutil.copyfile(self.template, db)
        self.db = db
        self.rt = Runtime(
            Settings(
                database_url=f"sqlite:///{db}",
                redis_url=self.redis_url,
                data_dir=self.root / f"data-{n}",
                dispatch_mode=self.mode,
            ),
            RecordingPublisher(),
            actor="machine",
        )
        #: published, not yet delivered (the broker's queues, unordered)
        self.queue: list[Message] = []
        self.delivered: list[Message] = []
        self.task_ids: list[int] = []
        self.locked: set[str] = set()
        #: tasks seen terminal: (status, number of events) then
        self.finished: dict[int, tuple[str, int]] = {}
        #: hand-offs whose phase an executor ran to the end
        self.ran: list[Handoff] = []

    @initialize()
    def make_workspaces(self) -> None:
        src = self.root / "src"
        src.mkdir(exist_ok=True)
        for name in WORKSPACES:
            workspaces.create(self.rt, name, source_dir=str(src), auto_apply=name == "auto")

    def teardown(self) -> None:
        try:
            self._drain_and_check_progress()
        finally:
            self.rt.close()
            self.db.unlink(missing_ok=True)

    # ------------------------------------------------------------ plumbing

    @property
    def publisher(self) -> RecordingPublisher:
        assert isinstance(self.rt.publisher, RecordingPublisher)
        return self.rt.publisher

    def _collect(self) -> None:
        self.queue.extend(self.publisher.sent)
        self.publisher.sent.clear()

    def _status(self, task_id: int) -> TaskStatus:
        with self.rt.sessions() as s:
            return TaskStatus(s.scalars(select(Task.status).where(Task.id == task_id)).one())

    def _handle(
        self,
        message: Message,
        results: tuple[PhaseResult, PhaseResult] | None,
        redelivery: bool,
        cancel_midway: bool = False,
    ) -> None:
        if message.task == TASK_CLAIM_PLAN:
            dispatcher.claim_plan(self.rt, int(message.args[0]))
        elif message.task == TASK_DISPATCH:
            d = dispatcher.dispatch(self.rt, str(message.args[0]))
            assert d.action != "lock_busy", d
        else:
            assert message.task == TASK_EXECUTE
            self._execute(message, results, redelivery, cancel_midway)
        self._collect()

    def _execute(
        self,
        message: Message,
        results: tuple[PhaseResult, PhaseResult] | None,
        redelivery: bool,
        cancel_midway: bool,
    ) -> None:
        """What a runs-queue worker does with ``execute(task_id, fence)``:
        build the bundle from the database, and run it with a FakeRunner."""
        task_id, fence = message.args
        assert isinstance(task_id, int) and isinstance(fence, int), message
        assert len(message.args) == 2, "execute carries only (task id, fence)"
        before = self._status(task_id)
        try:
            with self.rt.transaction() as s:
                bundle = bundles.build(s, self.rt.settings, task_id, fence)
        except ConcurrentChange:
            # Late or duplicate: only a redelivery, or a fresh hand-off whose
            # unstarted claim a user cancelled meanwhile, may find it gone.
            assert redelivery or before is S.CANCELLED or not self.strict_delivery, (
                f"fresh execute({task_id}, {fence})"
            )
            return
        assert not redelivery or before in RUNNING or not self.strict_delivery
        h = bundle.handoff
        # An apply applies the saved plan its plan sent; a plan has none.
        assert bundle.plan == (FAKE_PLAN if h.phase is Phase.APPLY else None)
        plan_result, apply_result = results or (
            PhaseResult(ok=True, has_changes=True, changes=Changes(add=1)),
            PhaseResult(ok=True),
        )
        runner = FakeRunner(
            script=lambda h: plan_result if h.phase is Phase.PLAN else apply_result,
            # Long enough for one heartbeat, whose reply carries the cancel.
            duration=0.02 if cancel_midway else 0.0,
            heartbeat=0.01,
        )
        reporter: reports.DirectReporter = reports.DirectReporter(self.rt)
        if cancel_midway:
            reporter = CancellingReporter(self.rt)
        runner.run(bundle, reporter)
        if redelivery:
            assert runner.ran == [], "a phase started twice"
            return
        assert runner.ran == [h], "a fresh hand-off was refused"
        self.ran.append(h)
        after = self._status(task_id)
        if cancel_midway:
            # The executor heard of the cancel in a heartbeat reply, stopped
            # and reported: the phase ends cancelled, by the canceller.
            assert after is S.CANCELLED, f"task {task_id} cancelled mid-{h.phase} is {after}"
            with self.rt.sessions() as s:
                last = s.scalars(
                    select(TaskEvent)
                    .where(TaskEvent.task_id == task_id)
                    .order_by(TaskEvent.id.desc())
                    .limit(1)
                ).one()
            assert (last.from_status, last.actor) == (before, "canceller"), last
        else:
            assert after not in RUNNING, f"task {task_id} still {after} after its phase"

    # ------------------------------------------------------------ users

    @rule(ws=st.sampled_from(WORKSPACES), task_type=st.sampled_from(TaskType))
    def submit(self, ws: str, task_type: TaskType) -> None:
        t = tasks.submit(self.rt, ws, task_type)
        self.task_ids.append(t.id)
        self._collect()

    def _pick(self, data: st.DataObject, likely: set[TaskStatus]) -> int:
        """Mostly a task the action suits; sometimes any task at all."""
        with self.rt.sessions() as s:
            suited = list(
                s.scalars(
                    select(Task.id)
                    .where(Task.status.in_([str(x) for x in likely]))
                    .order_by(Task.id)
                )
            )
        if suited and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(suited))
        return data.draw(st.sampled_from(self.task_ids))

    def _user(
        self, verb: str, task_id: int, expect: set[TaskStatus], task_type: bool, to: TaskStatus
    ) -> None:
        """Do ``verb`` to ``task_id``: accepted exactly when legal, and then
        the task is ``to`` at once."""
        before = self._status(task_id)
        with self.rt.sessions() as s:
            kind = TaskType(s.scalars(select(Task.type).where(Task.id == task_id)).one())
        legal = before in expect and (task_type or kind is PA)
        try:
            getattr(tasks, verb)(self.rt, task_id)
        except IllegalTransition:
            assert not legal, f"{verb} of {kind} in {before} refused"
            assert self._status(task_id) is before
        else:
            assert legal, f"{verb} of {kind} in {before} accepted"
            assert self._status(task_id) is to, f"{verb} of {kind} in {before}"
        self._collect()

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data(), verb=st.sampled_from(["confirm", "discard"]))
    def review(self, data: st.DataObject, verb: str) -> None:
        tid = self._pick(data, {S.APPLY_PENDING})
        to = S.APPLY_QUEUED if verb == "confirm" else S.DISCARDED
        self._user(verb, tid, {S.APPLY_PENDING}, task_type=False, to=to)

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        # Between rules no executor is running (the fake ones finish inside
        # one delivery), so a claimed phase is unstarted: a cancel ends it at
        # once, like a task that is not running.
        cancellable = set(tasks.CANCELLABLE) | set(RUNNING)
        tid = self._pick(data, cancellable)
        self._user("cancel", tid, cancellable, task_type=True, to=S.CANCELLED)

    @rule(ws=st.sampled_from(WORKSPACES))
    def toggle_lock(self, ws: str) -> None:
        if ws in self.locked:
            workspaces.unlock(self.rt, ws)
            self.locked.discard(ws)
        else:
            workspaces.lock(self.rt, ws, holder="machine")
            self.locked.add(ws)
        self._collect()

    # ------------------------------------------------------------ the broker

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        self._deliver(data)

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def deliver_more(self, data: st.DataObject) -> None:
        """The broker is busier than the users: a second rule doubles its share."""
        self._deliver(data)

    def _deliver(self, data: st.DataObject) -> None:
        """Deliver a few waiting messages, in any order."""
        for _ in range(data.draw(st.integers(1, 4))):
            if not self.queue:
                return
            message = self.queue.pop(data.draw(st.integers(0, len(self.queue) - 1)))
            results = None
            cancel_midway = False
            if message.task == TASK_EXECUTE:
                # The message names no phase: the runner's script picks by the
                # hand-off read from the database.
                results = (data.draw(PLAN_RESULTS), data.draw(APPLY_RESULTS))
                cancel_midway = data.draw(st.integers(0, 7)) == 0
            self.delivered.append(message)
            self._handle(message, results, redelivery=False, cancel_midway=cancel_midway)

    @precondition(lambda self: self.delivered)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        message = data.draw(st.sampled_from(self.delivered))
        dup = PhaseResult(ok=False, error="duplicate")
        self._handle(message, (dup, dup), redelivery=True)

    @precondition(lambda self: self.task_ids)
    @rule(data=st.data())
    def spurious(self, data: st.DataObject) -> None:
        """A hint nobody published (a reconciler's re-send, a stray worker)."""
        # claim_plan is the new mode's lock-free path; legacy never sends it.
        if self.mode is DispatchMode.LEGACY or data.draw(st.booleans()):
            dispatcher.dispatch(self.rt, data.draw(st.sampled_from(WORKSPACES)))
        else:
            dispatcher.claim_plan(self.rt, data.draw(st.sampled_from(self.task_ids)))
        self._collect()

    @precondition(lambda self: self.ran)
    @rule(data=st.data())
    def late_report(self, data: st.DataObject) -> None:
        """An executor that already finished reports again: always refused."""
        h = data.draw(st.sampled_from(self.ran))
        before = self._status(h.task_id)
        reply = reports.accept(self.rt, Finished(h.task_id, h.fence, h.phase, PhaseResult(ok=True)))
        assert not reply.accepted
        assert reply.directive is Directive.KILL
        assert self._status(h.task_id) is before
        self._collect()

    # ------------------------------------------------------------ invariants

    def _rows(self) -> tuple[list[Any], dict[int, list[Any]]]:
        with self.rt.sessions() as s:
            rows = s.execute(
                select(
                    Task.id, Task.type, Task.status, Task.fence, Task.queue_seq, Workspace.name
                ).join(Workspace, Workspace.id == Task.workspace_id)
            ).all()
            evs: dict[int, list[Any]] = defaultdict(list)
            for e in s.execute(
                select(
                    TaskEvent.id,
                    TaskEvent.task_id,
                    TaskEvent.from_status,
                    TaskEvent.to_status,
                    TaskEvent.fence,
                ).order_by(TaskEvent.id)
            ):
                evs[e.task_id].append(e)
        return list(rows), evs

    @invariant()
    def database_is_consistent(self) -> None:
        rows, evs = self._rows()
        assert {r.id for r in rows} == set(self.task_ids)
        by_id = {r.id: r for r in rows}

        active: dict[str, list[int]] = defaultdict(list)
        for r in rows:
            if r.type == PA and r.status in ACTIVE_APPLY:
                active[r.name].append(r.id)
        for ws, ids in active.items():
            assert len(ids) <= 1, f"{ws}: several active plan+applies {ids}"

        for r in rows:
            chain = evs[r.id]
            assert chain[0].from_status is None and chain[0].to_status == S.PENDING
            for prev, nxt in itertools.pairwise(chain):
                assert nxt.from_status == prev.to_status, f"task {r.id}: broken chain"
                assert TaskStatus(nxt.to_status) in allowed(
                    TaskType(r.type), TaskStatus(nxt.from_status)
                ), f"task {r.id}: illegal {nxt.from_status} -> {nxt.to_status}"
                # A claim hands the phase to a new owner: a new fence. Any
                # other move keeps it.
                claim = (TaskStatus(nxt.from_status), TaskStatus(nxt.to_status)) in CLAIMS
                assert nxt.fence == prev.fence + (1 if claim else 0), f"task {r.id}: fence"
            assert chain[-1].to_status == r.status, f"task {r.id}: events disagree with status"
            assert chain[-1].fence == r.fence
            if r.type == TaskType.PLAN:
                assert r.status not in {S.APPLY_PENDING, S.APPLY_QUEUED, S.APPLYING, S.APPLIED}

            if r.id in self.finished:
                assert self.finished[r.id] == (r.status, len(chain)), f"task {r.id} left terminal"
            elif r.status in TERMINAL:
                self.finished[r.id] = (r.status, len(chain))

        if self.mode is DispatchMode.LEGACY:
            # Every task holds its workspace: one at a time, plans included.
            holding: dict[str, list[int]] = defaultdict(list)
            for r in rows:
                if r.status in ACTIVE_APPLY:
                    holding[r.name].append(r.id)
            for ws, ids in holding.items():
                assert len(ids) <= 1, f"{ws}: legacy mode runs {ids} at once"

        # FIFO: plan+applies leave the queue in queue order, per workspace.
        claims: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for tid, chain in evs.items():
            r = by_id[tid]
            if r.type != PA:
                continue
            for e in chain:
                if e.from_status == S.PENDING and e.to_status == S.PLANNING:
                    claims[r.name].append((e.id, r.queue_seq))
        for ws, seq in claims.items():
            order = [q for _, q in sorted(seq)]
            assert order == sorted(order), f"{ws}: claimed out of queue order {order}"
            waiting = [
                r.queue_seq for r in rows if r.name == ws and r.type == PA and r.status == S.PENDING
            ]
            if waiting and order:
                assert min(waiting) > max(order), f"{ws}: a later plan+apply overtook one"

    # ------------------------------------------------------------ the end

    def _drain_and_check_progress(self) -> None:
        for ws in sorted(self.locked):
            workspaces.unlock(self.rt, ws)
        self.locked.clear()
        self._collect()
        for _ in range(1000):
            if not self.queue:
                break
            message = self.queue.pop(0)
            self._handle(message, None, redelivery=False)
        assert not self.queue, "messages keep coming"
        self.database_is_consistent()

        rows, _ = self._rows()
        legacy = self.mode is DispatchMode.LEGACY
        for r in rows:
            assert r.status not in {S.PLANNING, S.APPLYING, S.APPLY_QUEUED}, (
                f"task {r.id} stuck in {r.status} with every message delivered"
            )
        for ws in WORKSPACES:
            # New mode: only plan+applies queue, and only behind one awaiting
            # confirmation. Legacy: every task queues behind it.
            queued = [
                r.id
                for r in rows
                if r.name == ws and r.status == S.PENDING and (legacy or r.type == PA)
            ]
            blocker = [
                r.id for r in rows if r.name == ws and r.type == PA and r.status in ACTIVE_APPLY
            ]
            if queued:
                assert blocker, f"{ws}: {queued} pending with nothing in the way"
            if not legacy:
                stuck = [
                    r.id for r in rows if r.name == ws and r.type != PA and r.status == S.PENDING
                ]
                assert not stuck, f"{ws}: plans {stuck} never claimed"


class CancellingReporter(reports.DirectReporter):
    """A user cancels the task right after its executor started the phase."""

    def report(self, report: Report) -> Reply:
        reply = super().report(report)
        if isinstance(report, Started) and reply.accepted:
            view = tasks.cancel(self.rt, report.task_id, actor="canceller")
            # Started: the request is recorded; the executor stops the phase.
            assert view.status in RUNNING and view.cancel_requested_by == "canceller"
        return reply


@pytest.mark.parametrize("mode", list(DispatchMode))
def test_scheduler_state_machine(
    template: Path, tmp_path: Path, redis_url: str, mode: DispatchMode
) -> None:
    run_machine(
        SchedulerMachine,
        template=template,
        root=tmp_path,
        redis_url=redis_url,
        mode=mode,
        max_examples=25 if mode is DispatchMode.NEW else 15,
    )


def run_machine(
    base: type[SchedulerMachine],
    *,
    template: Path,
    root: Path,
    redis_url: str,
    mode: DispatchMode,
    max_examples: int,
) -> None:
    """Run ``base`` (or a subclass) against copies of ``template``."""
    machine = type(
        "Machine",
        (base,),
        {"template": template, "root": root, "redis_url": redis_url, "mode": mode},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            derandomize=False,
        ),
    )
