"""Execution modes behind one small interface (see :mod:`executors.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from executors.base import Handoff, Launcher, Runner
from scheduler.errors import NotImplementedYet
from scheduler.settings import ExecutorKind
from scheduler.states import ExecutionMode, Phase

if TYPE_CHECKING:
    from scheduler.runtime import Runtime
    from scheduler.settings import Settings


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


def runner_for(settings: Settings, *, kind: str = "local") -> Runner:
    """What runs a phase here (a worker in local mode, an agent): terraform,
    supervised, or with ``RUNQ_EXECUTOR=fake`` the fake executor, whose
    phases last ``RUNQ_FAKE_PLAN_SECONDS`` / ``RUNQ_FAKE_APPLY_SECONDS`` and
    heartbeat as often as a real one."""
    if settings.executor is ExecutorKind.FAKE:
        from executors.fake import FakeRunner

        return FakeRunner(
            durations={
                Phase.PLAN: settings.fake_plan_seconds,
                Phase.APPLY: settings.fake_apply_seconds,
            },
            heartbeat=settings.heartbeat_interval,
        )
    from executors.local import PhaseRunner

    return PhaseRunner(settings, kind=kind)
