"""The runner's supervision of terraform, with real processes.

A :class:`~executors.local.PhaseRunner` runs one phase's bundle against a fake
"terraform" (a small shell script, see :mod:`tests.runner_harness`) and
reports to a :class:`ScriptedReporter` that records every report and answers
as the scheduler would: go on, interrupt (cancel, timeout), kill (force
cancel), or stale. Where the runner process itself must be signalled or
killed, it runs in a ``python -c`` child that reports to a JSON-lines file.

No server is needed: these run anywhere with ``sh`` and ``/proc``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from executors import archive
from executors.base import (
    Bundle,
    Directive,
    Finished,
    Handoff,
    Heartbeat,
    LogWritten,
    Reply,
    Report,
    Started,
    StateWritten,
    StopReason,
)
from executors.local import PLAN_FILE, STATE_FILE, PhaseRunner
from scheduler.settings import Settings
from scheduler.states import ExecutionMode, Phase
from tests.runner_harness import (
    GRACEFUL,
    SLEEPER,
    STUBBORN,
    Answer,
    ScriptedReporter,
    alive,
    from_heartbeat,
    make_bundle,
    marks_log,
    read_jsonl,
    reports_of,
    script_pid,
    start_child,
    wait_for,
    working_copies,
    write_script,
)

HEARTBEAT = 0.2
KILL_GRACE = 1.5
SHUTDOWN_GRACE = 1.0
#: Slack for "at once": a few runner ticks (0.2 s) and process start-up.
PROMPT = 1.0


@dataclass
class Rig:
    root: Path
    settings: Settings
    marks: Path

    def bundle(
        self,
        phase: Phase = Phase.PLAN,
        *,
        timeout: float | None = None,
        state: bytes | None = None,
    ) -> Bundle:
        """The phase's bundle: an apply's carries a saved plan."""
        src = self.root / "src"
        src.mkdir(exist_ok=True)
        (src / "main.tf").write_text("# the fake terraform reads nothing\n")
        h = Handoff(
            task_id=7,
            workspace="net",
            phase=phase,
            fence=3,
            speculative=False,
            mode=ExecutionMode.LOCAL,
            timeout=timeout,
        )
        return make_bundle(h, src, state=state)

    def run(self, bundle: Bundle, reporter: ScriptedReporter) -> float:
        """Run the phase in this process; return how long it took."""
        started = time.monotonic()
        PhaseRunner(self.settings).run(bundle, reporter)
        return time.monotonic() - started

    @property
    def env(self) -> dict[str, str]:
        """The same settings for a runner process."""
        s = self.settings
        return {
            "RUNQ_DATA_DIR": str(s.data_dir),
            "RUNQ_TERRAFORM_BIN": s.terraform_bin,
            "RUNQ_HEARTBEAT_INTERVAL": str(s.heartbeat_interval),
            "RUNQ_KILL_GRACE": str(s.kill_grace),
            "RUNQ_SHUTDOWN_GRACE": str(s.shutdown_grace),
        }


def rig(root: Path, body: str, *, heartbeat: float = HEARTBEAT) -> Rig:
    script, marks = write_script(root, body)
    settings = Settings(
        data_dir=root / "data",
        terraform_bin=str(script),
        heartbeat_interval=heartbeat,
        kill_grace=KILL_GRACE,
        shutdown_grace=SHUTDOWN_GRACE,
    )
    return Rig(root, settings, marks)


def only_finished(reporter: ScriptedReporter) -> Finished:
    [finished] = reporter.finished
    assert reporter.log[-1].report is finished, "a report came after Finished"
    return finished


def stop_reply(reason: StopReason, directive: Directive = Directive.INTERRUPT) -> Reply:
    return Reply(True, directive, f"{reason} requested by the test", reason)


# ------------------------------------------------ (1) interrupt, then kill


@pytest.mark.parametrize("reason", [StopReason.CANCEL, StopReason.TIMEOUT])
def test_interrupt_reply_sends_sigint_and_terraform_stops(
    tmp_path: Path, reason: StopReason
) -> None:
    r = rig(tmp_path, GRACEFUL)
    reporter = ScriptedReporter(from_heartbeat(3, stop_reply(reason)))
    r.run(r.bundle(), reporter)

    finished = only_finished(reporter)
    assert finished.result.ok is False
    assert finished.result.stopped is reason
    assert finished.result.error == f"{reason} requested by the test"
    assert marks_log(r.marks) == ["running", "interrupted"]
    told = reporter.first(lambda x: x.reply.directive is Directive.INTERRUPT)
    # It exited on SIGINT by itself: no wait for the kill grace.
    assert reporter.log[-1].at - told.at < PROMPT
    assert not alive(script_pid(r.marks))


@pytest.mark.parametrize("reason", [StopReason.CANCEL, StopReason.TIMEOUT])
def test_terraform_ignoring_sigint_is_killed_after_kill_grace(
    tmp_path: Path, reason: StopReason
) -> None:
    r = rig(tmp_path, STUBBORN)
    reporter = ScriptedReporter(from_heartbeat(3, stop_reply(reason)))
    r.run(r.bundle(), reporter)

    finished = only_finished(reporter)
    assert finished.result.stopped is reason
    assert finished.result.ok is False
    assert marks_log(r.marks) == ["running", "interrupted"]  # it got SIGINT, and ran on
    told = reporter.first(lambda x: x.reply.directive is Directive.INTERRUPT)
    took = reporter.log[-1].at - told.at
    assert KILL_GRACE <= took < KILL_GRACE + PROMPT, took
    # (The INTERRUPT replies to later heartbeats did not restart the grace.)
    assert not alive(script_pid(r.marks))


# ------------------------------------------------ (2) kill, stale


def test_kill_reply_kills_at_once(tmp_path: Path) -> None:
    r = rig(tmp_path, STUBBORN)
    force = stop_reply(StopReason.CANCEL, Directive.KILL)
    reporter = ScriptedReporter(from_heartbeat(3, force))
    r.run(r.bundle(), reporter)

    finished = only_finished(reporter)
    assert finished.result.stopped is StopReason.CANCEL
    # SIGKILL, no SIGINT first, and no waiting for the grace.
    assert marks_log(r.marks) == ["running"]
    told = reporter.first(lambda x: x.reply.directive is Directive.KILL)
    assert reporter.log[-1].at - told.at < PROMPT
    assert not alive(script_pid(r.marks))


def stale_from(is_first_stale: type[Report], n: int = 1) -> Answer:
    """Accept until the ``n``-th report of kind ``is_first_stale``; from then
    on, everything is stale (as the scheduler answers a superseded fence)."""
    seen = {"count": 0, "stale": False}

    def answer(report: Report, _beats: int) -> Reply:
        if isinstance(report, is_first_stale):
            seen["count"] += 1
            if seen["count"] >= n:
                seen["stale"] = True
        return Reply.stale("re-claimed by the test") if seen["stale"] else Reply.ok()

    return answer


def test_stale_heartbeat_kills_terraform_and_nothing_more_is_reported(tmp_path: Path) -> None:
    r = rig(tmp_path, STUBBORN)
    reporter = ScriptedReporter(stale_from(Heartbeat, 3))
    took = r.run(r.bundle(), reporter)

    assert reporter.finished == []
    [stale] = [x for x in reporter.log if not x.reply.accepted]
    assert reporter.log[-1] is stale, "reports after the stale reply"
    assert isinstance(stale.report, Heartbeat)
    assert marks_log(r.marks) == ["running"]
    assert not alive(script_pid(r.marks))
    assert took < 3 * HEARTBEAT + PROMPT


# ------------------------------------------------ (3) local timeout


def test_local_timeout_interrupts_without_the_scheduler(tmp_path: Path) -> None:
    r = rig(tmp_path, GRACEFUL)
    # The scheduler never says "timeout" (a database outage, say).
    reporter = ScriptedReporter()
    took = r.run(r.bundle(timeout=0.6), reporter)

    finished = only_finished(reporter)
    assert finished.result.stopped is StopReason.TIMEOUT
    assert finished.result.error == "plan timed out after 0.6s"
    assert marks_log(r.marks) == ["running", "interrupted"]
    assert 0.6 <= took < 0.6 + PROMPT, took


def test_local_timeout_kills_a_stubborn_terraform(tmp_path: Path) -> None:
    r = rig(tmp_path, STUBBORN)
    reporter = ScriptedReporter()
    took = r.run(r.bundle(timeout=0.6), reporter)

    assert only_finished(reporter).result.stopped is StopReason.TIMEOUT
    assert 0.6 + KILL_GRACE <= took < 0.6 + KILL_GRACE + PROMPT, took
    assert not alive(script_pid(r.marks))


# ------------------------------------------------ (4) SIGTERM, (5) parent death


@pytest.fixture
def children() -> Iterator[list[int]]:
    """Runner processes a test started: killed at the end if still there."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.mark.parametrize(
    ("body", "marks", "lower", "upper"),
    [
        (GRACEFUL, ["running", "interrupted"], 0.0, PROMPT),
        # Killed after the shutdown grace (1 s), not the kill grace (30 s).
        (STUBBORN, ["running", "interrupted"], SHUTDOWN_GRACE, SHUTDOWN_GRACE + PROMPT),
    ],
    ids=["graceful", "stubborn"],
)
def test_sigterm_to_the_runner_interrupts_terraform_within_shutdown_grace(
    tmp_path: Path,
    children: list[int],
    body: str,
    marks: list[str],
    lower: float,
    upper: float,
) -> None:
    r = rig(tmp_path, body)
    env = {**r.env, "RUNQ_KILL_GRACE": "30"}
    reports = tmp_path / "reports.jsonl"
    proc = start_child(r.bundle(Phase.APPLY), reports, env=env, log=tmp_path / "child.log")
    children.append(proc.pid)
    pid = script_pid(r.marks)

    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(10)
    took = time.time() - sent

    log = (tmp_path / "child.log").read_text()
    assert code == 0, log  # SIGTERM did not kill the runner: it finished the phase
    assert marks_log(r.marks) == marks
    assert not alive(pid)
    records = read_jsonl(reports)
    assert records[0]["kind"] == "Started"
    assert records[-1]["kind"] == "Finished", records
    result = records[-1]["result"]
    assert result["ok"] is False
    assert result["stopped"] == str(StopReason.SHUTDOWN)
    assert result["error"] == "the worker is shutting down"
    assert lower <= took < upper + 0.5, took  # + interpreter exit


def test_terraform_dies_with_its_runner(tmp_path: Path, children: list[int]) -> None:
    r = rig(tmp_path, SLEEPER)
    reports = tmp_path / "reports.jsonl"
    proc = start_child(r.bundle(), reports, env=r.env, log=tmp_path / "child.log")
    children.append(proc.pid)
    pid = script_pid(r.marks)
    assert alive(pid)
    # A live runner is heartbeating: the fake terraform is its child.
    wait_for("a heartbeat", lambda: reports_of("Heartbeat", read_jsonl(reports)))

    killed = time.monotonic()
    proc.kill()
    proc.wait(10)
    wait_for("terraform to die with its runner", lambda: not alive(pid), timeout=2.0)
    gone = time.monotonic() - killed
    print(f"\nterraform (pid {pid}) gone {gone:.2f}s after its runner was SIGKILLed")
    assert [x["kind"] for x in read_jsonl(reports)][-1] == "Heartbeat"  # no Finished


# ------------------------------------------------ (6) state-file watching


def state_doc(serial: int, lineage: str = "lineage-1", resources: int | None = None) -> str:
    n = serial if resources is None else resources
    return json.dumps(
        {
            "version": 4,
            "terraform_version": "1.0.3",
            "serial": serial,
            "lineage": lineage,
            "outputs": {},
            "resources": [
                {"mode": "managed", "type": "null_resource", "name": f"r{i}", "instances": []}
                for i in range(n)
            ],
        },
        indent=2,
    )


def writer(*steps: tuple[str, float]) -> str:
    """A fake apply writing each text to the state file in place (as
    terraform's local backend does), then pausing; a step's text may be
    any prefix of a document (a write caught half-way)."""
    lines = []
    for i, (text, pause) in enumerate(steps):
        lines.append(f"cat > {STATE_FILE} <<'RUNQ_EOF_{i}'\n{text}\nRUNQ_EOF_{i}")
        lines.append(f'echo "wrote-{i}" >> "$marks/log"')
        lines.append(f"sleep {pause}")
    lines.append('echo "done" >> "$marks/log"')
    return "\n".join(lines) + "\n"


def state_writes(reporter: ScriptedReporter) -> list[StateWritten]:
    return reporter.of(StateWritten)


def test_every_new_serial_is_reported_in_order_and_a_torn_write_is_skipped(
    tmp_path: Path,
) -> None:
    docs = {n: state_doc(n) for n in (1, 2, 3)}
    torn = docs[2][: len(docs[2]) // 2]
    body = writer(
        (docs[1], 0.6),
        # Caught half-written for several ticks: not JSON, so not reported.
        (torn, 0.8),
        (docs[2], 0.6),
        (docs[3], 0.6),
    )
    r = rig(tmp_path, body)
    # The stored state the apply starts from (in its bundle): never reported back.
    reporter = ScriptedReporter()
    r.run(r.bundle(Phase.APPLY, state=state_doc(0).encode()), reporter)

    assert marks_log(r.marks) == ["wrote-0", "wrote-1", "wrote-2", "wrote-3", "done"]
    finished = only_finished(reporter)
    assert finished.result.ok, finished.result.error
    writes = state_writes(reporter)
    assert [w.serial for w in writes] == [1, 2, 3]
    assert {w.lineage for w in writes} == {"lineage-1"}
    # Each as written, whole (the file ends with the heredoc's newline).
    assert [w.content.decode().rstrip("\n") for w in writes] == [docs[1], docs[2], docs[3]]
    # Reported while terraform ran (within a tick or two of the write), not
    # only at its end.
    ends = [x.at for x in reporter.log if isinstance(x.report, StateWritten)]
    assert ends[-1] < reporter.log[-1].at
    assert ends[1] - ends[0] >= 0.6 + 0.8 - 2 * 0.2


def test_no_state_is_reported_after_a_stale_reply(tmp_path: Path) -> None:
    body = writer(
        (state_doc(1), 0.6),
        (state_doc(2), 0.6),
        (state_doc(3), 0.6),
        (state_doc(4), 5),
    )
    # Heartbeats far apart: stopping terraform must not wait for the next one.
    r = rig(tmp_path, body, heartbeat=5.0)
    # The second state write is refused as stale: a newer holder owns the task.
    reporter = ScriptedReporter(stale_from(StateWritten, 2))
    took = r.run(r.bundle(Phase.APPLY), reporter)

    assert [w.serial for w in state_writes(reporter)] == [1, 2]
    [stale] = [x for x in reporter.log if not x.reply.accepted]
    assert isinstance(stale.report, StateWritten)
    assert reporter.log[-1] is stale, [type(x.report).__name__ for x in reporter.log]
    assert reporter.finished == []
    # Terraform was stopped at once: it wrote nothing more.
    assert marks_log(r.marks) == ["wrote-0", "wrote-1"]
    assert not alive(script_pid(r.marks))
    assert took < 1.2 + PROMPT


def test_stale_heartbeat_during_apply_stops_state_reports(tmp_path: Path) -> None:
    body = writer((state_doc(1), 0.6), (state_doc(2), 0.6), (state_doc(3), 5))
    r = rig(tmp_path, body)
    reporter = ScriptedReporter(stale_from(Heartbeat, 4))  # ~0.8 s in
    r.run(r.bundle(Phase.APPLY), reporter)

    serials = [w.serial for w in state_writes(reporter)]
    stale = reporter.first(lambda x: not x.reply.accepted)
    assert reporter.log[-1] is stale
    assert serials == [1, 2][: len(serials)] and serials
    assert reporter.finished == []
    assert not alive(script_pid(r.marks))


def test_started_rejected_runs_nothing(tmp_path: Path) -> None:
    r = rig(tmp_path, SLEEPER)
    reporter = ScriptedReporter(stale_from(Started))
    r.run(r.bundle(), reporter)
    assert [type(x.report) for x in reporter.log] == [Started]
    assert not (r.marks / "pid").exists()


# ------------------------------------------------ one working copy per plan attempt

SHARED = f"""\
case "$1" in
  plan) echo "planned under fence $RUNQ_FENCE" > {PLAN_FILE}; exit 2 ;;
esac
cat > {STATE_FILE} <<'RUNQ_EOF'
{state_doc(1)}
RUNQ_EOF
sleep 1
cat > {STATE_FILE} <<'RUNQ_EOF'
{state_doc(2)}
RUNQ_EOF
sleep 0.5
"""


def test_a_resumed_stale_plan_leaves_the_live_apply_alone(tmp_path: Path) -> None:
    r = rig(tmp_path, SHARED)
    # Kept, so the test can look at each run's working copy afterwards.
    r.settings = r.settings.model_copy(update={"keep_workdirs": True})
    plan = r.bundle()
    go, paused = threading.Event(), threading.Event()

    def stale_executor(report: Report, _beats: int) -> Reply:
        # Started was accepted; then the process froze (SIGSTOP, a VM pause)
        # past its lease. Once it runs again, it is stale.
        if isinstance(report, Started):
            paused.set()
            go.wait(30)
            return Reply.ok()
        return Reply.stale("re-claimed while this executor was paused")

    def claim(bundle: Bundle, **changes: object) -> Bundle:
        return replace(bundle, handoff=replace(bundle.handoff, **changes))

    a = threading.Thread(
        target=PhaseRunner(r.settings).run,
        args=(claim(plan, fence=1), ScriptedReporter(stale_executor)),
    )
    a.start()
    assert paused.wait(10)
    # The plan was re-claimed and run again, confirmed, and its apply claimed:
    # the apply's bundle carries the saved plan the second plan sent.
    b = ScriptedReporter()
    PhaseRunner(r.settings).run(claim(plan, fence=2), b)
    planned = only_finished(b)
    assert planned.result.ok and planned.result.has_changes and planned.plan
    assert archive.names(planned.plan) == [PLAN_FILE]
    c = ScriptedReporter()
    apply = replace(claim(plan, phase=Phase.APPLY, fence=3), plan=planned.plan)
    applying = threading.Thread(target=PhaseRunner(r.settings).run, args=(apply, c))
    applying.start()
    wait_for("the apply's first state", lambda: state_writes(c))
    go.set()  # the paused plan executor resumes, mid-apply
    a.join(30)
    applying.join(30)

    assert only_finished(c).result.ok
    assert [w.serial for w in state_writes(c)] == [1, 2]
    # Each run had its own working copy: the apply's holds the plan of fence
    # 2 and its own final state, whatever the resumed plan did.
    [apply_copy] = working_copies(r.settings, 7, "apply")
    assert (apply_copy / PLAN_FILE).read_text() == "planned under fence 2\n"
    assert json.loads((apply_copy / STATE_FILE).read_text())["serial"] == 2
    assert len(working_copies(r.settings, 7, "plan")) == 2


# ------------------------------------------------ output, environment

#: Prints a line, pauses past a few heartbeats, prints another.
TALKER = """\
echo "first line of $1"
sleep 1
echo "second line of $1"
"""


def test_output_is_shipped_while_terraform_runs(tmp_path: Path) -> None:
    r = rig(tmp_path, TALKER)
    reporter = ScriptedReporter()
    r.run(r.bundle(), reporter)

    finished = only_finished(reporter)
    assert finished.result.ok, finished.result.error
    chunks = [x for x in reporter.log if isinstance(x.report, LogWritten)]
    # The first line went out at a heartbeat while the plan still ran, not
    # only at its end.
    first = next(x for x in chunks if b"first line of plan" in x.report.content)
    assert b"second line" not in first.report.content
    assert first.at < reporter.log[-1].at - 0.5
    # Chunks follow one another, and add up to this host's log file.
    text = reporter.output
    assert "first line of plan" in text and "second line of plan" in text
    h = r.bundle().handoff
    local = r.settings.logs_dir / str(h.task_id) / f"plan-{h.fence}.log"
    assert local.read_text() == text
    # All of it was sent before Finished.
    assert reporter.log.index(chunks[-1]) < len(reporter.log) - 1


#: Writes its environment to the marks directory.
ENV_DUMP = 'env > "$marks/env"\n'


@pytest.mark.parametrize("phase", list(Phase))
def test_terraform_does_not_see_runqs_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: Phase
) -> None:
    """The configuration's providers and local-exec provisioners run with the
    worker's environment minus runq's own settings: no database URL, no
    pool token."""
    monkeypatch.setenv("RUNQ_DATABASE_URL", "postgresql+psycopg://runq:s3cret@db/runq")
    monkeypatch.setenv("RUNQ_AGENT_TOKEN", "pool-token-s3cret")
    monkeypatch.setenv("RUNQ_REDIS_URL", "redis://:s3cret@redis:6379/0")
    monkeypatch.setenv("TF_VAR_region", "eu-west-1")  # the operator's own: kept
    r = rig(tmp_path, ENV_DUMP)
    reporter = ScriptedReporter()
    r.run(r.bundle(phase), reporter)

    assert only_finished(reporter).result.ok
    lines = (r.marks / "env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert not any("s3cret" in value for value in env.values()), env
    assert {k for k in env if k.startswith("RUNQ_")} == {
        "RUNQ_TASK_ID",
        "RUNQ_WORKSPACE",
        "RUNQ_PHASE",
        "RUNQ_FENCE",
    }
    assert (env["RUNQ_TASK_ID"], env["RUNQ_PHASE"], env["RUNQ_FENCE"]) == ("7", str(phase), "3")
    assert env["TF_VAR_region"] == "eu-west-1"


def test_a_stale_reply_to_the_last_output_sends_no_finished(tmp_path: Path) -> None:
    """The output of the last command failed to send (the database blinked),
    and is re-sent before Finished: if that says the phase is someone
    else's now, Finished is not sent."""
    r = rig(tmp_path, "exit 0\n")
    sent = {"logs": 0}

    def answer(report: Report, _beats: int) -> Reply:
        if isinstance(report, LogWritten):
            sent["logs"] += 1
            if sent["logs"] == 3:  # after `show`, the last command
                raise ConnectionError("the database blinked")
            if sent["logs"] > 3:
                return Reply.stale("re-claimed meanwhile")
        return Reply.ok()

    reporter = ScriptedReporter(answer)
    r.run(r.bundle(), reporter)
    assert sent["logs"] == 4
    assert reporter.finished == []
    assert not reporter.log[-1].reply.accepted
