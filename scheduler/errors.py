"""Exceptions raised by runq.

All of them derive from :class:`SchedulerError`; the docstring of each class is
its default message::

    SchedulerError
     +-- NotFound
     |    +-- WorkspaceNotFound
     |    +-- TaskNotFound
     +-- InvalidInput
     |    +-- WorkspaceExists
     +-- IllegalTransition
     +-- ConcurrentChange
     |    +-- StaleFence
     +-- NotImplementedYet
     +-- DemoError
     +-- SupervisionError (scheduler.supervise)

User-facing errors (NotFound, InvalidInput, IllegalTransition) change nothing.
ConcurrentChange means another actor moved the task first: callers that race
by design (dispatchers, executors reporting late) treat it as "someone else
won", never as a crash.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """runq could not do that."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class NotFound(SchedulerError):
    """No such object."""


class WorkspaceNotFound(NotFound):
    """No such workspace."""


class TaskNotFound(NotFound):
    """No such task."""


class InvalidInput(SchedulerError):
    """The request is not valid."""


class WorkspaceExists(InvalidInput):
    """A workspace with that name exists already."""


class IllegalTransition(SchedulerError):
    """That status change is not allowed from the task's current status."""


class ConcurrentChange(SchedulerError):
    """Another actor changed the task first."""


class StaleFence(ConcurrentChange):
    """The report carries a fencing token the task no longer holds."""


class NotImplementedYet(SchedulerError):
    """That feature is not implemented yet."""


class DemoError(SchedulerError):
    """The demo could not run."""
