"""RUNQ_EXECUTOR picks what runs a phase: terraform (the default) or the fake
executor, with its phase durations as settings."""

from __future__ import annotations

import time

import pytest

from executors import runner_for
from executors.base import Finished, Handoff, Heartbeat, Reply, Report, Started
from executors.fake import FAKE_PLAN, FakeRunner, bundle_of
from executors.local import PhaseRunner
from scheduler.settings import ExecutorKind, Settings
from scheduler.states import ExecutionMode, Phase


def test_terraform_by_default(env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.executor is ExecutorKind.TERRAFORM
    assert (s.fake_plan_seconds, s.fake_apply_seconds) == (0.0, 0.0)
    runner = runner_for(s, kind="agent:a1")
    assert isinstance(runner, PhaseRunner) and runner.kind == "agent:a1"


def test_fake_from_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("RUNQ_EXECUTOR", "FAKE")
    env.setenv("RUNQ_FAKE_PLAN_SECONDS", "1.5")
    env.setenv("RUNQ_FAKE_APPLY_SECONDS", "0.25")
    env.setenv("RUNQ_HEARTBEAT_INTERVAL", "0.5")
    s = Settings()
    assert s.executor is ExecutorKind.FAKE
    runner = runner_for(s)
    assert isinstance(runner, FakeRunner)
    assert runner.durations == {Phase.PLAN: 1.5, Phase.APPLY: 0.25}
    assert runner.heartbeat == 0.5


class Recorder:
    def __init__(self) -> None:
        self.got: list[Report] = []

    def report(self, report: Report) -> Reply:
        self.got.append(report)
        return Reply.ok()


@pytest.mark.parametrize("phase", list(Phase))
def test_the_fake_phase_lasts_its_setting_and_heartbeats(phase: Phase) -> None:
    s = Settings(
        executor=ExecutorKind.FAKE,
        fake_plan_seconds=0.3 if phase is Phase.PLAN else 0.0,
        fake_apply_seconds=0.3 if phase is Phase.APPLY else 0.0,
        heartbeat_interval=0.1,
    )
    h = Handoff(
        task_id=7,
        workspace="net",
        phase=phase,
        fence=3,
        speculative=False,
        mode=ExecutionMode.LOCAL,
    )
    reporter = Recorder()
    began = time.monotonic()
    runner_for(s).run(bundle_of(h), reporter)
    assert time.monotonic() - began >= 0.3
    assert isinstance(reporter.got[0], Started)
    assert any(isinstance(r, Heartbeat) for r in reporter.got)
    last = reporter.got[-1]
    assert isinstance(last, Finished) and last.result.ok and last.fence == 3
    # A plan that an apply will apply sends its saved plan, as terraform's does.
    assert last.plan == (FAKE_PLAN if phase is Phase.PLAN else None)
