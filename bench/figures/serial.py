"""Serialized plan+apply: dispatch claims per second and the hand-off gap.

W auto-apply workspaces are made and manually locked (a lock holds back
plan+apply, so nothing is claimed while the bench submits), K plan+apply
tasks are submitted to each, and the workspaces are unlocked (each unlock
wakes the dispatcher). Real workers then run every task (fake phases of
0 s). From ``task_events`` afterwards:

* claims/s: claim events (to ``planning`` or ``applying``, not the initial
  ``submitted``) divided by the window from the first claim to the last;
* hand-off gap: for consecutive tasks of a workspace (by ``queue_seq``),
  the next task's claim (its first event to ``planning``) minus the previous
  task's end (its event to ``applied``, or to whatever final status it had).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from itertools import pairwise

from sqlalchemy import select

from bench.harness import Bench, events_of, ms
from scheduler import tasks, workspaces
from scheduler.api import wait
from scheduler.models import Task
from scheduler.runtime import Runtime
from scheduler.states import TERMINAL, TaskStatus, TaskType

CLAIMED = (str(TaskStatus.PLANNING), str(TaskStatus.APPLYING))
ENDS = {str(s) for s in TERMINAL}


def run(bench: Bench, rt: Runtime, n_workspaces: int, per_workspace: int) -> dict[str, object]:
    """Claims/s, claim count and every gap (ms) of one serialized run."""
    names = bench.names("serial", n_workspaces)
    for name in names:
        workspaces.create(rt, name, source_dir=bench.source_dir, auto_apply=True)
        workspaces.lock(rt, name, holder="bench", reason="queueing the run")
    ids = [
        tasks.submit(rt, name, TaskType.PLAN_AND_APPLY).id
        for _ in range(per_workspace)
        for name in names
    ]
    for name in names:
        workspaces.unlock(rt, name)
    views = wait(rt, ids, timeout=900, poll=0.2)
    bad = [v for v in views if v.status is not TaskStatus.APPLIED]
    assert not bad, f"{len(bad)} tasks did not end applied, e.g. {bad[0]}"
    events = events_of(rt, ids)
    claims = sorted(e.at for e in events if e.from_status is not None and e.to_status in CLAIMED)
    window = (claims[-1] - claims[0]).total_seconds()
    with rt.sessions() as s:
        order = s.execute(
            select(Task.id, Task.workspace_id).where(Task.id.in_(ids)).order_by(Task.queue_seq)
        ).all()
    first_claim: dict[int, datetime] = {}
    ended: dict[int, datetime] = {}
    for e in events:
        if e.to_status == TaskStatus.PLANNING and e.task_id not in first_claim:
            first_claim[e.task_id] = e.at
        if e.to_status in ENDS:
            ended[e.task_id] = e.at
    queues: dict[int, list[int]] = defaultdict(list)
    for task_id, ws_id in order:
        queues[ws_id].append(task_id)
    gaps = [
        ms(first_claim[nxt], ended[prev])
        for queue in queues.values()
        for prev, nxt in pairwise(queue)
    ]
    return {
        "claims": len(claims),
        "window_s": window,
        "claims_per_s": len(claims) / window if window > 0 else 0.0,
        "gaps_ms": gaps,
    }
