"""Local mode: a runq worker runs terraform in a subprocess.

Layout under ``RUNQ_DATA_DIR``::

    work/<task_id>/                working copy of the workspace's source dir
    work/<task_id>/runq.tfplan     the saved plan a plan+apply applies
    logs/<task_id>/<phase>.log     stdout and stderr of every command
    state/<workspace>/terraform.tfstate       the workspace's state
    state/<workspace>/history/<task>.tfstate  the state each apply left

Hazards and what guards them:

* A speculative plan must never take the state lock or write state, so plans
  can run beside an apply. Every phase runs against a private snapshot of the
  state in its working copy; plans also pass ``-lock=false``.
* The workspace's state must only ever be seen whole. An apply's resulting
  state is published with ``os.replace`` (atomic on POSIX), never written in
  place, so a plan snapshotting it mid-apply reads the old or the new state.
* A failed apply may still have created resources: its partial state is
  published too, or the next apply would try to create them again.
* An apply must apply exactly what was reviewed: it runs the saved plan file;
  terraform refuses it if the state moved since the plan.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from executors.base import Changes, Finished, Handoff, PhaseResult, Reporter, Started
from scheduler.messages import QUEUE_RUNS, TASK_EXECUTE, Message, Publisher
from scheduler.settings import Settings
from scheduler.states import Phase

log = logging.getLogger(__name__)

PLAN_FILE = "runq.tfplan"
STATE_FILE = "runq.tfstate"
OVERRIDE_FILE = "runq_override.tf"
#: Copying these from the source dir would leak another run's init or state.
IGNORED = shutil.ignore_patterns(".terraform", "*.tfstate", "*.tfstate.*", "*.tfplan")


class LocalLauncher:
    """Hands a claimed phase to the runs queue, where any runq worker takes it."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def launch(self, handoff: Handoff) -> str:
        message_id = self.publisher.publish(Message(TASK_EXECUTE, QUEUE_RUNS, (handoff.to_json(),)))
        return f"celery:{message_id}"


@dataclass(frozen=True)
class Paths:
    work: Path
    log: Path
    state: Path
    history: Path

    @classmethod
    def of(cls, settings: Settings, handoff: Handoff) -> Paths:
        state_root = settings.state_dir / handoff.workspace
        return cls(
            work=settings.work_dir / str(handoff.task_id),
            log=settings.logs_dir / str(handoff.task_id) / f"{handoff.phase}.log",
            state=state_root / "terraform.tfstate",
            history=state_root / "history",
        )


class CommandFailed(Exception):
    def __init__(self, command: str, returncode: int, detail: str) -> None:
        super().__init__(f"terraform {command} exited {returncode}: {detail}")
        self.returncode = returncode


class LocalRunner:
    """Runs one phase with the real terraform binary."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self, handoff: Handoff, reporter: Reporter) -> None:
        handle = f"local:{socket.gethostname()}:{os.getpid()}"
        if not reporter.report(Started(handoff.task_id, handoff.fence, handoff.phase, handle)):
            log.warning(
                "task %s %s not started: the scheduler no longer gives it to this executor",
                handoff.task_id,
                handoff.phase,
                extra={"action": "run_abandoned", "task_id": handoff.task_id},
            )
            return
        try:
            result = self.run_phase(handoff)
        except Exception as exc:
            # Not a terraform failure (those are results): runq itself broke.
            log.exception("task %s: executor error", handoff.task_id)
            result = PhaseResult(ok=False, error=f"executor error: {type(exc).__name__}: {exc}")
        reporter.report(Finished(handoff.task_id, handoff.fence, handoff.phase, result))

    def run_phase(self, handoff: Handoff) -> PhaseResult:
        paths = Paths.of(self.settings, handoff)
        paths.log.parent.mkdir(parents=True, exist_ok=True)
        env = self._env(handoff)
        try:
            if handoff.phase is Phase.PLAN:
                return self._plan(handoff, paths, env)
            return self._apply(handoff, paths, env)
        except CommandFailed as exc:
            log.info("task %s: %s", handoff.task_id, exc, extra={"action": "terraform_failed"})
            return PhaseResult(ok=False, error=str(exc))
        except FileNotFoundError as exc:
            if exc.filename != self.settings.terraform_bin:
                raise
            return PhaseResult(
                ok=False,
                error=f"terraform binary {self.settings.terraform_bin!r} not found "
                "(install it or set RUNQ_TERRAFORM_BIN)",
            )

    def _env(self, handoff: Handoff) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CHECKPOINT_DISABLE="1",
            TF_IN_AUTOMATION="1",
            TF_INPUT="0",
            RUNQ_TASK_ID=str(handoff.task_id),
            RUNQ_WORKSPACE=handoff.workspace,
            RUNQ_PHASE=str(handoff.phase),
        )
        return env

    def _plan(self, handoff: Handoff, paths: Paths, env: dict[str, str]) -> PhaseResult:
        if not handoff.source_dir or not Path(handoff.source_dir).is_dir():
            return PhaseResult(
                ok=False, error=f"source directory {handoff.source_dir!r} does not exist"
            )
        if paths.work.exists():
            shutil.rmtree(paths.work)  # a re-claimed plan starts from a clean copy
        shutil.copytree(handoff.source_dir, paths.work, ignore=IGNORED)
        (paths.work / OVERRIDE_FILE).write_text(
            f'terraform {{\n  backend "local" {{\n    path = "{STATE_FILE}"\n  }}\n}}\n'
        )
        self._snapshot_state(paths)
        self._terraform(paths, env, "init", ["-input=false", "-no-color"])
        args = ["-input=false", "-no-color", "-detailed-exitcode", f"-out={PLAN_FILE}"]
        if handoff.speculative:
            args.append("-lock=false")
        plan = self._terraform(paths, env, "plan", args, ok_codes=(0, 2))
        changes = self._summarize(paths, env)
        # -detailed-exitcode: 2 means changes, resources or outputs alike.
        return PhaseResult(ok=True, has_changes=plan.returncode == 2, changes=changes)

    def _apply(self, handoff: Handoff, paths: Paths, env: dict[str, str]) -> PhaseResult:
        if not (paths.work / PLAN_FILE).is_file():
            return PhaseResult(ok=False, error=f"saved plan {paths.work / PLAN_FILE} is missing")
        self._snapshot_state(paths)
        before = self._read(paths.work / STATE_FILE)
        try:
            self._terraform(
                paths, env, "apply", ["-input=false", "-no-color", "-auto-approve", PLAN_FILE]
            )
        finally:
            after = self._read(paths.work / STATE_FILE)
            if after is not None and after != before:
                self._publish_state(handoff, paths)
        return PhaseResult(ok=True)

    def _snapshot_state(self, paths: Paths) -> None:
        target = paths.work / STATE_FILE
        if paths.state.is_file():
            shutil.copyfile(paths.state, target)
        elif target.exists():
            target.unlink()

    def _publish_state(self, handoff: Handoff, paths: Paths) -> None:
        paths.history.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths.work / STATE_FILE, paths.history / f"{handoff.task_id}.tfstate")
        tmp = paths.state.with_suffix(f".tmp-{handoff.task_id}")
        shutil.copyfile(paths.work / STATE_FILE, tmp)
        os.replace(tmp, paths.state)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        return path.read_bytes() if path.is_file() else None

    def _summarize(self, paths: Paths, env: dict[str, str]) -> Changes:
        proc = self._terraform(paths, env, "show", ["-json", "-no-color", PLAN_FILE], capture=True)
        return summarize_plan(json.loads(proc.stdout))

    def _terraform(
        self,
        paths: Paths,
        env: dict[str, str],
        command: str,
        args: Sequence[str],
        *,
        ok_codes: Sequence[int] = (0,),
        capture: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run one terraform command, its output appended to the phase log.

        With ``capture``, stdout is returned instead (machine-readable JSON
        must not be mixed into the log); stderr still goes to the log.
        """
        argv = [self.settings.terraform_bin, command, *args]
        with paths.log.open("a", encoding="utf-8") as logf:
            logf.write(f"$ {' '.join(argv)}\n")
            logf.flush()
            proc = subprocess.run(
                argv,
                cwd=paths.work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else logf,
                stderr=logf if capture else subprocess.STDOUT,
                text=True,
                check=False,
            )
            logf.write(f"[exit {proc.returncode}]\n")
        if proc.returncode not in ok_codes:
            raise CommandFailed(command, proc.returncode, _error_line(paths.log))
        return proc


def _error_line(log_path: Path) -> str:
    """The first ``Error:`` line terraform printed, for the task's error field."""
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        stripped = line.strip(" \u2502\u2577\u2575")
        if stripped.startswith("Error:"):
            return stripped
    return f"see `runq logs` ({log_path})"


def summarize_plan(plan: dict[str, object]) -> Changes:
    """Add/change/destroy counts from ``terraform show -json`` of a plan.

    A replacement (delete+create in either order) counts as one add and one
    destroy, as terraform's own "Plan: N to add" line does.
    """
    add = change = destroy = 0
    resource_changes = plan.get("resource_changes") or []
    assert isinstance(resource_changes, list)
    for rc in resource_changes:
        actions = set(rc.get("change", {}).get("actions", []))
        if "create" in actions:
            add += 1
        if "delete" in actions:
            destroy += 1
        if "update" in actions:
            change += 1
    return Changes(add=add, change=change, destroy=destroy)
