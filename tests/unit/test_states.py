"""The transition table, read as a graph."""

from __future__ import annotations

import importlib.util
import re
from collections import deque
from pathlib import Path
from types import ModuleType

import pytest

from scheduler import models, tasks
from scheduler.states import (
    ACTIVE_APPLY,
    CLAIMS,
    RUNNING,
    SETTLED,
    TERMINAL,
    TRANSITIONS,
    Phase,
    TaskStatus,
    TaskType,
    allowed,
    phase_of,
)

S = TaskStatus

#: The issue's state diagram, written out edge by edge. The table must be
#: exactly this: a new edge is a design change, not a refactoring. Issue 5
#: (crash safety) added the re-claim of a lost plan (planning -> planning,
#: under a new fence) and the cancel of a running phase (planning/applying ->
#: cancelled).
EXPECTED: dict[TaskType, set[tuple[TaskStatus, TaskStatus]]] = {
    TaskType.PLAN: {
        (S.PENDING, S.PLANNING),
        (S.PENDING, S.CANCELLED),
        (S.PLANNING, S.PLANNING),
        (S.PLANNING, S.SUCCESS),
        (S.PLANNING, S.FAILED),
        (S.PLANNING, S.CANCELLED),
    },
    TaskType.PLAN_AND_APPLY: {
        (S.PENDING, S.PLANNING),
        (S.PENDING, S.CANCELLED),
        (S.PLANNING, S.PLANNING),
        (S.PLANNING, S.SUCCESS),
        (S.PLANNING, S.APPLY_PENDING),
        (S.PLANNING, S.APPLY_QUEUED),
        (S.PLANNING, S.FAILED),
        (S.PLANNING, S.CANCELLED),
        (S.APPLY_PENDING, S.APPLY_QUEUED),
        (S.APPLY_PENDING, S.DISCARDED),
        (S.APPLY_PENDING, S.CANCELLED),
        (S.APPLY_QUEUED, S.APPLYING),
        (S.APPLY_QUEUED, S.CANCELLED),
        (S.APPLYING, S.APPLIED),
        (S.APPLYING, S.FAILED),
        (S.APPLYING, S.CANCELLED),
    },
}
APPLY_STATUSES = {S.APPLY_PENDING, S.APPLY_QUEUED, S.APPLYING, S.APPLIED, S.DISCARDED}


def reachable(task_type: TaskType) -> set[TaskStatus]:
    seen = {S.PENDING}
    todo = deque([S.PENDING])
    while todo:
        for nxt in allowed(task_type, todo.popleft()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("task_type", list(TaskType))
def test_every_pair_is_accepted_exactly_when_listed(task_type: TaskType) -> None:
    for current in S:
        for to in S:
            legal = (current, to) in EXPECTED[task_type]
            assert (to in allowed(task_type, current)) is legal, (task_type, current, to)


def test_table_has_every_type_and_only_claim_self_loops() -> None:
    """A self-loop is legal only as a claim (:data:`CLAIMS`): planning ->
    planning re-claims a plan whose executor was lost, and the claim bumps
    the fence, so it is a real change (new owner, new lease), not a no-op.
    Any other self-loop would be a status write that changes nothing. An
    apply is never re-claimed (terraform apply is not idempotent)."""
    assert set(TRANSITIONS) == set(TaskType)
    claim_loops = {(a, b) for a, b in CLAIMS if a == b}
    assert claim_loops == {(S.PLANNING, S.PLANNING)}
    for table in TRANSITIONS.values():
        loops = {(c, c) for c, targets in table.items() if c in targets}
        assert loops == claim_loops
    assert S.APPLYING not in allowed(TaskType.PLAN_AND_APPLY, S.APPLYING)


def test_claims_are_exactly_the_moves_into_a_running_status() -> None:
    """Every way into planning/applying hands the phase to a new executor,
    so it must bump the fence; and every claim is a legal move."""
    into_running = {
        (current, to)
        for table in TRANSITIONS.values()
        for current, targets in table.items()
        for to in targets
        if to in RUNNING
    }
    assert into_running == CLAIMS


@pytest.mark.parametrize("task_type", list(TaskType))
def test_terminal_has_no_way_out(task_type: TaskType) -> None:
    for status in TERMINAL:
        assert status not in TRANSITIONS[task_type]
        assert allowed(task_type, status) == frozenset()


@pytest.mark.parametrize("task_type", list(TaskType))
def test_every_reachable_non_terminal_status_has_a_way_out(task_type: TaskType) -> None:
    for status in reachable(task_type) - TERMINAL:
        assert allowed(task_type, status), status
    # ...and every status with a way out is reachable (no dead rows in the table).
    assert set(TRANSITIONS[task_type]) <= reachable(task_type)


def test_plan_tasks_never_reach_apply_statuses() -> None:
    assert reachable(TaskType.PLAN) == {S.PENDING, S.PLANNING, S.SUCCESS, S.FAILED, S.CANCELLED}
    assert not reachable(TaskType.PLAN) & APPLY_STATUSES


def test_plan_and_apply_reaches_everything() -> None:
    assert reachable(TaskType.PLAN_AND_APPLY) == set(S)


def test_active_apply_is_what_holds_a_workspace() -> None:
    """Claimed and not finished: everything a plan+apply passes through
    between leaving the queue and ending."""
    assert reachable(TaskType.PLAN_AND_APPLY) - TERMINAL - {S.PENDING} == ACTIVE_APPLY
    assert {S.PLANNING, S.APPLYING} == RUNNING
    assert RUNNING <= ACTIVE_APPLY
    assert not ACTIVE_APPLY & TERMINAL
    assert TERMINAL | {S.APPLY_PENDING} == SETTLED


def _predicate_statuses(predicate: str) -> tuple[set[str], set[str]]:
    m = re.fullmatch(r"type = '([a-z_]+)' AND status IN \(([^)]*)\)", predicate)
    assert m, predicate
    return {m.group(1)}, set(re.findall(r"'([a-z_]+)'", m.group(2)))


def _migration() -> ModuleType:
    path = Path(models.__file__).parent / "migrations" / "versions" / "0001_initial.py"
    spec = importlib.util.spec_from_file_location("runq_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_active_apply_matches_the_partial_index_predicate() -> None:
    types, statuses = _predicate_statuses(models.ACTIVE_APPLY_PREDICATE)
    assert types == {TaskType.PLAN_AND_APPLY.value}
    assert statuses == {s.value for s in ACTIVE_APPLY}

    table = models.Base.metadata.tables["tasks"]
    index = next(i for i in table.indexes if i.name == "uq_tasks_one_active_apply")
    assert index.unique
    assert [c.name for c in index.columns] == ["workspace_id"]
    for dialect in ("postgresql", "sqlite"):
        assert str(index.dialect_options[dialect]["where"]) == models.ACTIVE_APPLY_PREDICATE

    # The migration keeps a frozen copy; it must say the same.
    types, statuses = _predicate_statuses(_migration().ACTIVE)
    assert types == {TaskType.PLAN_AND_APPLY.value}
    assert statuses == {s.value for s in ACTIVE_APPLY}


def test_migration_check_constraints_list_every_enum_value() -> None:
    mig = _migration()
    assert set(re.findall(r"'([a-z_]+)'", mig.STATUSES)) == {s.value for s in S}
    assert set(re.findall(r"'([a-z_]+)'", mig.TYPES)) == {t.value for t in TaskType}


def test_cancellable_statuses_are_legal_cancels() -> None:
    for status in tasks.CANCELLABLE:
        assert S.CANCELLED in allowed(TaskType.PLAN_AND_APPLY, status)
        assert status not in RUNNING
    # Every legal cancel is offered to users: at once for a task that is not
    # running (CANCELLABLE), through its executor for a running phase.
    sources = {
        current
        for task_type in TaskType
        for current, targets in TRANSITIONS[task_type].items()
        if S.CANCELLED in targets
    }
    assert sources == tasks.CANCELLABLE | RUNNING


def test_phase_of() -> None:
    assert phase_of(S.PLANNING) is Phase.PLAN
    assert phase_of(S.APPLYING) is Phase.APPLY
    for status in set(S) - RUNNING:
        assert phase_of(status) is None
