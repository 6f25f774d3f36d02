"""Running one phase of terraform from a bundle, on any host.

Every execution mode runs a phase the same way: local mode in a runq worker,
agent mode in an agent, Kubernetes mode in a Job's container. The phase's
inputs come in a :class:`~executors.base.Bundle` (the configuration version,
the workspace's state, the saved plan for an apply) and its outputs go back
in reports (the state terraform writes, the saved plan, the output), so no
disk is shared between hosts, or between the plan and the apply.

Layout under ``RUNQ_DATA_DIR`` (this host's own)::

    work/<task>-<phase>-<fence>-<run>/   the phase's working copy, removed
                                         when the phase ends
    logs/<task>/<phase>-<fence>.log      this host's copy of the output

Hazards and what guards them:

* A speculative plan must never take the state lock or write state, so plans
  can run beside an apply. Every phase runs against a private copy of the
  state in its working copy; plans also pass ``-lock=false``, and only an
  apply's state writes are reported.
* A failed, cancelled or interrupted apply may still have created resources:
  every state it wrote is reported and stored, so the next plan sees them.
* An apply must apply exactly what was reviewed: it runs the saved plan file
  from the plan artifact, with the plan's provider lock file; terraform
  refuses it if the state moved since the plan.
* A superseded attempt must not touch the live one's files: every run has
  its own working copy, named by its fence and a random run id.
* Secrets must not reach terraform: the configuration (and any provider or
  ``local-exec`` in it) runs with the environment minus runq's own settings,
  so it cannot read the database URL or a pool's token.
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

from executors import archive
from executors.base import (
    Bundle,
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
LOCK_FILE = ".terraform.lock.hcl"


class LocalLauncher:
    """Hands a claimed phase to the runs queue, where any runq worker takes it."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def launch(self, handoff: Handoff) -> str:
        # Only the id and the fence travel: the worker reads what to run from
        # the database, so a forged message cannot choose it.
        message = execute(handoff)
        return f"celery:{self.publisher.publish(message)}"


def execute(handoff: Handoff) -> Message:
    return Message(TASK_EXECUTE, QUEUE_RUNS, (handoff.task_id, handoff.fence), handoff.label)


@dataclass(frozen=True)
class Paths:
    work: Path
    log: Path

    @property
    def state(self) -> Path:
        return self.work / STATE_FILE

    @classmethod
    def of(cls, settings: Settings, handoff: Handoff, run: str) -> Paths:
        h = handoff
        return cls(
            work=settings.work_dir / f"{h.task_id}-{h.phase}-{h.fence}-{run}",
            log=settings.logs_dir / str(h.task_id) / f"{h.phase}-{h.fence}.log",
        )


class CommandFailed(Exception):
    def __init__(self, command: str, returncode: int, detail: str) -> None:
        super().__init__(f"terraform {command} exited {returncode}: {detail}")
        self.returncode = returncode


class PhaseRunner:
    """Runs one phase of a bundle with the real terraform binary, supervised.

    ``kind`` names the execution mode in the executor handle (``local``,
    ``agent:<id>``, ``k8s:<pod>``).
    """

    def __init__(self, settings: Settings, *, kind: str = "local") -> None:
        self.settings = settings
        self.kind = kind

    def run(self, bundle: Bundle, reporter: Reporter) -> None:
        handoff = bundle.handoff
        run = secrets.token_hex(3)
        # Unique per run: a retried Started (its reply lost) is recognised.
        handle = bundle.started or f"{self.kind}:{socket.gethostname()}:{os.getpid()}:{run}"
        if (
            bundle.started is None
            and not reporter.report(
                Started(handoff.task_id, handoff.fence, handoff.phase, handle)
            ).accepted
        ):
            log.warning(
                "task %s %s not started: the scheduler no longer gives it to this executor",
                handoff.task_id,
                handoff.phase,
                extra={"action": "run_abandoned", "task_id": handoff.task_id},
            )
            return
        paths = Paths.of(self.settings, handoff, run)
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
        plan: bytes | None = None
        with sup.shutdown_as_interrupt():
            try:
                result, plan = self.run_phase(bundle, sup, paths)
            except Stopped as exc:
                result = PhaseResult(ok=False, error=str(exc), stopped=exc.reason)
            except Exception as exc:
                # Not a terraform failure (those are results): runq itself broke.
                log.exception("task %s: executor error", handoff.task_id)
                result = PhaseResult(ok=False, error=f"executor error: {type(exc).__name__}: {exc}")
            finally:
                if not self.settings.keep_workdirs:
                    shutil.rmtree(paths.work, ignore_errors=True)
        # The last of the output first: its reply may be the first to say the
        # phase is someone else's (an earlier send failed and is retried here).
        sup.ship_log()
        if result.stopped is StopReason.STALE or sup.stale:
            log.warning(
                "task %s %s stopped: %s",
                handoff.task_id,
                handoff.phase,
                result.error or "its fence is stale",
                extra={"action": "run_superseded", "task_id": handoff.task_id},
            )
            return  # no report would be accepted, and none is owed
        reporter.report(Finished(handoff.task_id, handoff.fence, handoff.phase, result, plan=plan))

    def run_phase(
        self, bundle: Bundle, sup: Supervisor, paths: Paths
    ) -> tuple[PhaseResult, bytes | None]:
        handoff = bundle.handoff
        try:
            self._prepare(bundle, sup, paths)
            if handoff.phase is Phase.PLAN:
                return self._plan(handoff, sup, paths)
            return self._apply(sup), None
        except CommandFailed as exc:
            sup.check()  # a command that failed because runq stopped it
            log.info("task %s: %s", handoff.task_id, exc, extra={"action": "terraform_failed"})
            return PhaseResult(ok=False, error=str(exc)), None
        except archive.ArchiveError as exc:
            return PhaseResult(ok=False, error=str(exc)), None
        except FileNotFoundError as exc:
            if exc.filename != self.settings.terraform_bin:
                raise
            return PhaseResult(
                ok=False,
                error=f"terraform binary {self.settings.terraform_bin!r} not found "
                "(install it or set RUNQ_TERRAFORM_BIN)",
            ), None

    def _env(self, handoff: Handoff) -> dict[str, str]:
        # runq's own settings hold the database URL and pool tokens: the
        # configuration's providers and provisioners must not see them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNQ_")}
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

    def _prepare(self, bundle: Bundle, sup: Supervisor, paths: Paths) -> None:
        """The working copy: the configuration version, runq's backend
        override, the stored state and (for an apply) the saved plan."""
        if paths.work.exists():
            shutil.rmtree(paths.work)
        archive.unpack(bundle.config, paths.work)
        (paths.work / OVERRIDE_FILE).write_text(
            f'terraform {{\n  backend "local" {{\n    path = "{STATE_FILE}"\n  }}\n}}\n'
        )
        if bundle.handoff.phase is Phase.APPLY:
            if bundle.plan is None:
                raise archive.ArchiveError("the hand-off of an apply carries no saved plan")
            archive.unpack(bundle.plan, paths.work)
        sup.seed_state(bundle.state)

    def _plan(
        self, handoff: Handoff, sup: Supervisor, paths: Paths
    ) -> tuple[PhaseResult, bytes | None]:
        self._terraform(sup, "init", ["-input=false", "-no-color"])
        args = ["-input=false", "-no-color", "-detailed-exitcode", f"-out={PLAN_FILE}"]
        if handoff.speculative:
            args.append("-lock=false")
        plan = self._terraform(sup, "plan", args, ok_codes=(0, 2))
        proc = self._terraform(sup, "show", ["-json", "-no-color", PLAN_FILE], capture=True)
        changes = summarize_plan(json.loads(proc.stdout))
        # -detailed-exitcode: 2 means changes, resources or outputs alike.
        result = PhaseResult(ok=True, has_changes=plan.returncode == 2, changes=changes)
        if handoff.speculative or not result.has_changes:
            return result, None  # nothing will apply it
        members = [(PLAN_FILE, paths.work / PLAN_FILE)]
        if (paths.work / LOCK_FILE).is_file():
            members.append((LOCK_FILE, paths.work / LOCK_FILE))
        try:
            artifact = archive.pack_files(
                members, self.settings.max_artifact_bytes, what="the saved plan"
            )
        except archive.ArchiveError as exc:
            return PhaseResult(ok=False, error=f"{exc} (RUNQ_MAX_ARTIFACT_BYTES)"), None
        return result, artifact

    def _apply(self, sup: Supervisor) -> PhaseResult:
        # init installs the providers the plan's lock file names, on this host.
        self._terraform(sup, "init", ["-input=false", "-no-color"])
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
