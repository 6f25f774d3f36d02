"""Fakes that ship beside the real executors, for tests and dry runs.

:class:`FakeRunner` honours the same contract as :class:`executors.local.LocalRunner`
(start report first, stop if it is rejected, one finish report with the same
fence) without running terraform; the contract suite in
``tests/unit/test_executor_contract.py`` runs against both.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from executors.base import (
    Changes,
    Directive,
    Finished,
    Handoff,
    Heartbeat,
    PhaseResult,
    Reporter,
    Started,
    StopReason,
)
from scheduler.states import Phase

#: A plan that adds one resource, and a clean apply.
DEFAULT_PLAN = PhaseResult(ok=True, has_changes=True, changes=Changes(add=1))
DEFAULT_APPLY = PhaseResult(ok=True)


@dataclass
class FakeRunner:
    """Reports scripted results; ``script`` maps a handoff to its result."""

    script: Callable[[Handoff], PhaseResult] = lambda h: (
        DEFAULT_PLAN if h.phase is Phase.PLAN else DEFAULT_APPLY
    )
    #: Seconds each phase "runs", heartbeating every ``heartbeat`` seconds.
    duration: float = 0.0
    heartbeat: float = 0.1
    ran: list[Handoff] = field(default_factory=list)

    def run(self, handoff: Handoff, reporter: Reporter) -> None:
        # Unique per run, as LocalRunner's: the scheduler accepts a retried
        # Started of the same run, so two runs must not share a handle.
        handle = f"fake:{handoff.task_id}:{handoff.phase}:{secrets.token_hex(3)}"
        h = handoff
        if not reporter.report(Started(h.task_id, h.fence, h.phase, handle)).accepted:
            return
        self.ran.append(handoff)
        deadline = time.monotonic() + self.duration
        while time.monotonic() < deadline:
            # Heartbeat as a real runner does, and obey a stop the same way.
            reply = reporter.report(Heartbeat(h.task_id, h.fence, h.phase))
            if reply.directive is Directive.KILL and not reply.accepted:
                return
            if reply.directive is not Directive.CONTINUE:
                stopped = reply.stop or StopReason.CANCEL
                result = PhaseResult(ok=False, error=reply.reason, stopped=stopped)
                reporter.report(Finished(h.task_id, h.fence, h.phase, result))
                return
            time.sleep(min(self.heartbeat, max(0.0, deadline - time.monotonic())))
        reporter.report(Finished(h.task_id, h.fence, h.phase, self.script(handoff)))


@dataclass
class FakeLauncher:
    """Records hand-offs instead of sending them anywhere."""

    launched: list[Handoff] = field(default_factory=list)
    fail_with: Exception | None = None

    def launch(self, handoff: Handoff) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        self.launched.append(handoff)
        return f"fake:{len(self.launched)}"
