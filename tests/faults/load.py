"""The work a fault run submits, drawn from its seed.

Workspaces come in four kinds of configuration, chosen so most phases cost
terraform little CPU (measured on this machine, one command at a time:
init+plan+show+apply take about 0.3s without a provider and 1.5s with the
null provider, whose plugin start dominates):

* ``outputs``: no provider, an output set to ``timestamp()``: every plan has
  changes, so every plan+apply goes on to an apply that writes state;
* ``null``: a ``null_resource`` replaced on every run (two state writes per
  apply, a real provider plugin under terraform);
* ``static``: a constant output: the first plan+apply applies it, later ones
  find nothing to change and end ``success`` after their plan;
* ``broken``: a reference to an undeclared variable: every plan fails.

Each workspace pauses its plans and applies for a few seconds (``slow.env``,
read by the wrapper), so faults land mid-phase. Submissions are spread over
the run's window in random order, and :class:`Human` confirms or discards
each plan+apply that waits for confirmation after a short, random delay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from scheduler.states import TaskType
from tests.scenario.cluster import ALWAYS_CHANGES

OUTPUTS = """\
output "at" {
  value = timestamp()
}
"""

#: A null_resource whose trigger changes every run (the scenario tests' own).
NULL = ALWAYS_CHANGES

STATIC = """\
output "v" {
  value = "unchanging"
}
"""

BROKEN = """\
output "v" {
  value = var.undeclared
}
"""

CONFIGS = {"outputs": OUTPUTS, "null": NULL, "static": STATIC, "broken": BROKEN}


@dataclass(frozen=True)
class WorkspaceSpec:
    name: str
    kind: str
    auto_apply: bool
    plan_seconds: float
    apply_seconds: float

    @property
    def config(self) -> str:
        return CONFIGS[self.kind]


@dataclass(frozen=True)
class Submission:
    #: Seconds after the start of the load.
    at: float
    workspace: str
    type: TaskType


@dataclass(frozen=True)
class Load:
    workspaces: list[WorkspaceSpec]
    submissions: list[Submission]


def plan_load(
    rng: random.Random,
    *,
    tasks: int,
    workspaces: int,
    window: float,
    plan_share: float = 0.55,
    pause: tuple[float, float] = (0.5, 3.0),
) -> Load:
    """``tasks`` submissions over ``window`` seconds into ``workspaces``
    workspaces: about one in seven uses the null provider, one is broken,
    two are static, the rest outputs only; half auto-apply."""
    kinds = ["broken", "static", "static"] + ["null"] * max(1, workspaces // 7)
    kinds += ["outputs"] * (workspaces - len(kinds))
    kinds = kinds[:workspaces]
    rng.shuffle(kinds)
    specs = [
        WorkspaceSpec(
            name=f"ws{i:02d}-{kind}",
            kind=kind,
            auto_apply=rng.random() < 0.5,
            plan_seconds=round(rng.uniform(*pause), 2),
            apply_seconds=round(rng.uniform(*pause), 2),
        )
        for i, kind in enumerate(kinds)
    ]
    # Some workspaces are busier than others, as in life.
    weights = [rng.uniform(0.5, 2.0) for _ in specs]
    submissions = sorted(
        (
            Submission(
                at=rng.uniform(0, window),
                workspace=rng.choices(specs, weights)[0].name,
                type=TaskType.PLAN if rng.random() < plan_share else TaskType.PLAN_AND_APPLY,
            )
            for _ in range(tasks)
        ),
        key=lambda s: s.at,
    )
    return Load(specs, submissions)


@dataclass
class Human:
    """Confirms (mostly) or discards plan+applies waiting for confirmation,
    each after its own delay, drawn when the task is first seen waiting."""

    rng: random.Random
    confirm_share: float = 0.85
    delay: tuple[float, float] = (0.5, 4.0)
    #: task id -> (when to decide, confirm?)
    pending: dict[int, tuple[float, bool]] = field(default_factory=dict)
    confirmed: int = 0
    discarded: int = 0

    def saw(self, task_id: int, now: float) -> None:
        if task_id not in self.pending:
            decide_at = now + self.rng.uniform(*self.delay)
            self.pending[task_id] = (decide_at, self.rng.random() < self.confirm_share)

    def due(self, now: float, hurry: bool = False) -> list[tuple[int, bool]]:
        """Decisions whose time has come (all of them when ``hurry``)."""
        ready = [(t, c) for t, (at, c) in self.pending.items() if hurry or at <= now]
        for task_id, _ in ready:
            del self.pending[task_id]
        return ready
