"""What a runq worker does with an ``execute`` message (local mode)."""

from __future__ import annotations

import logging
import os
import socket

from executors.base import Bundle, Finished, PhaseResult, Runner, Started
from scheduler import bundles
from scheduler.errors import ConcurrentChange, InvalidInput
from scheduler.reports import DirectReporter
from scheduler.runtime import Runtime
from scheduler.states import ExecutionMode

log = logging.getLogger(__name__)


def execute(rt: Runtime, task_id: int, fence: int, runner: Runner | None = None) -> Bundle | None:
    """Run claim ``fence`` of ``task_id`` here; None if it is not ours to run.

    Everything the phase needs is read from the database, so any worker on
    any host can run it: no disk is shared between the plan and the apply.
    """
    try:
        with rt.transaction() as s:
            bundle = bundles.build(s, rt.settings, task_id, fence)
    except bundles.Unrunnable as exc:
        fail(rt, exc)
        return None
    except ConcurrentChange as exc:
        log.info(
            "execute(task %s, fence %s) skipped: %s (late, duplicate or forged)",
            task_id,
            fence,
            exc,
            extra={"action": "execute_skipped", "task_id": task_id},
        )
        return None
    if bundle.handoff.mode is not ExecutionMode.LOCAL:
        raise InvalidInput(f"the runs queue got a {bundle.handoff.mode} task; only local runs here")
    if runner is None:
        from executors import runner_for

        runner = runner_for(rt.settings)
    runner.run(bundle, DirectReporter(rt))
    return bundle


def fail(rt: Runtime, exc: bundles.Unrunnable) -> None:
    """End a claim that can never run, through the executor protocol (start,
    then a failed finish), so the task fails now, saying why, instead of
    being re-sent until the hand-off attempts run out."""
    h = exc.handoff
    reporter = DirectReporter(rt)
    handle = f"local:{socket.gethostname()}:{os.getpid()}:unrunnable"
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
