"""Stored Terraform state (scheduler.artifacts.store_state): written only
under the applying task's current fence, serials grow within one lineage,
and no stale apply can replace newer state."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import func, select

from executors.base import Directive, Reply, StateWritten
from executors.fake import FAKE_PLAN
from scheduler import artifacts, bundles, dispatcher, reconciler, reports, tasks
from scheduler.models import StateVersion
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskType
from scheduler.workspaces import load as load_workspace
from tests.integration.helpers import (
    APPLY_OK,
    PLAN_WITH_CHANGES,
    applying,
    begin,
    claimed,
    end,
    everything,
    is_stale,
    lapse,
)

LINEAGE = "3f1e9a2c-0000-4000-8000-000000000001"


def state(serial: int, lineage: str = LINEAGE, extra: str = "") -> bytes:
    doc = {"version": 4, "serial": serial, "lineage": lineage, "resources": [], "x": extra}
    return json.dumps(doc).encode()


def write(
    rt: Runtime, tid: int, fence: int, serial: int, lineage: str = LINEAGE, extra: str = ""
) -> Reply:
    report = StateWritten(tid, fence, serial, lineage, state(serial, lineage, extra))
    with rt.transaction() as s:
        return artifacts.store_state(s, report)


def stored(rt: Runtime, ws: str) -> list[tuple[int, str, int | None, int]]:
    """(serial, lineage, task id, fence) of the workspace's state versions."""
    with rt.sessions() as s:
        wid = load_workspace(s, ws).id
        rows = s.execute(
            select(
                StateVersion.serial, StateVersion.lineage, StateVersion.task_id, StateVersion.fence
            )
            .where(StateVersion.workspace_id == wid)
            .order_by(StateVersion.id)
        ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def refused(reply: Reply, reason: str) -> bool:
    """Refused as wrong, not as stale: the holder is current, its write is not."""
    return not reply.accepted and reply.directive is Directive.CONTINUE and reason in reply.reason


def test_state_is_stored_only_under_the_applying_fence(rt: Runtime, ws: str) -> None:
    # A plan writes no state, even under its current fence.
    plan, plan_fence = claimed(rt, ws)
    begin(rt, plan, plan_fence)
    before = everything(rt)
    assert is_stale(write(rt, plan, plan_fence, 1))
    assert is_stale(write(rt, 999_999, 1, 1))
    assert everything(rt) == before

    # Nor does a plan+apply before its apply is claimed.
    tid, f = claimed(rt, ws, TaskType.PLAN_AND_APPLY)
    begin(rt, tid, f)
    end(rt, tid, f, PLAN_WITH_CHANGES)
    tasks.confirm(rt, tid)
    before = everything(rt)
    assert is_stale(write(rt, tid, f, 1))
    assert everything(rt) == before

    decision = dispatcher.dispatch(rt, ws)
    assert decision.task_id == tid and decision.fence == f + 1
    f += 1
    before = everything(rt)
    # Stale (the plan's) and future fences are refused; the current one is stored.
    assert is_stale(write(rt, tid, f - 1, 1))
    assert is_stale(write(rt, tid, f + 1, 1))
    assert everything(rt) == before
    assert write(rt, tid, f, 1) == Reply.ok()

    with rt.sessions() as s:
        latest = artifacts.latest(s, load_workspace(s, ws).id)
        assert latest is not None
        content = state(1)
        assert (latest.serial, latest.lineage, latest.task_id, latest.fence) == (1, LINEAGE, tid, f)
        assert (latest.content, latest.size) == (content, len(content))
        assert latest.sha256 == hashlib.sha256(content).hexdigest()


def test_serials_grow_within_the_lineage(rt: Runtime, ws: str) -> None:
    tid, f = applying(rt, ws)
    assert write(rt, tid, f, 1) == Reply.ok()
    assert write(rt, tid, f, 2) == Reply.ok()
    assert write(rt, tid, f, 4) == Reply.ok(), "terraform may skip serials"

    before = everything(rt)
    # Older, or the same serial with other bytes: refused.
    assert refused(write(rt, tid, f, 3), "serial 3 is not newer than the stored 4")
    assert refused(write(rt, tid, f, 4, extra="other"), "serial 4 is not newer")
    # Another lineage: refused, even with a higher serial.
    assert refused(write(rt, tid, f, 9, lineage="other-lineage"), "lineage other-lineage differs")
    # The same serial with the same bytes: a retried report, fine, no new row.
    assert write(rt, tid, f, 4) == Reply.ok()
    assert everything(rt) == before

    assert write(rt, tid, f, 5) == Reply.ok()
    assert stored(rt, ws) == [(n, LINEAGE, tid, f) for n in (1, 2, 4, 5)]


def test_the_next_apply_continues_the_lineage(rt: Runtime, ws: str) -> None:
    first, f1 = applying(rt, ws)
    assert write(rt, first, f1, 3) == Reply.ok()
    assert end(rt, first, f1, APPLY_OK, Phase.APPLY).accepted
    # The executor of the next phase is handed the newest state, in its bundle
    # (with the saved plan its own plan sent).
    second, f2 = applying(rt, ws)
    with rt.transaction() as s:
        bundle = bundles.build(s, rt.settings, second, f2)
    assert bundle.state == state(3)
    assert bundle.plan == FAKE_PLAN
    assert refused(write(rt, second, f2, 3, extra="x"), "not newer")
    assert refused(write(rt, second, f2, 4, lineage="fresh"), "differs")
    assert write(rt, second, f2, 4) == Reply.ok()
    assert [(n, t) for n, _, t, _ in stored(rt, ws)] == [(3, first), (4, second)]


def test_a_stale_apply_cannot_write_after_its_lease_expired(rt: Runtime, ws: str) -> None:
    old, f_old = applying(rt, ws)
    begin(rt, old, f_old, Phase.APPLY)
    assert write(rt, old, f_old, 1) == Reply.ok()
    lapse(rt, old)
    assert reconciler.sweep(rt).lost == [old]

    # Resumed after a pause past its lease: refused, and told to stop.
    before = everything(rt)
    assert is_stale(write(rt, old, f_old, 2))
    assert is_stale(reports.accept(rt, StateWritten(old, f_old, 2, LINEAGE, state(2))))
    assert everything(rt) == before

    # The next apply builds on what the lost one stored; the lost one still cannot write.
    new, f_new = applying(rt, ws)
    begin(rt, new, f_new, Phase.APPLY)
    assert write(rt, new, f_new, 2) == Reply.ok()
    assert is_stale(write(rt, old, f_old, 7))
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(StateVersion)) == 2
    assert [(n, t, f) for n, _, t, f in stored(rt, ws)] == [(1, old, f_old), (2, new, f_new)]
