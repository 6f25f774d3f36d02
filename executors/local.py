"""Local mode: a runq worker runs terraform in a subprocess.

Layout under ``RUNQ_DATA_DIR``::

    work/<task_id>/plan-<fence>/   working copy of one plan attempt (and of the
                                   apply of the plan that was accepted)
    .../runq.tfplan                the saved plan a plan+apply applies
    .../runq.tfstate               this phase's private copy of the state
    logs/<task_id>/<phase>.log     stdout and stderr of every command

The workspace's state is not on this disk: it is stored by the scheduler
(:mod:`scheduler.artifacts`), fetched at the start of each phase, and every
state an apply writes is reported back within a moment of the write.

Hazards and what guards them:

* A speculative plan must never take the state lock or write state, so plans
  can run beside an apply. Every phase runs against a private copy of the
  state in its working copy; plans also pass ``-lock=false``, and only an
  apply's state writes are reported.
* A failed, cancelled or interrupted apply may still have created resources:
  every state it wrote is stored, so the next plan sees them.
* An apply must apply exactly what was reviewed: it runs the saved plan file;
  terraform refuses it if the state moved since the plan.
* A superseded attempt must not touch the live one's files. A plan executor
  paused past its lease and resumed after the plan was re-claimed would
  otherwise re-copy the working copy under the running apply. Each plan
  attempt has its own working copy, named by its fence; the apply's claim is
  the only claim after the accepted plan's, so it uses ``fence - 1``'s.
* Process supervision (heartbeats, cancel, timeouts, parent death, SIGTERM)
  is :mod:`executors.runner`'s, shared by every mode.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from executors.base import (
    Changes,
    Finished,
    Handoff,
    PhaseResult,
    Reporter,
    Started,
    StopReason,
)
from executors.runner import Completed, Stopped, Supervisor, Timing
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
        # Only the id and the fence travel: the worker reads what to run from
        # the database, so a forged message cannot choose it.
        message_id = self.publisher.publish(execute(handoff.task_id, handoff.fence))
        return f"celery:{message_id}"


def execute(task_id: int, fence: int) -> Message:
    return Message(TASK_EXECUTE, QUEUE_RUNS, (task_id, fence))


@dataclass(frozen=True)
class Paths:
    work: Path
    log: Path

    @property
    def state(self) -> Path:
        return self.work / STATE_FILE

    @classmethod
    def of(cls, settings: Settings, handoff: Handoff) -> Paths:
        # Between the accepted plan and its apply, the only claim is the
        # apply's own (apply_queued -> applying): it holds plan fence + 1.
        plan_fence = handoff.fence if handoff.phase is Phase.PLAN else handoff.fence - 1
        return cls(
            work=working_copy(settings, handoff.task_id, plan_fence),
            log=settings.logs_dir / str(handoff.task_id) / f"{handoff.phase}.log",
        )


def working_copy(settings: Settings, task_id: int, plan_fence: int) -> Path:
    """The working copy of ``task_id``'s plan attempt under ``plan_fence``."""
    return settings.work_dir / str(task_id) / f"plan-{plan_fence}"


class CommandFailed(Exception):
    def __init__(self, command: str, returncode: int, detail: str) -> None:
        super().__init__(f"terraform {command} exited {returncode}: {detail}")
        self.returncode = returncode


class LocalRunner:
    """Runs one phase with the real terraform binary, supervised."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self, handoff: Handoff, reporter: Reporter) -> None:
        # Unique per run: a retried Started (its reply lost) is recognised.
        handle = f"local:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        if not reporter.report(
            Started(handoff.task_id, handoff.fence, handoff.phase, handle)
        ).accepted:
            log.warning(
                "task %s %s not started: the scheduler no longer gives it to this executor",
                handoff.task_id,
                handoff.phase,
                extra={"action": "run_abandoned", "task_id": handoff.task_id},
            )
            return
        paths = Paths.of(self.settings, handoff)
        paths.log.parent.mkdir(parents=True, exist_ok=True)
        sup = Supervisor(
            handoff,
            reporter,
            Timing(
                heartbeat_interval=self.settings.heartbeat_interval,
                kill_grace=self.settings.kill_grace,
                shutdown_grace=self.settings.shutdown_grace,
            ),
            workdir=paths.work,
            log_path=paths.log,
            env=self._env(handoff),
            state_file=None if handoff.phase is Phase.PLAN else paths.state,
        )
        with sup.shutdown_as_interrupt():
            try:
                result = self.run_phase(handoff, reporter, sup, paths)
            except Stopped as exc:
                result = PhaseResult(ok=False, error=str(exc), stopped=exc.reason)
            except Exception as exc:
                # Not a terraform failure (those are results): runq itself broke.
                log.exception("task %s: executor error", handoff.task_id)
                result = PhaseResult(ok=False, error=f"executor error: {type(exc).__name__}: {exc}")
        if result.stopped is StopReason.STALE:
            log.warning(
                "task %s %s stopped: %s",
                handoff.task_id,
                handoff.phase,
                result.error,
                extra={"action": "run_superseded", "task_id": handoff.task_id},
            )
            return  # no report would be accepted, and none is owed
        reporter.report(Finished(handoff.task_id, handoff.fence, handoff.phase, result))

    def run_phase(
        self, handoff: Handoff, reporter: Reporter, sup: Supervisor, paths: Paths
    ) -> PhaseResult:
        try:
            if handoff.phase is Phase.PLAN:
                return self._plan(handoff, reporter, sup, paths)
            return self._apply(reporter, sup, paths, handoff)
        except CommandFailed as exc:
            sup.check()  # a command that failed because runq stopped it
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
            RUNQ_FENCE=str(handoff.fence),
        )
        return env

    def _plan(
        self, handoff: Handoff, reporter: Reporter, sup: Supervisor, paths: Paths
    ) -> PhaseResult:
        if not handoff.source_dir or not Path(handoff.source_dir).is_dir():
            return PhaseResult(
                ok=False, error=f"source directory {handoff.source_dir!r} does not exist"
            )
        if paths.work.exists():
            shutil.rmtree(paths.work)  # left over; only the start-once winner gets here
        paths.work.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(handoff.source_dir, paths.work, ignore=IGNORED)
        (paths.work / OVERRIDE_FILE).write_text(
            f'terraform {{\n  backend "local" {{\n    path = "{STATE_FILE}"\n  }}\n}}\n'
        )
        sup.seed_state(reporter.current_state(handoff))
        self._terraform(sup, "init", ["-input=false", "-no-color"])
        args = ["-input=false", "-no-color", "-detailed-exitcode", f"-out={PLAN_FILE}"]
        if handoff.speculative:
            args.append("-lock=false")
        plan = self._terraform(sup, "plan", args, ok_codes=(0, 2))
        proc = self._terraform(sup, "show", ["-json", "-no-color", PLAN_FILE], capture=True)
        changes = summarize_plan(json.loads(proc.stdout))
        # -detailed-exitcode: 2 means changes, resources or outputs alike.
        return PhaseResult(ok=True, has_changes=plan.returncode == 2, changes=changes)

    def _apply(
        self, reporter: Reporter, sup: Supervisor, paths: Paths, handoff: Handoff
    ) -> PhaseResult:
        if not (paths.work / PLAN_FILE).is_file():
            return PhaseResult(ok=False, error=f"saved plan {paths.work / PLAN_FILE} is missing")
        sup.seed_state(reporter.current_state(handoff))
        self._terraform(sup, "apply", ["-input=false", "-no-color", "-auto-approve", PLAN_FILE])
        return PhaseResult(ok=True)

    def _terraform(
        self,
        sup: Supervisor,
        command: str,
        args: Sequence[str],
        *,
        ok_codes: Sequence[int] = (0,),
        capture: bool = False,
    ) -> Completed:
        """Run one terraform command, its output appended to the phase log.

        With ``capture``, stdout is returned instead (machine-readable JSON
        must not be mixed into the log); stderr still goes to the log.
        """
        proc = sup.run([self.settings.terraform_bin, command, *args], capture=capture)
        if proc.returncode not in ok_codes:
            raise CommandFailed(command, proc.returncode, _error_line(sup.log_path))
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
