"""Agents' reports, signed and sent over the broker, verified by the scheduler.

Each case is a message as it would arrive on ``runq.reports``, handled by
:func:`scheduler.remote.handle` against the real database: only a report
signed with the run key of its own (task, fence), derived from the token of
the pool that runs the task, changes anything. The last test sends real
reports through a real Redis broker to the consumer a core worker runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from celery_app import agent as agent_app
from executors import remote, signing, wire
from executors.base import Bundle, Directive, Finished, Heartbeat, PhaseResult, Started
from executors.outcome import MessageRejected, PhaseFailed
from scheduler import dispatcher, pools, tasks, workspaces
from scheduler import remote as server
from scheduler.messages import RecordingPublisher
from scheduler.models import Agent, TaskEvent
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import Phase, TaskStatus

pytestmark = [pytest.mark.redis]


class Pool:
    def __init__(self, rt: Runtime, name: str) -> None:
        self.name = name
        _, self.token = pools.create(rt, name)

    def key(self, task_id: int, fence: int) -> bytes:
        return signing.run_key(self.token, task_id, fence)


@pytest.fixture
def pool(rt: Runtime) -> Pool:
    return Pool(rt, "p1")


@pytest.fixture
def claimed(rt: Runtime, pool: Pool, src: Path) -> tuple[int, int]:
    """A plan task of an agent workspace in pool p1, claimed (fence 1)."""
    (src / "main.tf").write_text('output "x" { value = 1 }\n')
    workspaces.create(rt, "agentws", mode="agent", agent_pool=pool.name, source_dir=str(src))
    t = tasks.submit(rt, "agentws", "plan")
    assert dispatcher.claim_plan(rt, t.id).claimed
    return t.id, tasks.get(rt, t.id).fence


def message(key: bytes, pool: str, report: Any, reply_to: str = "runq.reply.test") -> Any:
    body = {"report": wire.report_to_json(report), "reply_to": reply_to, "id": "r1"}
    return signing.seal(key, pool, body)


def reply_of(key: bytes, out: Any) -> dict[str, Any]:
    assert out is not None, "expected a reply"
    reply_to, sealed = out
    assert reply_to == "runq.reply.test"
    return signing.open_(key, sealed)


def events(rt: Runtime, task_id: int) -> int:
    with rt.sessions() as s:
        return s.scalar(select(func.count()).where(TaskEvent.task_id == task_id)) or 0


def handle_of(rt: Runtime, task_id: int) -> str | None:
    return tasks.get(rt, task_id).executor_handle


def test_signed_report_is_applied_and_answered(
    rt: Runtime, pool: Pool, claimed: tuple[int, int]
) -> None:
    tid, fence = claimed
    key = pool.key(tid, fence)
    out = server.handle(rt, message(key, pool.name, Started(tid, fence, Phase.PLAN, "agent:a:1")))
    doc = reply_of(key, out)
    assert doc["id"] == "r1" and doc["accepted"] is True
    assert handle_of(rt, tid) == "agent:a:1"


@pytest.mark.parametrize("case", ["other_pool_token", "unsigned", "tampered", "other_claim_key"])
def test_forged_or_badly_signed_reports_change_nothing_and_get_no_reply(
    rt: Runtime, pool: Pool, claimed: tuple[int, int], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    tid, fence = claimed
    other = Pool(rt, "p2")
    report = Finished(tid, fence, Phase.PLAN, PhaseResult(ok=True))
    if case == "other_pool_token":
        # Signed correctly, but with another pool's token, claiming to be p1.
        msg = message(other.key(tid, fence), pool.name, report)
    elif case == "unsigned":
        msg = {**message(pool.key(tid, fence), pool.name, report), "sig": ""}
    elif case == "tampered":
        msg = message(pool.key(tid, fence), pool.name, report)
        msg["body"] = msg["body"].replace('"ok":true', '"ok":false')
        assert '"ok":false' in msg["body"]
    else:
        # A key for another claim of the same task (what a Job of fence 1
        # holds) cannot sign for fence 2, and vice versa.
        msg = message(pool.key(tid, fence + 1), pool.name, report)
    before = events(rt, tid)
    assert server.handle(rt, msg) is None
    assert tasks.get(rt, tid).status is TaskStatus.PLANNING
    assert events(rt, tid) == before
    assert "report_rejected" in [getattr(r, "action", None) for r in caplog.records]


def test_stale_report_gets_a_signed_stale_reply_and_changes_nothing(
    rt: Runtime, pool: Pool, claimed: tuple[int, int]
) -> None:
    tid, fence = claimed
    new_key = pool.key(tid, fence)
    server.handle(rt, message(new_key, pool.name, Started(tid, fence, Phase.PLAN, "agent:a:1")))
    # An executor of an earlier claim: validly signed with its own key.
    old = fence - 1
    before = events(rt, tid)
    out = server.handle(
        rt,
        message(
            pool.key(tid, old), pool.name, Finished(tid, old, Phase.PLAN, PhaseResult(ok=True))
        ),
    )
    doc = reply_of(pool.key(tid, old), out)
    assert doc["accepted"] is False and doc["directive"] == str(Directive.KILL)
    assert events(rt, tid) == before
    assert tasks.get(rt, tid).status is TaskStatus.PLANNING


def test_a_pool_cannot_report_for_another_pools_task(
    rt: Runtime, pool: Pool, claimed: tuple[int, int]
) -> None:
    tid, fence = claimed
    other = Pool(rt, "p2")
    out = server.handle(
        rt,
        message(other.key(tid, fence), other.name, Started(tid, fence, Phase.PLAN, "agent:b:1")),
    )
    doc = reply_of(other.key(tid, fence), out)
    assert doc["accepted"] is False
    assert handle_of(rt, tid) is None


def test_unknown_pool_and_garbage_are_rejected(rt: Runtime, claimed: tuple[int, int]) -> None:
    tid, fence = claimed
    key = signing.run_key("whatever", tid, fence)
    assert server.handle(rt, message(key, "nope", Heartbeat(tid, fence, Phase.PLAN))) is None
    for junk in (None, "x", {"pool": "p1"}, {"pool": "p1", "body": "{", "sig": "00"}):
        assert server.handle(rt, junk) is None
    assert handle_of(rt, tid) is None


def test_agent_beats_count_capacity_and_refuse_a_wrong_token(rt: Runtime, pool: Pool) -> None:
    good = remote.AgentBeats("unused", pool.name, pool.token, 3, list, interval=5, ident="a1")
    out = server.handle(rt, signing.seal(good.key, pool.name, good.body()))
    assert out is None  # a plain beat asks no reply
    with rt.sessions() as s:
        assert pools.capacity(s, rt.settings, pools.load(s, pool.name)) == (3, 0)
    bad = remote.AgentBeats("unused", pool.name, "wrong-token", 3, list, interval=5, ident="a2")
    body = {**bad.body(), "id": "h1", "reply_to": "runq.reply.h"}
    out = server.handle(rt, signing.seal(bad.key, pool.name, body))
    assert out is not None
    _, refusal = out
    assert refusal["sig"] == remote.REFUSED and "RUNQ_AGENT_TOKEN" in refusal["body"]
    with rt.sessions() as s:
        assert s.get(Agent, "a2") is None


def test_agent_runs_only_hand_offs_signed_for_its_pool(
    rt: Runtime,
    publisher: RecordingPublisher,
    pool: Pool,
    claimed: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hand-off forged by anyone with broker access is refused unrun."""
    tid, fence = claimed
    [sent] = [m for m in publisher.sent if m.task == remote.TASK_AGENT_RUN]
    envelope, meta = sent.args
    assert meta == {"task_id": tid, "phase": "plan", "fence": fence}
    # Flower and the logs show this, never the sealed bundle (configuration
    # and state) that the arguments carry.
    assert sent.describe() == f"task {tid}: plan in agentws, fence {fence}, pool {pool.name}"
    assert Bundle.from_json(signing.open_(signing.derive(pool.token, "handoff"), envelope))
    ran: list[Bundle] = []
    agent_app._state.clear()
    agent_app._state.update(
        settings=Settings(agent_token=pool.token), pool=pool.name, capacity=1, id="t"
    )
    monkeypatch.setattr(
        "executors.local.PhaseRunner.run", lambda self, bundle, reporter: ran.append(bundle)
    )
    try:
        forged = signing.seal(signing.derive("not-the-token", "handoff"), pool.name, {})
        # Rejected: the Celery task fails (Flower shows it) and runs nothing.
        with pytest.raises(MessageRejected, match="bad signature"):
            agent_app.run(forged, meta)
        tampered = {**envelope, "body": envelope["body"].replace("plan", "apply", 1)}
        with pytest.raises(MessageRejected):
            agent_app.run(tampered, meta)
        assert ran == []
        # The stand-in runner reports nothing, so the task fails saying so.
        with pytest.raises(PhaseFailed, match="ended without a result"):
            agent_app.run(envelope, meta)
        assert [b.handoff.task_id for b in ran] == [tid]
    finally:
        agent_app._state.clear()


@pytest.fixture
def consumer(rt: Runtime) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(rt, stop), kwargs={"poll": 0.2})
    thread.start()
    yield
    stop.set()
    thread.join(10)


def test_reports_round_trip_over_the_broker(
    rt: Runtime, pool: Pool, claimed: tuple[int, int], consumer: None
) -> None:
    tid, fence = claimed
    reporter = remote.BrokerReporter(
        rt.settings.resolved_broker_url, pool.name, pool.key(tid, fence), timeout=10
    )
    try:
        assert reporter.report(Started(tid, fence, Phase.PLAN, "agent:x:1")).accepted
        assert reporter.report(Heartbeat(tid, fence, Phase.PLAN)).accepted
        tasks.cancel(rt, tid)
        reply = reporter.report(Heartbeat(tid, fence, Phase.PLAN))
        assert reply.directive is Directive.INTERRUPT  # the cancel reaches the agent
    finally:
        reporter.close()
    # A reporter with a key for another claim hears nothing back.
    liar = remote.BrokerReporter(
        rt.settings.resolved_broker_url, pool.name, pool.key(tid, fence + 5), timeout=1.5
    )
    try:
        with pytest.raises(remote.NoReply):
            liar._once(Heartbeat(tid, fence, Phase.PLAN))
    finally:
        liar.close()


def test_status_lists_the_reports_queue_and_each_pools_queue(rt: Runtime, pool: Pool) -> None:
    from scheduler import status

    names = list(status.collect(rt).queues)
    assert names[-2:] == ["runq.reports", "runq.pool.p1"]
