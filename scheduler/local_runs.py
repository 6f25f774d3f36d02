"""What a runq worker runs itself (local mode): an ``execute`` message's
claimed phase, and a ``claim_plan`` message's plan (claimed and run in one go)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass, replace

from executors.base import Bundle, Finished, PhaseResult, Runner, Started
from executors.outcome import PhaseFailed, Watched
from scheduler import bundles, dispatcher, leases
from scheduler.errors import ConcurrentChange, InvalidInput
from scheduler.reports import DirectReporter
from scheduler.runtime import Runtime
from scheduler.states import ExecutionMode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ran:
    """A phase this worker ran, and the reports it made on the way."""

    bundle: Bundle
    watched: Watched

    def outcome(self) -> str:
        """How it ended, in a line; :class:`PhaseFailed` if it failed."""
        return self.watched.outcome(self.bundle.handoff)


@dataclass(frozen=True)
class Note:
    """Why nothing ran in this worker: a stale or duplicate hint, a plan
    handed off to its pool, or (``failed``) a claim that can never run."""

    text: str
    failed: bool = False

    def outcome(self) -> str:
        if self.failed:
            raise PhaseFailed(self.text)
        return self.text


def execute(rt: Runtime, task_id: int, fence: int, runner: Runner | None = None) -> Ran | Note:
    """Run claim ``fence`` of ``task_id`` here, or say why not.

    Everything the phase needs is read from the database, so any worker on
    any host can run it: no disk is shared between the plan and the apply.
    """
    handle = _new_handle()
    try:
        with rt.transaction() as s:
            bundle = bundles.build(s, rt.settings, task_id, fence)
            h = bundle.handoff
            if h.mode is not ExecutionMode.LOCAL:
                raise InvalidInput(f"the runs queue got a {h.mode} task; only local runs here")
            # Started in the bundle's own transaction (the runner then
            # reports none): the same compare-and-set on an empty handle,
            # one transaction fewer before terraform starts.
            if not leases.start(s, rt.settings, Started(task_id, fence, h.phase, handle)).accepted:
                raise ConcurrentChange(f"task {task_id} was started meanwhile")
    except bundles.Unrunnable as exc:
        fail(rt, exc)
        return Note(f"task {task_id}, fence {fence}: cannot run: {exc}", failed=True)
    except ConcurrentChange as exc:
        log.info(
            "execute(task %s, fence %s) skipped: %s (late, duplicate or forged)",
            task_id,
            fence,
            exc,
            extra={"action": "execute_skipped", "task_id": task_id},
        )
        return Note(f"task {task_id}, fence {fence}: skipped: {exc} (late, duplicate or forged)")
    log.info(
        "task %s %s started on %s",
        task_id,
        h.phase,
        handle,
        extra={"action": "phase_started", "task_id": task_id},
    )
    if runner is None:
        from executors import runner_for

        runner = runner_for(rt.settings)
    bundle = replace(bundle, started=handle)
    watched = Watched(DirectReporter(rt))
    runner.run(bundle, watched)
    return Ran(bundle, watched)


def _new_handle() -> str:
    """A local executor handle, unique per run."""
    return f"local:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def run_plan(rt: Runtime, task_id: int, runner: Runner | None = None) -> Ran | Note:
    """Claim plan task ``task_id`` and run it in this worker, if it is a
    local-mode plan; anything else is claimed and handed off as
    :func:`scheduler.dispatcher.claim_plan` does.

    A local plan needs no second broker hop: the claim, its start and its
    bundle are one transaction, and terraform starts right after the commit.
    """
    handle = _new_handle()
    decision = dispatcher.claim_plan(rt, task_id, start_as=handle)
    if decision.unrunnable is not None:
        fail(rt, decision.unrunnable, started=handle)
        return Note(f"task {task_id}: plan cannot run: {decision.unrunnable}", failed=True)
    if decision.bundle is None:
        # Handed off to an agent pool or a Job, or a stale hint.
        return Note(decision.summary())
    if runner is None:
        from executors import runner_for

        runner = runner_for(rt.settings)
    watched = Watched(DirectReporter(rt))
    runner.run(decision.bundle, watched)
    return Ran(decision.bundle, watched)


def fail(rt: Runtime, exc: bundles.Unrunnable, *, started: str | None = None) -> None:
    """End a claim that can never run, through the executor protocol (start,
    then a failed finish), so the task fails now, saying why, instead of
    being re-sent until the hand-off attempts run out. ``started``: the
    handle the claim was already started under (see :func:`run_plan`)."""
    h = exc.handoff
    reporter = DirectReporter(rt)
    handle = started or f"local:{socket.gethostname()}:{os.getpid()}:unrunnable"
    log.warning(
        "task %s %s (fence %s) cannot run: %s",
        h.task_id,
        h.phase,
        h.fence,
        exc,
        extra={"action": "run_impossible", "task_id": h.task_id},
    )
    if not reporter.report(Started(h.task_id, h.fence, h.phase, handle)).accepted:
        return  # someone else has it now: theirs to end
    result = PhaseResult(ok=False, error=f"cannot run the {h.phase}: {exc}")
    reporter.report(Finished(h.task_id, h.fence, h.phase, result))
