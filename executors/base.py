"""The executor interface.

An execution mode is two small pieces:

* a :class:`Launcher`, called by the scheduler right after a claim commits,
  hands a :class:`Handoff` to wherever the phase will run (a Celery queue for
  local mode; an agent pool or a Kubernetes Job later) and returns a handle;
* a :class:`Runner` runs one phase and tells a :class:`Reporter` that it
  started and how it finished.

Every report carries the handoff's fencing token. The scheduler rejects a
report whose token is no longer the task's (the phase was re-claimed), so a
slow or resurrected executor cannot move a task it no longer owns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from scheduler.states import ExecutionMode, Phase


@dataclass(frozen=True)
class Handoff:
    """Everything an executor needs to run one phase of one task."""

    task_id: int
    workspace: str
    phase: Phase
    fence: int
    #: A plan task: read-only, takes no state lock, writes no state.
    speculative: bool
    mode: ExecutionMode
    source_dir: str | None = None
    agent_pool: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Handoff:
        return cls(
            **{
                **data,
                "phase": Phase(data["phase"]),
                "mode": ExecutionMode(data["mode"]),
            }
        )


@dataclass(frozen=True)
class Changes:
    add: int = 0
    change: int = 0
    destroy: int = 0


@dataclass(frozen=True)
class PhaseResult:
    ok: bool
    #: For a plan: would applying it change anything (resources or outputs)?
    has_changes: bool = False
    changes: Changes | None = None
    #: Why it failed, in a line a user can act on.
    error: str | None = None


@dataclass(frozen=True)
class Started:
    task_id: int
    fence: int
    phase: Phase
    handle: str


@dataclass(frozen=True)
class Finished:
    task_id: int
    fence: int
    phase: Phase
    result: PhaseResult


Report = Started | Finished


class Reporter(Protocol):
    def report(self, report: Report) -> bool:
        """Deliver ``report``; False if the scheduler rejected it as stale.

        A runner whose :class:`Started` is rejected must not run the phase:
        someone else owns it now.
        """
        ...


class Runner(Protocol):
    def run(self, handoff: Handoff, reporter: Reporter) -> None:
        """Run one phase, reporting :class:`Started` then :class:`Finished`."""
        ...


class Launcher(Protocol):
    def launch(self, handoff: Handoff) -> str:
        """Hand the phase off; return a handle naming where it went."""
        ...
