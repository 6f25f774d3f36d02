"""The scheduler's side of the broker protocol: hand-offs to agent pools,
and reports from agents and Kubernetes Jobs.

Remote executors hold no database credentials; the scheduler's workers do.
Each core worker runs a thread in its main process (see
``celery_app.app._start_report_consumer``) that takes messages off
``runq.reports``, verifies them, applies them with the same
:func:`scheduler.reports.accept` local executors use, and answers on the
sender's reply queue. It is a thread, not a Celery task, for the reason the
reconciler is: a pool whose processes all run terraform must not leave
heartbeats waiting until their leases lapse.

A report is applied only if all of these hold, else it is logged as
rejected and changes nothing:

* the envelope names a pool that exists, and is signed with the run key of
  the (task, fence) its report names, derived from that pool's token;
* that task's workspace runs in that pool (an agent pool's workspaces, or
  Kubernetes workspaces for the Kubernetes pool);
* the report itself passes the same fenced checks as a local one.

An unverifiable message gets no reply (a forger learns nothing); a verified
but stale report gets a signed "stale" reply, so its executor stops.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import select

from executors import remote, signing, wire
from executors.base import Handoff, Reply
from scheduler import bundles, pools
from scheduler.errors import ConcurrentChange, InvalidInput
from scheduler.messages import Message
from scheduler.models import AgentPool, Task, Workspace
from scheduler.reports import accept
from scheduler.runtime import Runtime
from scheduler.states import ExecutionMode

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A message that must change nothing; ``reply`` is sent if not None."""

    def __init__(self, why: str, reply: tuple[bytes, str, dict[str, Any]] | None = None) -> None:
        super().__init__(why)
        self.reply = reply


# -- hand-offs to agent pools ----------------------------------------------------


class AgentLauncher:
    """Sends a claimed phase, with everything it needs, to its pool's queue.

    The bundle is built now, from the database, and signed with the pool's
    hand-off key: an agent runs only what the scheduler sent.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def launch(self, handoff: Handoff) -> str:
        with self.rt.transaction() as s:
            bundle = bundles.build(s, self.rt.settings, handoff.task_id, handoff.fence)
            pool = pools.load(s, handoff.agent_pool or "")
            token, name = pool.token, pool.name
        envelope = signing.seal(signing.derive(token, "handoff"), name, bundle.to_json())
        # Shown in `runq agent list` while it runs; never trusted.
        meta = {"task_id": handoff.task_id, "phase": str(handoff.phase), "fence": handoff.fence}
        label = f"{handoff.label}, pool {name}"
        message = Message(remote.TASK_AGENT_RUN, remote.pool_queue(name), (envelope, meta), label)
        message_id = self.rt.publisher.publish(message)
        return f"pool:{name}:{message_id}"


# -- reports ---------------------------------------------------------------------


def handle(rt: Runtime, envelope: object) -> tuple[str, dict[str, str]] | None:
    """Verify and apply one message from ``runq.reports``.

    Returns ``(reply_to, sealed reply)`` to send, or None.
    """
    try:
        return _handle(rt, envelope)
    except Rejected as exc:
        log.warning(
            "rejected a message on %s: %s",
            remote.REPORTS_QUEUE,
            exc,
            extra={"action": "report_rejected", "why": str(exc)},
        )
        if exc.reply is None:
            return None
        key, reply_to, doc = exc.reply
        pool, _, _ = signing.parse(envelope)
        return reply_to, signing.seal(key, pool, doc)


def _handle(rt: Runtime, envelope: object) -> tuple[str, dict[str, str]] | None:
    try:
        pool_name, _, _ = signing.parse(envelope)
        body = signing.body_of(envelope)
    except signing.BadSignature as exc:
        raise Rejected(f"malformed envelope: {exc}") from exc
    with rt.sessions() as s:
        pool = s.scalars(select(AgentPool).where(AgentPool.name == pool_name)).one_or_none()
        token, kind = (pool.token, pool.kind) if pool is not None else ("", "")
    if body.get("kind") == "agent":
        try:
            if pool is None:
                raise Rejected(f"agent beat for unknown pool {pool_name[:200]!r}")
            return _agent_beat(rt, pool_name, token, envelope)
        except Rejected as exc:
            return _refuse(body, pool_name, exc)
    if pool is None:
        raise Rejected(f"unknown pool {pool_name[:200]!r}")
    return _report(rt, pool_name, token, kind, body, envelope)


def _report(
    rt: Runtime, pool_name: str, token: str, kind: str, body: dict[str, Any], envelope: object
) -> tuple[str, dict[str, str]] | None:
    raw = body.get("report")
    if not isinstance(raw, dict):
        raise Rejected("no report in the message")
    try:
        task_id, fence = wire.int_field(raw, "task_id"), wire.int_field(raw, "fence")
    except wire.BadReport as exc:
        raise Rejected(str(exc)) from exc
    key = signing.run_key(token, task_id, fence)
    try:
        signing.open_(key, envelope)
    except signing.BadSignature as exc:
        raise Rejected(
            f"{raw.get('kind')} report for task {task_id} (fence {fence}) from pool "
            f"{pool_name!r}: {exc}"
        ) from exc
    reply_to = remote.reply_to_of(body)
    request = body.get("id")
    if reply_to is None:
        raise Rejected("report without a valid reply_to")

    def answer(reply: Reply) -> tuple[bytes, str, dict[str, Any]]:
        return key, reply_to, {"id": request, **wire.reply_to_json(reply)}

    with rt.sessions() as s:
        row = s.execute(
            select(Task.id, Workspace.execution_mode, Workspace.agent_pool)
            .join(Workspace, Workspace.id == Task.workspace_id)
            .where(Task.id == task_id)
        ).one_or_none()
    if row is None:
        raise Rejected(f"task {task_id} does not exist", answer(Reply.stale("no such task")))
    _, mode, ws_pool = row
    serves = (
        mode == ExecutionMode.AGENT and kind == pools.KIND_AGENT and ws_pool == pool_name
    ) or (mode == ExecutionMode.K8S and kind == pools.KIND_K8S)
    if not serves:
        raise Rejected(
            f"pool {pool_name!r} does not run task {task_id}",
            answer(Reply.stale(f"pool {pool_name!r} does not run task {task_id}")),
        )
    try:
        report = wire.report_from_json(raw)
    except wire.BadReport as exc:
        raise Rejected(str(exc), answer(Reply(False, reason=str(exc)))) from exc
    if hasattr(report, "content") and len(report.content) > rt.settings.max_artifact_bytes:
        raise Rejected(
            "report content over RUNQ_MAX_ARTIFACT_BYTES",
            answer(Reply(False, reason="content over RUNQ_MAX_ARTIFACT_BYTES")),
        )
    reply = accept(rt, report)
    key_, to, doc = answer(reply)
    return to, signing.seal(key_, pool_name, doc)


def _refuse(body: dict[str, Any], pool: str, exc: Rejected) -> tuple[str, dict[str, str]] | None:
    """Log a refused agent beat; answer an agent's first beat, unsigned."""
    log.warning(
        "rejected an agent beat: %s", exc, extra={"action": "report_rejected", "why": str(exc)}
    )
    reply_to = remote.reply_to_of(body)
    if reply_to is None:
        return None
    why = str(exc).split(": ")[-1] if "signature" in str(exc) else str(exc)
    doc = json.dumps({"id": body.get("id"), "reason": f"{why} (is RUNQ_AGENT_TOKEN right?)"})
    return reply_to, {"pool": pool, "body": doc, "sig": remote.REFUSED}


def _agent_beat(
    rt: Runtime, pool_name: str, token: str, envelope: object
) -> tuple[str, dict[str, str]] | None:
    key = signing.derive(token, "agent")
    try:
        body = signing.open_(key, envelope)
    except signing.BadSignature as exc:
        raise Rejected(f"agent beat for pool {pool_name!r}: {exc}") from exc
    try:
        capacity = body.get("capacity")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 0 < capacity <= 1000:
            raise InvalidInput("capacity must be 1..1000")
        if not isinstance(body.get("agent"), str) or not isinstance(body.get("running"), list):
            raise InvalidInput("agent beat lacks its id or running list")
        with rt.transaction() as s:
            pools.record_beat(s, pools.load(s, pool_name), body)
    except (InvalidInput, ConcurrentChange) as exc:
        raise Rejected(f"agent beat: {exc}") from exc
    reply_to = remote.reply_to_of(body)
    if reply_to is None:
        return None
    doc = {"id": body.get("id"), **wire.reply_to_json(Reply.ok())}
    return reply_to, signing.seal(key, pool_name, doc)


def serve(rt: Runtime, stop: Any, *, poll: float = 1.0) -> None:
    """Consume ``runq.reports`` until ``stop`` (an Event) is set.

    Reconnects after a broker outage; a message is acknowledged after it has
    been handled, so one taken by a worker that died is delivered again (every
    report is idempotent).
    """
    from queue import Empty

    url = rt.settings.resolved_broker_url
    while not stop.is_set():
        try:
            with remote.connect(url) as conn:
                queue = conn.SimpleQueue(remote.reports_queue())  # type: ignore[arg-type]
                # Without a limit RabbitMQ pushes every pending report to the
                # first consumer; other workers' threads would sit idle.
                queue.consumer.qos(prefetch_count=16)
                while not stop.is_set():
                    try:
                        message = queue.get(block=True, timeout=poll)
                    except Empty:
                        continue
                    try:
                        out = handle(rt, message.payload)
                    except Exception:
                        # The database is away, say. Dropped, not requeued
                        # (that would spin): its executor asks again when no
                        # reply comes, and every report is idempotent.
                        log.exception("handling a report failed; dropped")
                        message.ack()
                        stop.wait(0.5)
                        continue
                    if out is not None:
                        reply_to, sealed = out
                        try:
                            remote.publish(conn, remote.reply_queue(reply_to), sealed)
                        except Exception as exc:  # the executor will ask again
                            log.warning("reply to %s failed: %s", reply_to, exc)
                    message.ack()
        except Exception as exc:
            if stop.is_set():
                return
            log.error(  # noqa: TRY400 - one line; the broker is away
                "report consumer: broker connection failed (%s: %s); reconnecting",
                type(exc).__name__,
                exc,
                extra={"action": "report_consumer_error"},
            )
            stop.wait(2.0)
