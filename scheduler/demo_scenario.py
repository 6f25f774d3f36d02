"""What ``runq demo`` does: three workspaces, a timed list of steps, and the
player that runs them against a client, printing progress as it goes.

:data:`SCENARIO` submits plans and plan+applies (and confirms one), each at
the start or a moment after an earlier task reached a status, so the
timeline shows plans running beside applies and applies waiting for each
other; :data:`EXPECTED_END` is how every task should end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.errors import DemoError, WorkspaceExists
from scheduler.states import TERMINAL, TaskStatus, TaskType
from scheduler.supervise import Proc

#: Seconds between two looks at the tasks' events.
POLL_SECONDS = 0.25

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoWorkspace:
    name: str
    auto_apply: bool
    #: main.tf: outputs, locals and variables only, so no provider is needed
    #: (Terraform 1.0 has no built-in resources; output changes are changes).
    config: str


def _config(comment: str, body: str) -> str:
    return (
        f"# runq demo workspace: {comment}\n"
        "# Outputs only: nothing to download, nothing real to change.\n\n"
        'variable "run_id" {\n'
        '  description = "The runq task that planned this (set by the demo wrapper)."\n'
        "  type        = string\n"
        '  default     = "manual"\n'
        "}\n\n"
        f"{body}\n"
        'output "last_run" {\n  value = var.run_id\n}\n'
    )


WORKSPACES: tuple[DemoWorkspace, ...] = (
    DemoWorkspace(
        "networking",
        auto_apply=True,
        config=_config(
            "a VPC and its subnets",
            'locals {\n  vpc_cidr = "10.20.0.0/16"\n'
            "  subnets  = [for i in range(3) : cidrsubnet(local.vpc_cidr, 8, i)]\n}\n\n"
            'output "vpc_cidr" {\n  value = local.vpc_cidr\n}\n\n'
            'output "subnets" {\n  value = local.subnets\n}\n',
        ),
    ),
    DemoWorkspace(
        "app",
        auto_apply=True,
        config=_config(
            "an application deployment",
            'variable "image" {\n  type    = string\n  default = "registry.local/app:2"\n}\n\n'
            "locals {\n  replicas = 3\n}\n\n"
            'output "deployment" {\n'
            "  value = { image = var.image, replicas = local.replicas }\n}\n",
        ),
    ),
    DemoWorkspace(
        "sandbox",
        auto_apply=False,
        config=_config(
            "a playground whose applies wait for a human",
            'locals {\n  sizes = { small = "t3.micro", large = "t3.large" }\n}\n\n'
            'output "instance_type" {\n  value = local.sizes["small"]\n}\n',
        ),
    ),
)


@dataclass(frozen=True)
class Step:
    """One thing the demo does: submit a task, or confirm one.

    ``key`` names the task (a confirm names the task it confirms). The step
    runs ``delay`` seconds after the task ``after`` first reached one of the
    statuses ``when`` (or at the start, without ``after``).
    """

    key: str
    workspace: str
    action: str  # "submit" | "confirm"
    task_type: TaskType | None = None
    message: str = ""
    after: str | None = None
    when: frozenset[TaskStatus] = frozenset()
    delay: float = 0.0


PA, PLAN = TaskType.PLAN_AND_APPLY, TaskType.PLAN
APPLYING = frozenset({TaskStatus.APPLYING})
WAITING = frozenset({TaskStatus.APPLY_PENDING})

SCENARIO: tuple[Step, ...] = (
    # networking: two plan+applies back to back (the second must wait for
    # the first), and two reviews planned while the first applies.
    Step("net-1", "networking", "submit", PA, "widen the VPC CIDR"),
    Step("net-2", "networking", "submit", PA, "add a private subnet"),
    Step("net-3", "networking", "submit", PLAN, "review: VPC peering", "net-1", APPLYING),
    Step("net-4", "networking", "submit", PLAN, "review: NAT gateway", "net-1", APPLYING, 0.75),
    # app: a plan submitted first does not hold back the plan+apply after it
    # (the replaced system made it wait); more of both during the apply.
    Step("app-1", "app", "submit", PLAN, "nightly drift check"),
    Step("app-2", "app", "submit", PA, "deploy v2"),
    Step("app-3", "app", "submit", PLAN, "preview v3", "app-2", APPLYING),
    Step("app-4", "app", "submit", PA, "deploy v3", "app-2", APPLYING, 0.25),
    # sandbox: the apply waits for a human, who confirms it a moment later,
    # while someone else plans.
    Step("sb-1", "sandbox", "submit", PA, "try the new module"),
    Step("sb-2", "sandbox", "submit", PLAN, "what if: bigger instances", "sb-1", WAITING),
    Step("sb-1", "sandbox", "confirm", after="sb-1", when=WAITING, delay=1.5),
)

#: How every task of the scenario should end.
EXPECTED_END: Mapping[TaskType, TaskStatus] = {
    TaskType.PLAN: TaskStatus.SUCCESS,
    TaskType.PLAN_AND_APPLY: TaskStatus.APPLIED,
}


# ---------------------------------------------------------------- playing


def create_workspaces(client: Any, demo_dir: Path, say: Say) -> dict[str, str]:
    """Create the demo's workspaces; returns scenario name -> actual name.

    On a fresh SQLite file the names are the scenario's; on a database named
    by RUNQ_DATABASE_URL, earlier demos may have taken them, so a suffix is
    added.
    """
    suffix = demo_dir.name.removeprefix("demo-")
    names: dict[str, str] = {}
    described = []
    for ws in WORKSPACES:
        source = demo_dir / "configs" / ws.name
        source.mkdir(parents=True, exist_ok=True)
        (source / "main.tf").write_text(ws.config)
        for name in (ws.name, f"{ws.name}-{suffix}"):
            try:
                client.create_workspace(name, source_dir=str(source), auto_apply=ws.auto_apply)
            except WorkspaceExists:
                continue
            names[ws.name] = name
            break
        else:
            raise DemoError(f"workspace {ws.name!r} exists already (and with the run's suffix)")
        described.append(
            f"{names[ws.name]} "
            f"({'auto-applies' if ws.auto_apply else 'applies wait for confirmation'})"
        )
    say("workspaces: " + ", ".join(described))
    return names


class Scenario:
    """Plays :data:`SCENARIO`, printing the steps and the progress."""

    def __init__(
        self,
        client: Any,
        names: Mapping[str, str],
        watch: Sequence[Proc],
        say: Say,
        deadline: float,
    ) -> None:
        self.client = client
        self.names = names
        #: The processes whose exit ends the demo.
        self.watch = watch
        self.say = say
        self.deadline = deadline
        #: scenario key -> task id
        self.ids: dict[str, int] = {}
        #: "key:statuses" -> when the demo first saw that task reach them
        self.noticed: dict[str, float] = {}
        self.problems: list[str] = []
        self.t0 = time.monotonic()

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:5.1f}s]"

    def play(self) -> list[str]:
        """Run every step and wait for every task to finish; the problems."""
        todo = list(SCENARIO)
        last_line = ""
        self.t0 = time.monotonic()
        while True:
            events = self.client.events(list(self.ids.values())) if self.ids else []
            reached: dict[int, set[TaskStatus]] = {}
            status: dict[int, TaskStatus] = {}
            for e in events:
                reached.setdefault(e.task_id, set()).add(e.to_status)
                status[e.task_id] = e.to_status  # events come in commit order
            for step in list(todo):
                due = self._due(step, reached, status)
                if due is not False:
                    todo.remove(step)
                if due:
                    self._do(step)
            line = self._progress(status)
            if line != last_line and status:
                self.say(f"{self.stamp()} {line}")
                last_line = line
            for p in self.watch:
                if p.exited():
                    raise DemoError(p.exit_report(" during the demo", 15, "    "))
            if not todo and len(status) == len(self.ids) and set(status.values()) <= TERMINAL:
                self.say(
                    f"{self.stamp()} all {len(self.ids)} tasks finished "
                    f"in {time.monotonic() - self.t0:.1f}s"
                )
                return self.problems
            if time.monotonic() - self.t0 > self.deadline:
                waiting = ", ".join(
                    f"#{tid} {st}" for tid, st in sorted(status.items()) if st not in TERMINAL
                )
                self.problems.append(
                    f"deadline of {self.deadline:g}s exceeded; still waiting for {waiting or '-'}"
                    + (f"; {len(todo)} steps not run" if todo else "")
                )
                self.say(f"{self.stamp()} {self.problems[-1]}")
                return self.problems
            time.sleep(POLL_SECONDS)

    def _due(
        self, step: Step, reached: Mapping[int, set[TaskStatus]], status: Mapping[int, TaskStatus]
    ) -> bool | None:
        """True: run it now; False: not yet; None: never (drop it)."""
        now = time.monotonic()
        if step.after is None:
            return now - self.t0 >= step.delay
        tid = self.ids.get(step.after)
        if tid is None:
            return False
        if not reached.get(tid, set()) & step.when:
            if status.get(tid) in TERMINAL:  # it never will
                self.problems.append(
                    f"step not run: {step.action} {step.key} (#{tid} ended {status[tid]})"
                )
                return None
            return False
        seen = self.noticed.setdefault(f"{step.after}:{sorted(step.when)}", now)
        return now - seen >= step.delay

    def _do(self, step: Step) -> None:
        ws = self.names[step.workspace]
        why = ""
        if step.after is not None:
            trigger = self.ids[step.after]
            state = " or ".join(sorted(step.when))
            why = f"  (#{trigger} is {state.replace('apply_pending', 'waiting to be confirmed')})"
        if step.action == "submit":
            assert step.task_type is not None
            task = self.client.submit(ws, step.task_type, message=step.message)
            self.ids[step.key] = task.id
            kind = "plan+apply" if step.task_type is TaskType.PLAN_AND_APPLY else "plan"
            self.say(f'{self.stamp()} {ws}: submit #{task.id} {kind} "{step.message}"{why}')
        elif step.action == "confirm":
            task_id = self.ids[step.key]
            self.client.confirm(task_id)
            self.say(f"{self.stamp()} {ws}: confirm #{task_id} (a human approves its plan)")
        else:  # pragma: no cover - the scenario is a constant
            raise ValueError(step.action)

    def _progress(self, status: Mapping[int, TaskStatus]) -> str:
        """One line: each workspace's unfinished tasks, then those done."""
        ws_of = {step.key: self.names[step.workspace] for step in SCENARIO}
        parts = []
        for ws in self.names.values():
            busy, done = [], []
            for key, tid in sorted(self.ids.items(), key=lambda kv: kv[1]):
                st = status.get(tid)
                if ws_of[key] != ws or st is None:
                    continue
                if st in (TaskStatus.SUCCESS, TaskStatus.APPLIED):
                    done.append(f"#{tid}")
                else:
                    busy.append(f"#{tid} {st}")
            if done:
                busy.append("done " + " ".join(done))
            parts.append(f"{ws}: {', '.join(busy) or '-'}")
        return " | ".join(parts)
