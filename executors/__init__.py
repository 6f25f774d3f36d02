"""Execution modes behind one small interface (see :mod:`executors.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from executors.base import Handoff, Launcher
from scheduler.errors import NotImplementedYet
from scheduler.states import ExecutionMode

if TYPE_CHECKING:
    from scheduler.runtime import Runtime


class NotImplementedLauncher:
    def __init__(self, mode: ExecutionMode) -> None:
        self.mode = mode

    def launch(self, handoff: Handoff) -> str:
        raise NotImplementedYet(f"execution mode {self.mode!r} is not implemented yet")


def launcher_for(rt: Runtime, mode: ExecutionMode) -> Launcher:
    """The launcher that hands a claimed phase to ``mode``'s executors."""
    if mode is ExecutionMode.LOCAL:
        from executors.local import LocalLauncher

        return LocalLauncher(rt.publisher)
    if mode is ExecutionMode.AGENT:
        from scheduler.remote import AgentLauncher

        return AgentLauncher(rt)
    if mode is ExecutionMode.K8S:
        from scheduler.k8s_jobs import launcher

        return launcher(rt)
    return NotImplementedLauncher(mode)
