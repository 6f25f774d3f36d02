"""Fakes that ship beside the real executors, for tests and dry runs.

:class:`FakeRunner` honours the same contract as :class:`executors.local.LocalRunner`
(start report first, stop if it is rejected, one finish report with the same
fence) without running terraform; the contract suite in
``tests/unit/test_executor_contract.py`` runs against both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from executors.base import Changes, Finished, Handoff, PhaseResult, Reporter, Started
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
    #: Seconds each phase "runs".
    duration: float = 0.0
    ran: list[Handoff] = field(default_factory=list)

    def run(self, handoff: Handoff, reporter: Reporter) -> None:
        handle = f"fake:{handoff.task_id}:{handoff.phase}"
        if not reporter.report(Started(handoff.task_id, handoff.fence, handoff.phase, handle)):
            return
        self.ran.append(handoff)
        if self.duration:
            time.sleep(self.duration)
        reporter.report(
            Finished(handoff.task_id, handoff.fence, handoff.phase, self.script(handoff))
        )


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
