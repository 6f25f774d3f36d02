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

import base64
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol

from scheduler.states import ExecutionMode, Phase


@dataclass(frozen=True)
class Handoff:
    """Everything an executor needs to run one phase of one task.

    Built by the scheduler from the database, never from a broker message:
    a message carries only the task id and the fence (see
    :func:`scheduler.leases.load_handoff`), so a forged message cannot choose
    what runs.
    """

    task_id: int
    workspace: str
    phase: Phase
    fence: int
    #: A plan task: read-only, takes no state lock, writes no state.
    speculative: bool
    mode: ExecutionMode
    source_dir: str | None = None
    agent_pool: str | None = None
    #: Seconds this phase may run (the workspace's or the default timeout).
    timeout: float | None = None
    #: The configuration version both phases run (its tar.gz's SHA-256).
    config_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        """Which claim of which task this is, in words (Flower, logs)."""
        return f"task {self.task_id}: {self.phase} in {self.workspace}, fence {self.fence}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Handoff:
        return cls(
            **{
                **data,
                "phase": Phase(data["phase"]),
                "mode": ExecutionMode(data["mode"]),
            }
        )


class StopReason(StrEnum):
    """Why an executor stopped terraform early."""

    #: A user cancelled the task (the scheduler said so in a heartbeat reply).
    CANCEL = "cancel"
    #: The phase ran past its timeout.
    TIMEOUT = "timeout"
    #: The worker running it is shutting down (SIGTERM, ``docker stop``).
    SHUTDOWN = "shutdown"
    #: The scheduler no longer recognises this executor's fence.
    STALE = "stale"


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
    #: Set when runq stopped terraform before it finished on its own.
    stopped: StopReason | None = None


@dataclass(frozen=True)
class Started:
    task_id: int
    fence: int
    phase: Phase
    handle: str


@dataclass(frozen=True)
class Heartbeat:
    """The executor is alive and still running the phase: renew its lease."""

    task_id: int
    fence: int
    phase: Phase


@dataclass(frozen=True)
class StateWritten:
    """Terraform wrote a new state (mid-apply or at its end): store it.

    Sent within a moment of each write, so the state a lost apply had
    written is the workspace's state, and the next plan sees what it made.
    """

    task_id: int
    fence: int
    serial: int
    lineage: str
    content: bytes


@dataclass(frozen=True)
class LogWritten:
    """Terraform printed more output: ``content`` starts at byte ``offset``
    of the phase's log. Stored once per offset, so a re-sent chunk is
    harmless, and readable from any host (``runq logs``)."""

    task_id: int
    fence: int
    phase: Phase
    offset: int
    content: bytes


@dataclass(frozen=True)
class Finished:
    task_id: int
    fence: int
    phase: Phase
    result: PhaseResult
    #: A plan's saved plan (the plan file and the provider lock file, a
    #: tar.gz), which its apply will apply on whatever host takes it.
    plan: bytes | None = None


Report = Started | Heartbeat | StateWritten | LogWritten | Finished


class Directive(StrEnum):
    """What the scheduler tells an executor in reply to a report."""

    CONTINUE = "continue"
    #: Interrupt terraform (SIGINT: it saves state and stops), kill it if it
    #: has not stopped after a grace period.
    INTERRUPT = "interrupt"
    #: Kill terraform now.
    KILL = "kill"


@dataclass(frozen=True)
class Reply:
    accepted: bool
    directive: Directive = Directive.CONTINUE
    #: Why, for the executor's log (and the stop reason it reports).
    reason: str = ""
    stop: StopReason | None = None

    @classmethod
    def ok(cls) -> Reply:
        return cls(True)

    @classmethod
    def stale(cls, reason: str) -> Reply:
        # Someone else owns the phase now (it was re-claimed, or ended).
        return cls(False, Directive.KILL, reason, StopReason.STALE)


class Reporter(Protocol):
    """The executor's line to the scheduler. Every report is fenced."""

    def report(self, report: Report) -> Reply:
        """Deliver ``report``. A runner whose :class:`Started` is rejected
        must not run the phase (someone else owns it now); a rejected
        heartbeat or state write means it must stop terraform at once.
        """
        ...


@dataclass(frozen=True)
class Bundle:
    """Everything one phase needs, so it can run on any host with no shared
    disk: the hand-off, the configuration snapshot, the workspace's state and,
    for an apply, the saved plan.

    Local mode builds it from the database when the phase starts; agent and
    Kubernetes modes get it in their (signed) hand-off.
    """

    handoff: Handoff
    #: The configuration version (tar.gz).
    config: bytes
    #: The workspace's newest state when the bundle was built.
    state: bytes | None = None
    #: The plan artifact an apply applies (None for a plan).
    plan: bytes | None = None
    #: The executor handle the claim was already started under: a worker
    #: that claims a local plan and runs it itself starts it in the claim's
    #: own UPDATE, so its runner reports no Started. Never sent: a bundle
    #: that travels to an executor elsewhere is started by that executor.
    started: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "handoff": self.handoff.to_json(),
            "config": b64(self.config),
            "state": b64(self.state),
            "plan": b64(self.plan),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Bundle:
        config = unb64(data["config"])
        if config is None:
            raise ValueError("bundle has no configuration")
        return cls(
            handoff=Handoff.from_json(data["handoff"]),
            config=config,
            state=unb64(data.get("state")),
            plan=unb64(data.get("plan")),
        )


def b64(data: bytes | None) -> str | None:
    """``data`` as base64 text (JSON carries no bytes)."""
    return None if data is None else base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes | None:
    """The bytes of base64 ``text``; TypeError or ValueError if it is not."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, got {type(text).__name__}")
    return base64.b64decode(text, validate=True)


class Runner(Protocol):
    def run(self, bundle: Bundle, reporter: Reporter) -> None:
        """Run one phase, reporting :class:`Started` then :class:`Finished`."""
        ...


class Launcher(Protocol):
    def launch(self, handoff: Handoff) -> str:
        """Hand the phase off; return a handle naming where it went."""
        ...
