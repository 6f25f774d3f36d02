"""Fakes that ship beside the real executors, for tests and dry runs.

:class:`FakeRunner` honours the same contract as :class:`executors.local.PhaseRunner`
(start report first, stop if it is rejected, one finish report with the same
fence, a saved plan with a plan that an apply will apply) without running
terraform; the contract suite in ``tests/unit/test_executor_contract.py``
runs against both.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from executors.archive import pack_bytes
from executors.base import (
    Bundle,
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


#: A configuration version for bundles no terraform will read.
FAKE_CONFIG = pack_bytes({"main.tf": b"# runq fake configuration\n"})
#: The saved plan a FakeRunner's plan sends (a tar.gz, as a real one is).
FAKE_PLAN = pack_bytes({"runq.tfplan": b"fake saved plan\n"})


def bundle_of(handoff: Handoff, *, state: bytes | None = None, plan: bytes | None = None) -> Bundle:
    """A bundle around ``handoff`` for a runner that reads no configuration
    (an apply gets :data:`FAKE_PLAN` unless ``plan`` is given)."""
    if plan is None and handoff.phase is Phase.APPLY:
        plan = FAKE_PLAN
    return Bundle(handoff=handoff, config=FAKE_CONFIG, state=state, plan=plan)


def needs_plan(handoff: Handoff, result: PhaseResult) -> bool:
    """Does this phase's Finished owe the scheduler a saved plan? (A plan
    that an apply will apply: not speculative, succeeded, has changes.)"""
    return (
        handoff.phase is Phase.PLAN
        and not handoff.speculative
        and result.ok
        and result.stopped is None
        and bool(result.has_changes)
    )


@dataclass
class FakeRunner:
    """Reports scripted results; ``script`` maps a handoff to its result.

    A plan that an apply will apply sends :data:`FAKE_PLAN` as its saved plan,
    as :class:`~executors.local.PhaseRunner` sends the real one.
    """

    script: Callable[[Handoff], PhaseResult] = lambda h: (
        DEFAULT_PLAN if h.phase is Phase.PLAN else DEFAULT_APPLY
    )
    #: Seconds each phase "runs", heartbeating every ``heartbeat`` seconds;
    #: ``durations`` overrides it phase by phase.
    duration: float = 0.0
    durations: Mapping[Phase, float] = field(default_factory=dict)
    heartbeat: float = 0.1
    #: The hand-offs of the bundles whose start was accepted, in order.
    ran: list[Handoff] = field(default_factory=list)
    bundles: list[Bundle] = field(default_factory=list)

    def run(self, bundle: Bundle, reporter: Reporter) -> None:
        handoff = h = bundle.handoff
        # Unique per run, as PhaseRunner's: the scheduler accepts a retried
        # Started of the same run, so two runs must not share a handle.
        handle = bundle.started or f"fake:{handoff.task_id}:{handoff.phase}:{secrets.token_hex(3)}"
        if (
            bundle.started is None
            and not reporter.report(Started(h.task_id, h.fence, h.phase, handle)).accepted
        ):
            return
        self.ran.append(handoff)
        self.bundles.append(bundle)
        deadline = time.monotonic() + self.durations.get(handoff.phase, self.duration)
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
        result = self.script(handoff)
        plan = FAKE_PLAN if needs_plan(handoff, result) else None
        reporter.report(Finished(h.task_id, h.fence, h.phase, result, plan=plan))


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
