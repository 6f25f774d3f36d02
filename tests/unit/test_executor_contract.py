"""The runner contract, for FakeRunner and LocalRunner alike.

A runner reports Started first, carrying the hand-off's task, phase and fence;
if the start is rejected it runs nothing and reports nothing more; otherwise it
reports exactly one Finished with the same task, phase and fence. The
LocalRunner cases here never reach terraform (missing source directory,
missing binary, missing saved plan), so they run anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from executors.base import Finished, Handoff, PhaseResult, Reply, Report, Runner, Started
from executors.fake import DEFAULT_APPLY, DEFAULT_PLAN, FakeRunner
from executors.local import LocalRunner
from scheduler.settings import Settings
from scheduler.states import ExecutionMode, Phase


@dataclass
class ScriptedReporter:
    accept_start: bool = True
    got: list[Report] = field(default_factory=list)

    def report(self, report: Report) -> Reply:
        self.got.append(report)
        if isinstance(report, Started) and not self.accept_start:
            return Reply.stale("someone else has it")
        return Reply.ok()

    def current_state(self, handoff: Handoff) -> bytes | None:
        return None


def handoff(tmp_path: Path, phase: Phase = Phase.PLAN, *, source: bool = True) -> Handoff:
    src = tmp_path / "src"
    if source:
        src.mkdir(exist_ok=True)
        (src / "main.tf").write_text('output "x" { value = 1 }\n')
    return Handoff(
        task_id=41,
        workspace="net",
        phase=phase,
        fence=5,
        speculative=False,
        mode=ExecutionMode.LOCAL,
        source_dir=str(src),
    )


def local(tmp_path: Path) -> LocalRunner:
    return LocalRunner(
        Settings(data_dir=tmp_path / "data", terraform_bin=str(tmp_path / "no-such-terraform"))
    )


RUNNERS: dict[str, Callable[[Path], Runner]] = {
    "fake": lambda _p: FakeRunner(),
    "local": local,
}


@pytest.mark.parametrize("kind", list(RUNNERS))
@pytest.mark.parametrize("phase", list(Phase))
def test_start_then_exactly_one_finish_with_the_same_fence(
    kind: str, phase: Phase, tmp_path: Path
) -> None:
    h = handoff(tmp_path, phase)
    reporter = ScriptedReporter()
    RUNNERS[kind](tmp_path).run(h, reporter)
    assert len(reporter.got) == 2
    started, finished = reporter.got
    assert isinstance(started, Started) and isinstance(finished, Finished)
    assert (started.task_id, started.fence, started.phase) == (h.task_id, h.fence, h.phase)
    assert (finished.task_id, finished.fence, finished.phase) == (h.task_id, h.fence, h.phase)
    assert started.handle
    if not finished.result.ok:
        assert finished.result.error, "a failure says why"


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_rejected_start_runs_nothing(kind: str, tmp_path: Path) -> None:
    h = handoff(tmp_path)
    reporter = ScriptedReporter(accept_start=False)
    runner = RUNNERS[kind](tmp_path)
    runner.run(h, reporter)
    assert [type(r) for r in reporter.got] == [Started]
    assert not (tmp_path / "data").exists(), "no working copy, no log"
    if isinstance(runner, FakeRunner):
        assert runner.ran == []


def test_fake_runner_reports_its_script(tmp_path: Path) -> None:
    failing = PhaseResult(ok=False, error="nope")
    runner = FakeRunner(script=lambda h: failing if h.phase is Phase.APPLY else DEFAULT_PLAN)
    for phase, expected in [(Phase.PLAN, DEFAULT_PLAN), (Phase.APPLY, failing)]:
        reporter = ScriptedReporter()
        runner.run(handoff(tmp_path, phase), reporter)
        assert isinstance(reporter.got[-1], Finished)
        assert reporter.got[-1].result == expected
    assert [h.phase for h in runner.ran] == [Phase.PLAN, Phase.APPLY]
    assert DEFAULT_APPLY.ok and DEFAULT_PLAN.has_changes


def _finished(reporter: ScriptedReporter) -> PhaseResult:
    last = reporter.got[-1]
    assert isinstance(last, Finished)
    return last.result


def test_local_runner_missing_binary_is_a_clear_failure(tmp_path: Path) -> None:
    reporter = ScriptedReporter()
    local(tmp_path).run(handoff(tmp_path), reporter)
    result = _finished(reporter)
    assert not result.ok
    assert result.error is not None
    assert "not found" in result.error and "RUNQ_TERRAFORM_BIN" in result.error
    # The working copy of this plan attempt (task 41, fence 5) was made from
    # the source, with runq's backend override.
    work = tmp_path / "data" / "work" / "41" / "plan-5"
    assert (work / "main.tf").is_file() and (work / "runq_override.tf").is_file()


def test_local_runner_missing_source_dir(tmp_path: Path) -> None:
    reporter = ScriptedReporter()
    local(tmp_path).run(handoff(tmp_path, source=False), reporter)
    result = _finished(reporter)
    assert not result.ok and result.error is not None
    assert "source directory" in result.error and "does not exist" in result.error


def test_local_runner_apply_without_saved_plan(tmp_path: Path) -> None:
    reporter = ScriptedReporter()
    local(tmp_path).run(handoff(tmp_path, Phase.APPLY), reporter)
    result = _finished(reporter)
    assert not result.ok and result.error is not None
    assert "saved plan" in result.error and "missing" in result.error
