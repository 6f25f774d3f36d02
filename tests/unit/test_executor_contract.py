"""The runner contract, for FakeRunner and PhaseRunner alike.

A runner reports Started first, carrying the bundle's task, phase and fence;
if the start is rejected it runs nothing and reports nothing more; otherwise it
reports exactly one Finished, last, with the same task, phase and fence (in
between, only that claim's output and heartbeats). A plan that an apply will
apply carries its saved plan. The PhaseRunner cases here never reach
terraform (a corrupt configuration, a missing binary, a missing saved plan),
so they run anywhere.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from executors import archive
from executors.base import (
    Bundle,
    Finished,
    Handoff,
    Heartbeat,
    LogWritten,
    PhaseResult,
    Reply,
    Report,
    Runner,
    Started,
)
from executors.fake import DEFAULT_APPLY, DEFAULT_PLAN, FAKE_PLAN, FakeRunner
from executors.local import LOCK_FILE, OVERRIDE_FILE, PLAN_FILE, STATE_FILE, PhaseRunner
from scheduler.settings import Settings
from scheduler.states import ExecutionMode, Phase
from tests.runner_harness import make_bundle, shipped


@dataclass
class ScriptedReporter:
    accept_start: bool = True
    got: list[Report] = field(default_factory=list)

    def report(self, report: Report) -> Reply:
        self.got.append(report)
        if isinstance(report, Started) and not self.accept_start:
            return Reply.stale("someone else has it")
        return Reply.ok()


def bundle(
    tmp_path: Path,
    phase: Phase = Phase.PLAN,
    *,
    speculative: bool = False,
    state: bytes | None = None,
) -> Bundle:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "main.tf").write_text('output "x" { value = 1 }\n')
    h = Handoff(
        task_id=41,
        workspace="net",
        phase=phase,
        fence=5,
        speculative=speculative,
        mode=ExecutionMode.LOCAL,
    )
    return make_bundle(h, src, state=state)


def local(tmp_path: Path, *, keep: bool = False) -> PhaseRunner:
    return PhaseRunner(
        Settings(
            data_dir=tmp_path / "data",
            terraform_bin=str(tmp_path / "no-such-terraform"),
            keep_workdirs=keep,
        )
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
    b = bundle(tmp_path, phase)
    h = b.handoff
    reporter = ScriptedReporter()
    RUNNERS[kind](tmp_path).run(b, reporter)
    started, *between, finished = reporter.got
    assert isinstance(started, Started) and isinstance(finished, Finished)
    assert (started.task_id, started.fence, started.phase) == (h.task_id, h.fence, h.phase)
    assert (finished.task_id, finished.fence, finished.phase) == (h.task_id, h.fence, h.phase)
    assert started.handle
    # In between: only this claim's output and heartbeats (these never reach
    # an apply, so no state is written).
    assert all(isinstance(r, LogWritten | Heartbeat) for r in between), between
    assert all((r.task_id, r.fence, r.phase) == (h.task_id, h.fence, h.phase) for r in between)
    if not finished.result.ok:
        assert finished.result.error, "a failure says why"
        assert finished.plan is None, "a failed plan has nothing to apply"
    elif phase is Phase.PLAN and finished.result.has_changes:
        assert finished.plan, "a plan with changes sends the plan its apply applies"
    else:
        assert finished.plan is None


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_rejected_start_runs_nothing(kind: str, tmp_path: Path) -> None:
    reporter = ScriptedReporter(accept_start=False)
    runner = RUNNERS[kind](tmp_path)
    runner.run(bundle(tmp_path), reporter)
    assert [type(r) for r in reporter.got] == [Started]
    assert not (tmp_path / "data").exists(), "no working copy, no log"
    if isinstance(runner, FakeRunner):
        assert runner.ran == []


def test_fake_runner_reports_its_script(tmp_path: Path) -> None:
    failing = PhaseResult(ok=False, error="nope")
    runner = FakeRunner(script=lambda h: failing if h.phase is Phase.APPLY else DEFAULT_PLAN)
    for phase, expected in [(Phase.PLAN, DEFAULT_PLAN), (Phase.APPLY, failing)]:
        reporter = ScriptedReporter()
        runner.run(bundle(tmp_path, phase), reporter)
        assert isinstance(reporter.got[-1], Finished)
        assert reporter.got[-1].result == expected
    assert [h.phase for h in runner.ran] == [Phase.PLAN, Phase.APPLY]
    assert DEFAULT_APPLY.ok and DEFAULT_PLAN.has_changes


@pytest.mark.parametrize(
    ("speculative", "result", "sends_plan"),
    [
        (False, DEFAULT_PLAN, True),
        (True, DEFAULT_PLAN, False),  # nothing will apply a speculative plan
        (False, PhaseResult(ok=True, has_changes=False), False),
        (False, PhaseResult(ok=False, error="nope"), False),
    ],
)
def test_fake_runner_sends_a_saved_plan_only_when_one_will_be_applied(
    tmp_path: Path, speculative: bool, result: PhaseResult, sends_plan: bool
) -> None:
    reporter = ScriptedReporter()
    FakeRunner(script=lambda _h: result).run(bundle(tmp_path, speculative=speculative), reporter)
    finished = reporter.got[-1]
    assert isinstance(finished, Finished)
    assert finished.plan == (FAKE_PLAN if sends_plan else None)
    if sends_plan:
        assert archive.names(finished.plan or b"") == [PLAN_FILE]


def _finished(reporter: ScriptedReporter) -> PhaseResult:
    last = reporter.got[-1]
    assert isinstance(last, Finished)
    return last.result


def work_copies(tmp_path: Path) -> list[Path]:
    work = tmp_path / "data" / "work"
    return sorted(work.iterdir()) if work.is_dir() else []


def test_local_runner_missing_binary_is_a_clear_failure(tmp_path: Path) -> None:
    reporter = ScriptedReporter()
    local(tmp_path).run(bundle(tmp_path), reporter)
    result = _finished(reporter)
    assert not result.ok
    assert result.error is not None
    assert "not found" in result.error and "RUNQ_TERRAFORM_BIN" in result.error
    # The command it tried is in the output it shipped.
    assert "no-such-terraform init" in shipped(
        [r for r in reporter.got if isinstance(r, LogWritten)]
    )
    # Everything that matters was reported: the working copy is gone.
    assert work_copies(tmp_path) == []


def test_local_runner_working_copy_is_the_bundle(tmp_path: Path) -> None:
    """Kept for debugging (``keep_workdirs``), the working copy of this claim
    (task 41, plan, fence 5, this run) is the configuration version, runq's
    backend override and the bundle's state; an apply's also has the saved
    plan."""
    state = b'{"version": 4, "serial": 7, "lineage": "l", "resources": []}'
    for phase in Phase:
        local(tmp_path, keep=True).run(bundle(tmp_path, phase, state=state), ScriptedReporter())
    plan_copy, apply_copy = (
        next(p for p in work_copies(tmp_path) if p.name.startswith(f"41-{ph}-5-")) for ph in Phase
    )
    for work in (plan_copy, apply_copy):
        assert (work / "main.tf").read_text() == 'output "x" { value = 1 }\n'
        assert 'backend "local"' in (work / OVERRIDE_FILE).read_text()
        assert (work / STATE_FILE).read_bytes() == state
    assert not (plan_copy / PLAN_FILE).exists()
    assert (apply_copy / PLAN_FILE).read_text() == "a saved plan"
    assert not (apply_copy / LOCK_FILE).exists()


def test_every_run_has_its_own_working_copy(tmp_path: Path) -> None:
    """Two runs of the same claim (a duplicated hand-off) never share files."""
    b = bundle(tmp_path)
    for _ in range(2):
        local(tmp_path, keep=True).run(b, ScriptedReporter())
    copies = work_copies(tmp_path)
    assert len(copies) == 2 and all(p.name.startswith("41-plan-5-") for p in copies)


def test_local_runner_corrupt_configuration(tmp_path: Path) -> None:
    reporter = ScriptedReporter()
    b = replace(bundle(tmp_path), config=b"not a tar.gz")
    local(tmp_path).run(b, reporter)
    result = _finished(reporter)
    assert not result.ok and result.error is not None
    assert "archive cannot be unpacked" in result.error


def test_local_runner_apply_without_saved_plan(tmp_path: Path) -> None:
    reporter = ScriptedReporter()
    local(tmp_path).run(replace(bundle(tmp_path, Phase.APPLY), plan=None), reporter)
    result = _finished(reporter)
    assert not result.ok and result.error is not None
    assert "no saved plan" in result.error


def test_local_runner_apply_of_a_saved_plan_that_escapes(tmp_path: Path) -> None:
    """A saved plan is unpacked with the same guard as a configuration."""
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside")
        data = b"x"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    reporter = ScriptedReporter()
    b = replace(bundle(tmp_path, Phase.APPLY), plan=evil.read_bytes())
    local(tmp_path, keep=True).run(b, reporter)
    result = _finished(reporter)
    assert not result.ok and result.error is not None
    assert "archive cannot be unpacked" in result.error
    assert not (tmp_path / "data" / "work" / "outside").exists()
