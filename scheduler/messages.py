"""Broker messages: names, queues, and the publisher interface.

A message is a hint, never the truth. Every handler re-reads the database and
does nothing if the hint is stale (task already claimed, workspace busy), and
the reconciler re-sends hints for work the database says is waiting. So a
lost message delays work and a duplicated one does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from scheduler.errors import InvalidInput

#: Speculative plans: no lock, any free worker claims by id.
QUEUE_PLANS = "runq.plans"
#: Per-workspace dispatch of plan+apply tasks, under the workspace lock.
QUEUE_DISPATCH = "runq.dispatch"
#: Local-mode execution of a claimed phase (long: terraform runs here).
QUEUE_RUNS = "runq.runs"  # execute(task_id, fence)
ALL_QUEUES = (QUEUE_PLANS, QUEUE_DISPATCH, QUEUE_RUNS)

TASK_CLAIM_PLAN = "runq.claim_plan"
TASK_DISPATCH = "runq.dispatch"
TASK_EXECUTE = "runq.execute"
TASK_RECONCILE = "runq.reconcile"


@dataclass(frozen=True)
class Message:
    task: str
    queue: str
    #: JSON-serializable positional arguments (the broker speaks JSON only).
    args: tuple[Any, ...] = ()
    #: What the message is about, in words: Flower shows it in place of the
    #: arguments (Celery's ``argsrepr``), and logs use it. Not compared, so
    #: the same hint described twice is still one hint.
    label: str = field(default="", compare=False)

    def describe(self) -> str:
        """The label, or the arguments cut short: an agent's hand-off carries
        a sealed bundle (configuration and state) that must not be copied
        into Flower or a log line."""
        return self.label or _brief(self.args)


def claim_plan(task_id: int, workspace: str | None = None) -> Message:
    where = f" in {workspace}" if workspace else ""
    return Message(TASK_CLAIM_PLAN, QUEUE_PLANS, (task_id,), f"task {task_id}: plan{where}")


def dispatch(workspace: str) -> Message:
    return Message(TASK_DISPATCH, QUEUE_DISPATCH, (workspace,), f"workspace {workspace}")


def check_id(value: object, what: str) -> int:
    """A message's id argument, or :class:`InvalidInput` (no bools, no strings)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidInput(f"{what} must be a non-negative integer, got {_brief(value)}")
    return value


def check_workspace(value: object) -> str:
    from scheduler.workspaces import NAME_RE

    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidInput(f"workspace must be a workspace name, got {_brief(value)}")
    return value


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


class Publisher(Protocol):
    def publish(self, message: Message) -> str:
        """Send ``message``; return the broker's message id."""
        ...


@runtime_checkable
class QueueDepths(Protocol):
    """A publisher that can also say how many messages wait in a queue."""

    def depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` (None: the broker cannot say now)."""
        ...


class RecordingPublisher:
    """A publisher that keeps messages in a list (unit tests, dry runs)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def publish(self, message: Message) -> str:
        self.sent.append(message)
        return f"recorded-{len(self.sent)}"
