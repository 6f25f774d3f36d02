"""The seed's scenarios, driven against a :class:`Cluster` in either dispatch
mode. Each returns the tasks' :class:`Life` records; the test modules judge
them (``new`` mode: the promise holds; ``legacy`` mode: the opposite ordering,
which shows the same measurement can tell the two apart).

Pauses (``slow.env``) are chosen so every ordering asserted has seconds of
margin over dispatch latency (a claim takes well under a second); nothing
asserts how long anything took.
"""

from __future__ import annotations

import itertools
import time

from scheduler import tasks
from scheduler.states import SETTLED, TERMINAL, TaskStatus
from tests.scenario.cluster import DEADLINE, Cluster, Life, describe


def plan_then_plan_and_apply(c: Cluster) -> tuple[Life, Life]:
    """1. Plan A, then right away plan+apply B, in one workspace."""
    ws = c.workspace("s1-plan-then-apply", plan_seconds=3)
    a = c.submit(ws, "plan")
    b = c.submit(ws, "plan_and_apply")
    c.wait([a.id, b.id], until=SETTLED)
    lives = c.lives([a.id, b.id])
    return lives[a.id], lives[b.id]


def three_plans(c: Cluster) -> list[Life]:
    """2. Three plans submitted together in one workspace."""
    ws = c.workspace("s2-three-plans", plan_seconds=3)
    ids = [c.submit(ws, "plan").id for _ in range(3)]
    c.wait(ids)
    return list(c.lives(ids).values())


def two_plan_and_applies(c: Cluster) -> tuple[Life, Life]:
    """3. Plan+apply A then B in an auto-apply workspace."""
    ws = c.workspace("s3-two-applies", auto_apply=True, plan_seconds=1, apply_seconds=2)
    a = c.submit(ws, "plan_and_apply")
    b = c.submit(ws, "plan_and_apply")
    c.wait([a.id, b.id])
    lives = c.lives([a.id, b.id])
    return lives[a.id], lives[b.id]


def mixed(c: Cluster) -> tuple[Life, Life, Life]:
    """4. With plan+apply A applying, submit plan B and plan+apply C."""
    ws = c.workspace("s4-mixed", auto_apply=True, plan_seconds=1, apply_seconds=4)
    a = c.submit(ws, "plan_and_apply")
    # Poll the database (not a sleep) until A's apply runs.
    c.wait_status(a.id, {TaskStatus.APPLYING, *SETTLED})
    b = c.submit(ws, "plan")
    cc = c.submit(ws, "plan_and_apply")
    c.wait([a.id, b.id, cc.id])
    lives = c.lives([a.id, b.id, cc.id])
    return lives[a.id], lives[b.id], lives[cc.id]


# -- the seed's verdicts, shared by every mode and broker that runs them ---------


def check_plan_does_not_delay_plan_and_apply(a: Life, b: Life) -> None:
    timeline = describe([a, b])
    assert a.task.status is TaskStatus.SUCCESS, timeline
    assert b.task.status is TaskStatus.APPLY_PENDING, timeline
    # B was claimed before A's plan ended (the two may be claimed in either
    # order: plans take no lock, so nothing orders them).
    assert b.claimed < a.ended, timeline


def check_three_plans_at_once(lives: list[Life]) -> None:
    timeline = describe(lives)
    assert all(life.task.status is TaskStatus.SUCCESS for life in lives), timeline
    # One instant inside all three active intervals.
    assert max(life.claimed for life in lives) < min(life.ended for life in lives), timeline


def check_plan_and_applies_serialized(a: Life, b: Life) -> None:
    timeline = describe([a, b])
    assert a.task.queue_seq < b.task.queue_seq
    assert a.task.status is TaskStatus.APPLIED, timeline
    assert b.task.status is TaskStatus.APPLIED, timeline
    # A ran start to finish (plan, apply) before B was claimed.
    assert a.claimed < a.entered(TaskStatus.APPLYING) < a.ended <= b.claimed, timeline


def check_mixed(a: Life, b: Life, c: Life) -> None:
    timeline = describe([a, b, c])
    assert a.task.status is TaskStatus.APPLIED, timeline
    assert b.task.status is TaskStatus.SUCCESS, timeline
    assert c.task.status is TaskStatus.APPLIED, timeline
    # Plan B was claimed while A applied: it did not wait.
    assert a.entered(TaskStatus.APPLYING) < b.claimed < a.ended, timeline
    # Plan+apply C waited for A to end.
    assert a.ended <= c.claimed, timeline


def dispatch_storm(c: Cluster, runs: int = 5) -> tuple[list[int], dict[int, bool], dict[int, Life]]:
    """Race: ``runs`` queued plan+applies, 50 dispatch messages at once to
    every worker's pool processes, and 10 more each time a run is confirmed
    or discarded (every other one of each), until all have ended."""
    ws = c.workspace("race")
    # Queued without their own hints: the storm is what moves them.
    ids = [c.submit_quietly(ws, "plan_and_apply").id for _ in range(runs)]
    c.send_dispatch(ws, 50)

    confirm = {task_id: i % 2 == 0 for i, task_id in enumerate(ids)}
    decided: set[int] = set()
    deadline = time.monotonic() + DEADLINE
    while True:
        views = [tasks.get(c.rt, i) for i in ids]
        if all(v.status in TERMINAL for v in views):
            break
        assert time.monotonic() < deadline, f"stuck: {[(v.id, v.status) for v in views]}"
        for view in views:
            if view.status is TaskStatus.APPLY_PENDING and view.id not in decided:
                decided.add(view.id)
                if confirm[view.id]:
                    tasks.confirm(c.rt, view.id)
                else:
                    tasks.discard(c.rt, view.id)
                c.send_dispatch(ws, 10)
        time.sleep(0.05)
    return ids, confirm, c.lives(ids)


def check_storm(ids: list[int], confirm: dict[int, bool], lives: dict[int, Life]) -> None:
    """No task claimed twice, no two holding the workspace at once, claims in
    queue order, every one ended as decided."""
    timeline = describe(lives.values())
    for task_id, life in lives.items():
        assert len(life.claims) == 1, f"task {task_id} claimed {len(life.claims)}x\n{timeline}"
        expected = TaskStatus.APPLIED if confirm[task_id] else TaskStatus.DISCARDED
        assert life.task.status is expected, timeline
        applying = [e for e in life.events if e.to_status is TaskStatus.APPLYING]
        assert len(applying) == (1 if confirm[task_id] else 0), timeline
    by_claim = sorted(lives.values(), key=lambda life: life.claimed)
    assert [life.id for life in by_claim] == ids, f"claims out of queue order\n{timeline}"
    for earlier, later in itertools.pairwise(by_claim):
        assert earlier.ended <= later.claimed, f"{earlier.id} overlaps {later.id}\n{timeline}"
