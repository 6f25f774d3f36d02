"""reconciler.sweep: re-send the hints the database says are owed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from scheduler import dispatcher, messages, reconciler, tasks, workspaces
from scheduler.models import Task, utcnow
from scheduler.runtime import Runtime
from scheduler.states import TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_WITH_CHANGES,
    claim_plans,
    dispatches,
    make_workspace,
    recorder,
    run_phase,
)

PA = TaskType.PLAN_AND_APPLY


def _age(rt: Runtime, task_id: int, seconds: float) -> None:
    with rt.transaction() as s:
        s.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(created_at=utcnow() - timedelta(seconds=seconds))
        )


def test_sweep_resends_what_is_owed(rt: Runtime, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ["idle", "queued", "confirmed", "waiting", "locked", "plans"]:
        make_workspace(rt, name, src)

    # plans: one old pending plan (owed), one fresh, one old but already claimed.
    old_plan = tasks.submit(rt, "plans", TaskType.PLAN)
    fresh_plan = tasks.submit(rt, "plans", TaskType.PLAN)
    claimed_plan = tasks.submit(rt, "plans", TaskType.PLAN)
    dispatcher.claim_plan(rt, claimed_plan.id)
    for t in (old_plan, claimed_plan):
        _age(rt, t.id, 3600)

    # queued: a pending plan+apply (fresh: dispatch hints do not wait).
    tasks.submit(rt, "queued", PA)
    # confirmed: an apply waiting to be claimed.
    c = tasks.submit(rt, "confirmed", PA)
    dispatcher.dispatch(rt, "confirmed")
    run_phase(rt, c.id, PLAN_WITH_CHANGES)
    tasks.confirm(rt, c.id)
    # waiting: apply_pending needs a human, not a dispatcher.
    w = tasks.submit(rt, "waiting", PA)
    dispatcher.dispatch(rt, "waiting")
    run_phase(rt, w.id, PLAN_WITH_CHANGES)
    # locked: pending plan+apply held by the manual lock.
    workspaces.lock(rt, "locked", holder="ops")
    tasks.submit(rt, "locked", PA)
    # idle: only finished work.
    i = tasks.submit(rt, "idle", PA)
    tasks.cancel(rt, i.id)

    assert tasks.get(rt, c.id).status is TaskStatus.APPLY_QUEUED
    assert tasks.get(rt, w.id).status is TaskStatus.APPLY_PENDING
    recorder(rt).sent.clear()

    result = reconciler.sweep(rt)

    assert result == reconciler.Sweep(plans=[old_plan.id], workspaces=["confirmed", "queued"])
    assert claim_plans(rt) == [old_plan.id]
    assert dispatches(rt) == ["confirmed", "queued"]
    assert len(recorder(rt).sent) == 3
    assert fresh_plan.id not in claim_plans(rt)

    # The re-sent hints are safe to act on: they make the owed progress.
    assert dispatcher.claim_plan(rt, old_plan.id).claimed
    assert dispatcher.dispatch(rt, "confirmed").action == "claimed_apply"
    assert dispatcher.dispatch(rt, "queued").action == "claimed_plan"


def test_sweep_with_nothing_owed_sends_nothing(rt: Runtime, tmp_path: Path) -> None:
    make_workspace(rt, "net", tmp_path / "src")
    assert reconciler.sweep(rt) == reconciler.Sweep([], [])
    tasks.submit(rt, "net", TaskType.PLAN)  # fresh: its own message is still on the way
    recorder(rt).sent.clear()
    assert reconciler.sweep(rt) == reconciler.Sweep([], [])
    assert recorder(rt).sent == []


def test_unlock_makes_a_locked_workspace_owed_again(rt: Runtime, tmp_path: Path) -> None:
    make_workspace(rt, "net", tmp_path / "src")
    workspaces.lock(rt, "net", holder="ops")
    tasks.submit(rt, "net", PA)
    assert reconciler.sweep(rt).workspaces == []
    workspaces.unlock(rt, "net")
    recorder(rt).sent.clear()
    assert reconciler.sweep(rt).workspaces == ["net"]
    assert recorder(rt).sent == [messages.dispatch("net")]


def test_legacy_sweep_dispatches_workspaces_with_pending_plans(
    legacy_rt: Runtime, tmp_path: Path
) -> None:
    rt = legacy_rt
    make_workspace(rt, "net", tmp_path / "src")
    plan = tasks.submit(rt, "net", TaskType.PLAN)
    _age(rt, plan.id, 3600)
    recorder(rt).sent.clear()
    assert reconciler.sweep(rt) == reconciler.Sweep(plans=[], workspaces=["net"])
    assert recorder(rt).sent == [messages.dispatch("net")]


def test_a_backlog_still_queued_is_not_resent_only_lost_hints_are(
    rt: Runtime, tmp_path: Path
) -> None:
    """O(owed), not O(backlog): plans waiting behind a deep queue have their
    hint in it; the sweep re-sends only as many as the broker lacks."""
    from celery_app.runtime import CeleryPublisher, private_app

    app = private_app(rt.settings, "reconciler-test")
    broker = Runtime(rt.settings, CeleryPublisher(app), actor="test")

    def purge() -> None:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(messages.QUEUE_PLANS)
            conn.default_channel.queue_purge(messages.QUEUE_DISPATCH)

    purge()
    try:
        make_workspace(rt, "net", tmp_path / "src")
        # The oldest three lost their hints (rt's publisher only records);
        # thirty more are queued on the real broker, with no worker to take them.
        lost = [tasks.submit(rt, "net", TaskType.PLAN).id for _ in range(3)]
        queued = [tasks.submit(broker, "net", TaskType.PLAN).id for _ in range(30)]
        for task_id in lost + queued:
            _age(rt, task_id, 3600)
        assert isinstance(broker.publisher, messages.QueueDepths)
        assert broker.publisher.depth(messages.QUEUE_PLANS) == 30

        assert reconciler.sweep(broker).plans == lost
        assert broker.publisher.depth(messages.QUEUE_PLANS) == 33
        # Now every pending plan has its hint queued: nothing more is owed.
        assert reconciler.sweep(broker).plans == []
        assert broker.publisher.depth(messages.QUEUE_PLANS) == 33

        # Dispatches: four idle workspaces with a plan+apply each, the
        # oldest of whose wake-up was lost; the others' are queued.
        make_workspace(rt, "lost", tmp_path / "src")
        old = tasks.submit(rt, "lost", PA)
        _age(rt, old.id, 7200)
        for name in ("a", "b", "c"):
            make_workspace(rt, name, tmp_path / "src")
            _age(rt, tasks.submit(broker, name, PA).id, 3600)
        assert broker.publisher.depth(messages.QUEUE_DISPATCH) == 3
        assert reconciler.sweep(broker).workspaces == ["lost"]
        assert reconciler.sweep(broker).workspaces == []
        assert broker.publisher.depth(messages.QUEUE_DISPATCH) == 4
    finally:
        purge()
        broker.close()
        app.close()


def test_a_busy_workspace_owes_no_dispatch_however_long_its_queue(
    rt: Runtime, tmp_path: Path
) -> None:
    make_workspace(rt, "net", tmp_path / "src")
    active = tasks.submit(rt, "net", PA)
    queued = [tasks.submit(rt, "net", PA).id for _ in range(20)]
    dispatcher.dispatch(rt, "net")
    assert tasks.get(rt, active.id).status is TaskStatus.PLANNING
    for task_id in queued:
        _age(rt, task_id, 3600)
    recorder(rt).sent.clear()
    assert reconciler.sweep(rt).workspaces == []
    # Once the active one ends and its wake-up is lost, the head is owed.
    with rt.transaction() as s:
        s.execute(update(Task).where(Task.id == active.id).values(status="failed"))
    assert reconciler.sweep(rt).workspaces == ["net"]
    assert dispatches(rt) == ["net"]
