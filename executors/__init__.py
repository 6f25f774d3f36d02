"""Execution modes behind one small interface (see :mod:`executors.base`)."""

from __future__ import annotations

from executors.base import Handoff, Launcher
from scheduler.errors import NotImplementedYet
from scheduler.messages import Publisher
from scheduler.states import ExecutionMode


class NotImplementedLauncher:
    def __init__(self, mode: ExecutionMode) -> None:
        self.mode = mode

    def launch(self, handoff: Handoff) -> str:
        raise NotImplementedYet(f"execution mode {self.mode!r} is not implemented yet")


def launcher_for(mode: ExecutionMode, publisher: Publisher) -> Launcher:
    """The launcher that hands a claimed phase to ``mode``'s executors."""
    if mode is ExecutionMode.LOCAL:
        from executors.local import LocalLauncher

        return LocalLauncher(publisher)
    return NotImplementedLauncher(mode)
