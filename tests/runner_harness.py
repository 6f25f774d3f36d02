"""Driving one executor phase by hand: fake terraform scripts, a reporter that
records and answers from a script, and runner processes a test may kill.

* :func:`chain` is a real configuration whose apply can be stopped between
  resources, and :func:`created` reads which of them a state holds.
* :func:`write_script` writes an executable ``#!/bin/sh`` "terraform" whose
  ``init`` and ``show`` succeed at once and whose ``plan`` and ``apply`` run a
  body the test chooses. It leaves marks in a directory: ``pid`` (the process
  that ran the body), ``log`` (lines the body and its traps append).
* :func:`make_bundle` is a :class:`~executors.base.Bundle` of a directory
  (packed as a configuration version), a state and a saved plan, as the
  scheduler builds one; :func:`saved_plan` packs a plan artifact.
* :class:`ScriptedReporter` is an in-process :class:`~executors.base.Reporter`
  that records every report with its time and answers with a test's script.
* :func:`child` is the entry point of a runner *process* (``python -c``): it
  runs one bundle with a :class:`JsonlReporter` that appends every report to
  a file and accepts it, so a test can signal or kill the process and read
  what it reported.
* :func:`worker` is a runq worker reduced to its executor: it runs one
  claimed phase ``(task id, fence)`` against the database, as
  ``celery_app.tasks.execute`` does, minus Celery.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from executors import archive
from executors.base import Bundle, Finished, Handoff, Heartbeat, LogWritten, Reply, Report
from scheduler.settings import Settings
from scheduler.states import Phase

REPO_ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- real terraform

NAMES = ("a", "b", "c")


def chain(seconds: float) -> str:
    """Three null_resources, each with a ``local-exec`` provisioner sleeping
    ``seconds`` and each depending on the one before: Terraform 1.0.3 creates
    them one by one and rewrites its state after each, so an apply can be
    stopped between them. (``local-exec`` is built into terraform: no
    download.)"""
    return """\
terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "2.1.2"
    }
  }
}
""" + "".join(
        f'resource "null_resource" "{name}" {{\n'
        + (f"  depends_on = [null_resource.{NAMES[i - 1]}]\n" if i else "")
        + f'  provisioner "local-exec" {{\n    command = "sleep {seconds:g}"\n  }}\n}}\n'
        for i, name in enumerate(NAMES)
    )


CHAIN = chain(2)


def created(state: bytes | str | dict[str, Any]) -> set[str]:
    """Names of the null_resources a Terraform state holds a sound instance
    of (an interrupted provisioner leaves its resource tainted, to be
    replaced: not counted)."""
    doc = state if isinstance(state, dict) else json.loads(state)
    return {
        r["name"]
        for r in doc["resources"]
        if r["type"] == "null_resource"
        and any(i.get("status") != "tainted" for i in r["instances"])
    }


# ---------------------------------------------------------------- fake terraform

FAKE_TERRAFORM = """\
#!/bin/sh
# A fake terraform for supervision tests.
marks="{marks}"
case "$1" in
  init) exit 0 ;;
  show) echo '{{"resource_changes": []}}'; exit 0 ;;
esac
echo "$$" > "$marks/pid.tmp" && mv "$marks/pid.tmp" "$marks/pid"
{body}
"""

#: Exits 1 on SIGINT, as terraform does after saving its state.
GRACEFUL = """\
trap 'echo interrupted >> "$marks/log"; exit 1' INT
echo running >> "$marks/log"
sleep 60
echo finished >> "$marks/log"
"""

#: Notes SIGINT and keeps running: only SIGKILL ends it.
STUBBORN = """\
trap 'echo interrupted >> "$marks/log"' INT
echo running >> "$marks/log"
while :; do sleep 0.1; done
"""

#: One process, sleeping: its pid is the very process the runner started.
SLEEPER = """\
echo running >> "$marks/log"
exec sleep 60
"""


def write_script(directory: Path, body: str, name: str = "terraform") -> tuple[Path, Path]:
    """A fake terraform running ``body`` for plan and apply; returns (script,
    marks directory)."""
    marks = directory / f"{name}-marks"
    marks.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(FAKE_TERRAFORM.format(marks=marks, body=body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path, marks


def marks_log(marks: Path) -> list[str]:
    log = marks / "log"
    return log.read_text().split() if log.is_file() else []


def wait_for(
    what: str, check: Callable[[], object], timeout: float = 30.0, interval: float = 0.02
) -> Any:
    """Poll ``check`` every ``interval`` seconds until it returns something
    truthy, and return that; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def script_pid(marks: Path) -> int:
    """The pid of the fake terraform, once it is running."""
    path = marks / "pid"
    return int(wait_for("the fake terraform to start", path.is_file) and path.read_text())


def alive(pid: int) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie waiting to be reaped)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return state not in {"Z", "X"}


def pids_with_env(**wanted: str) -> list[int]:
    """Processes whose environment has every ``KEY=value`` in ``wanted``."""
    need = {f"{k}={v}".encode() for k, v in wanted.items()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if need <= env and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


# ---------------------------------------------------------------- bundles

#: The size limit of the archives tests pack (the settings' default).
LIMIT = 10 * 1024 * 1024


def saved_plan(directory: Path, text: str = "a saved plan") -> bytes:
    """A plan artifact (tar.gz) holding ``runq.tfplan`` with ``text``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "runq.tfplan"
    path.write_text(text)
    return archive.pack_files([("runq.tfplan", path)], LIMIT, what="the test's saved plan")


def make_bundle(
    handoff: Handoff,
    source: Path,
    *,
    state: bytes | None = None,
    plan: bytes | None = None,
) -> Bundle:
    """What the scheduler would send for ``handoff``: ``source`` packed as
    its configuration version, ``state``, and (for an apply, unless given) a
    saved plan."""
    config = archive.pack_dir(source, LIMIT)
    if plan is None and handoff.phase is Phase.APPLY:
        plan = saved_plan(source.parent / f"plan-of-{handoff.task_id}")
    handoff = replace(handoff, config_sha256=archive.sha256(config))
    return Bundle(handoff=handoff, config=config, state=state, plan=plan)


# ---------------------------------------------------------------- reporters


@dataclass(frozen=True)
class Recorded:
    #: time.monotonic() and time.time() when the report arrived.
    at: float
    wall: float
    report: Report
    reply: Reply


#: Answers a report; ``beats`` is how many heartbeats came before this one.
Answer = Callable[[Report, int], Reply]


def ok(_report: Report, _beats: int) -> Reply:
    return Reply.ok()


@dataclass
class ScriptedReporter:
    """Records every report (with its monotonic time) and answers from ``answer``."""

    answer: Answer = ok
    log: list[Recorded] = field(default_factory=list)

    def report(self, report: Report) -> Reply:
        beats = sum(isinstance(r.report, Heartbeat) for r in self.log)
        reply = self.answer(report, beats)
        self.log.append(Recorded(time.monotonic(), time.time(), report, reply))
        return reply

    def of(self, kind: type[Any]) -> list[Any]:
        return [r.report for r in self.log if isinstance(r.report, kind)]

    @property
    def finished(self) -> list[Finished]:
        return self.of(Finished)

    @property
    def output(self) -> str:
        """The phase's output as the runner shipped it (LogWritten chunks)."""
        return shipped(self.of(LogWritten))

    def first(self, what: Callable[[Recorded], bool]) -> Recorded:
        return next(r for r in self.log if what(r))


def from_heartbeat(n: int, reply: Reply) -> Answer:
    """Accept everything; answer ``reply`` to the ``n``-th heartbeat and later ones."""

    def answer(report: Report, beats: int) -> Reply:
        if isinstance(report, Heartbeat) and beats + 1 >= n:
            return reply
        return Reply.ok()

    return answer


def shipped(chunks: list[LogWritten]) -> str:
    """The output a run's LogWritten chunks add up to; they must follow one
    another with no gap or overlap."""
    out = b""
    for chunk in chunks:
        assert chunk.offset == len(out), f"chunk at {chunk.offset}, expected {len(out)}"
        out += chunk.content
    return out.decode("utf-8", errors="replace")


def to_json(report: Report) -> dict[str, Any]:
    """A report as one JSON line: a state's content is left out (its serial
    and lineage stay), output is text, a saved plan is its SHA-256."""
    data = asdict(report)
    content = data.pop("content", None)
    if isinstance(report, LogWritten):
        data["text"] = report.content.decode("utf-8", errors="replace")
    elif content is not None:
        data["sha256"] = hashlib.sha256(content).hexdigest()
    if isinstance(report, Finished):
        data["result"]["stopped"] = report.result.stopped and str(report.result.stopped)
        data["plan"] = report.plan and hashlib.sha256(report.plan).hexdigest()
    data["phase"] = str(data["phase"]) if "phase" in data else None
    return {"kind": type(report).__name__, "at": time.time(), **data}


class JsonlReporter:
    """Accepts every report and appends it to a JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def report(self, report: Report) -> Reply:
        with self.path.open("a") as f:
            f.write(json.dumps(to_json(report)) + "\n")
        return Reply.ok()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- processes


def python_process(
    code: str, *args: str, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """``python -c code args...`` from the repository root, output to ``log``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("RUNQ_")}
    full.update(env)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=REPO_ROOT,
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


CHILD = "from tests.runner_harness import child; child()"
WORKER = "from tests.runner_harness import worker; worker()"


def start_child(
    bundle: Bundle, reports: Path, *, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """A runner process running ``bundle`` with a :class:`JsonlReporter` on
    ``reports``; settings come from ``env`` (RUNQ_*). The bundle goes in a
    file beside ``reports`` (an argument list has a size limit)."""
    path = reports.with_suffix(".bundle.json")
    path.write_text(json.dumps(bundle.to_json()))
    return python_process(CHILD, str(path), str(reports), env=env, log=log)


def child() -> None:
    """``python -c``: run one phase, reporting to a JSON-lines file."""
    import logging

    from executors.local import PhaseRunner
    from scheduler.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bundle = Bundle.from_json(json.loads(Path(sys.argv[1]).read_text()))
    PhaseRunner(Settings()).run(bundle, JsonlReporter(Path(sys.argv[2])))


def start_worker(
    task_id: int, fence: int, *, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """A runner process for claimed phase (``task_id``, ``fence``), reporting
    to the database named by ``env``'s RUNQ_DATABASE_URL."""
    return python_process(WORKER, str(task_id), str(fence), env=env, log=log)


def worker() -> None:
    """``python -c``: what a runq worker does with an ``execute`` message."""
    import logging

    from scheduler import local_runs
    from scheduler.messages import RecordingPublisher
    from scheduler.runtime import Runtime
    from scheduler.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    task_id, fence = int(sys.argv[1]), int(sys.argv[2])
    rt = Runtime(Settings(), RecordingPublisher(), actor=f"test-worker:{os.getpid()}")
    try:
        ran = local_runs.execute(rt, task_id, fence)
        if not isinstance(ran, local_runs.Ran):
            raise SystemExit(f"execute({task_id}, {fence}) was not runnable: {ran.text}")
    finally:
        rt.close()


def reports_of(kind: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


def working_copies(settings: Settings, task_id: int, phase: str | None = None) -> list[Path]:
    """The working copies of ``task_id`` (of ``phase``) left on this host,
    oldest claim first: only with ``Settings(keep_workdirs=True)``, since a
    phase removes its working copy when it ends."""
    pattern = f"{task_id}-{phase or '*'}-*-*"
    copies = [p for p in settings.work_dir.glob(pattern) if p.is_dir()]
    return sorted(copies, key=lambda p: int(p.name.split("-")[2]))


def latest_working_copy(settings: Settings, task_id: int, phase: str | None = None) -> Path:
    """The working copy of ``task_id``'s newest claim (of ``phase``), kept
    with ``Settings(keep_workdirs=True)``."""
    copies = working_copies(settings, task_id, phase)
    assert copies, f"task {task_id} has no working copy (keep_workdirs={settings.keep_workdirs})"
    return copies[-1]
