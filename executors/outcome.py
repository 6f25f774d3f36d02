"""How a phase run by a Celery task ended, as that task's result.

Flower, and anything else that reads Celery's task events, knows only what
the task function returned or raised. A failed terraform phase is reported to
the scheduler through the executor protocol, and the task function used to
return normally after it, so Flower counted it a SUCCESS. :class:`Watched`
remembers the phase's last reports on their way to the scheduler;
:meth:`Watched.outcome` turns them into a one-line result, or raises
:class:`PhaseFailed` so the task ends as a FAILURE that says why.

The database stays the record: this is only what a monitor is shown.
"""

from __future__ import annotations

from executors.base import Finished, Handoff, PhaseResult, Reply, Report, Reporter, Started
from scheduler.states import Phase


class PhaseFailed(Exception):
    """The phase a task ran did not succeed (terraform failed, it was
    stopped, it could not run, or the scheduler refused its result)."""


class MessageRejected(Exception):
    """A message with the wrong shape, or not from runq's scheduler: it can
    never succeed, so nothing re-sends it."""


class Watched:
    """A reporter that passes every report on and keeps the verdicts."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner
        self.start: Reply | None = None
        self.finished: Finished | None = None
        self.reply: Reply | None = None

    def report(self, report: Report) -> Reply:
        reply = self.inner.report(report)
        if isinstance(report, Started):
            self.start = reply
        elif isinstance(report, Finished):
            self.finished, self.reply = report, reply
        return reply

    def outcome(self, handoff: Handoff) -> str:
        """What the run did, in a line; :class:`PhaseFailed` if it failed.

        A result is shown beside the task's arguments, which say which task
        and phase it is, so it says only the claim and the verdict; a
        failure is also logged on its own, so it says everything."""
        h = handoff
        what = h.label
        if self.start is not None and not self.start.accepted:
            # Someone else owns this claim (a late or duplicate hand-off):
            # nothing was run here, and nothing went wrong.
            return f"fence {h.fence}: not run here ({self.start.reason or 'start refused'})"
        if self.finished is None or self.reply is None:
            raise PhaseFailed(
                f"{what}: ended without a result (the executor stopped early); "
                "its lease will lapse and the reconciler decides"
            )
        if not self.reply.accepted:
            raise PhaseFailed(f"{what}: its result was refused: {self.reply.reason}")
        result = self.finished.result
        if not result.ok:
            raise PhaseFailed(f"{what}: {failure(result)}")
        return f"fence {h.fence}: {success(h, result)}"


def failure(result: PhaseResult) -> str:
    if result.stopped is not None:
        return f"stopped ({result.stopped}): {result.error or 'no detail'}"
    return f"failed: {result.error or 'no detail'}"


def success(h: Handoff, result: PhaseResult) -> str:
    verb = "planned" if h.phase is Phase.PLAN else "applied"
    c = result.changes
    if c is not None and (c.add or c.change or c.destroy):
        return f"{verb}, +{c.add} ~{c.change} -{c.destroy}"
    if h.phase is Phase.PLAN:
        return f"{verb}, {'outputs change' if result.has_changes else 'no changes'}"
    return verb
