"""reports.next_status: where a finished phase takes a task."""

from __future__ import annotations

import itertools

import pytest

from executors.base import Changes, PhaseResult
from scheduler.reports import next_status
from scheduler.states import TRANSITIONS, Phase, TaskStatus, TaskType

S = TaskStatus
CHANGES = PhaseResult(ok=True, has_changes=True, changes=Changes(add=1))
# Output-only changes: terraform says "changes", but no resource moves.
OUTPUT_CHANGES = PhaseResult(ok=True, has_changes=True, changes=Changes())
NO_CHANGES = PhaseResult(ok=True, has_changes=False, changes=Changes())
FAILED = PhaseResult(ok=False, error="Error: boom")
# A failure that still reports has_changes must fail, not wait for a confirm.
FAILED_WITH_CHANGES = PhaseResult(ok=False, has_changes=True, changes=Changes(add=3))


@pytest.mark.parametrize(
    ("task_type", "phase", "result", "auto_apply", "expected"),
    [
        (TaskType.PLAN, Phase.PLAN, CHANGES, False, S.SUCCESS),
        (TaskType.PLAN, Phase.PLAN, CHANGES, True, S.SUCCESS),
        (TaskType.PLAN, Phase.PLAN, NO_CHANGES, True, S.SUCCESS),
        (TaskType.PLAN, Phase.PLAN, FAILED, False, S.FAILED),
        (TaskType.PLAN_AND_APPLY, Phase.PLAN, CHANGES, False, S.APPLY_PENDING),
        (TaskType.PLAN_AND_APPLY, Phase.PLAN, CHANGES, True, S.APPLY_QUEUED),
        (TaskType.PLAN_AND_APPLY, Phase.PLAN, OUTPUT_CHANGES, False, S.APPLY_PENDING),
        (TaskType.PLAN_AND_APPLY, Phase.PLAN, NO_CHANGES, False, S.SUCCESS),
        (TaskType.PLAN_AND_APPLY, Phase.PLAN, NO_CHANGES, True, S.SUCCESS),
        (TaskType.PLAN_AND_APPLY, Phase.PLAN, FAILED, True, S.FAILED),
        (TaskType.PLAN_AND_APPLY, Phase.PLAN, FAILED_WITH_CHANGES, False, S.FAILED),
        (TaskType.PLAN_AND_APPLY, Phase.APPLY, PhaseResult(ok=True), False, S.APPLIED),
        (TaskType.PLAN_AND_APPLY, Phase.APPLY, PhaseResult(ok=True), True, S.APPLIED),
        (TaskType.PLAN_AND_APPLY, Phase.APPLY, FAILED, False, S.FAILED),
    ],
)
def test_next_status(
    task_type: TaskType, phase: Phase, result: PhaseResult, auto_apply: bool, expected: TaskStatus
) -> None:
    assert next_status(task_type, phase, result, auto_apply) is expected


def test_next_status_is_always_a_legal_move_from_the_running_status() -> None:
    results = [CHANGES, OUTPUT_CHANGES, NO_CHANGES, FAILED, FAILED_WITH_CHANGES]
    for task_type, result, auto_apply in itertools.product(TaskType, results, [False, True]):
        phases = [Phase.PLAN] if task_type is TaskType.PLAN else [Phase.PLAN, Phase.APPLY]
        for phase in phases:
            running = S.PLANNING if phase is Phase.PLAN else S.APPLYING
            to = next_status(task_type, phase, result, auto_apply)
            assert to in TRANSITIONS[task_type][running], (task_type, phase, result, to)
