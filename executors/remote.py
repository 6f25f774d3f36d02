"""The executor's side of the broker protocol (agents, Kubernetes Jobs).

A remote executor has no database credentials. It reaches the scheduler
through the broker only: every report is published, signed with the claim's
run key (:mod:`executors.signing`), to the ``runq.reports`` queue, and the
scheduler's answer comes back, signed with the same key, on the executor's
private reply queue. Request and reply carry a random id, so a late reply
to an earlier request is never taken for the answer to this one.

Hazards and what guards them:

* **A lost report or reply.** Every report is idempotent on the scheduler's
  side (a Started is a compare-and-set on a per-run handle, state and log
  writes are keyed by serial and offset), so a report whose reply does not
  come within ``RUNQ_REPORT_TIMEOUT`` is sent again, with backoff, until it
  lands or the scheduler says the claim is no longer this executor's.
  Heartbeats are not retried: the next one is due in a moment.
* **A forged reply.** Replies are verified with the run key; one that fails
  is dropped, and the request times out and is retried.
* **Reply queues left behind.** Each reporter deletes its queue when the
  phase ends; on RabbitMQ a queue also expires after 10 minutes unused, in
  case its executor died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any, cast

from kombu import Connection, Exchange, Queue

from executors import signing, wire
from executors.base import Bundle, Heartbeat, Reply, Report
from executors.k8s import BROKER_FILE, BUNDLE_FILE, POOL_FILE, RUN_KEY_FILE
from executors.retry import with_backoff
from scheduler.brokers import transport_options
from scheduler.settings import Settings

log = logging.getLogger(__name__)

#: Where executors' reports (and agents' beats) go.
REPORTS_QUEUE = "runq.reports"
#: One exchange for every executor's reply queue (queues come and go;
#: exchanges would pile up on RabbitMQ).
REPLIES_EXCHANGE = "runq.replies"
#: The message an agent consumes: ``runq.agent.run(envelope, meta)``.
TASK_AGENT_RUN = "runq.agent.run"


class NoReply(Exception):
    """The scheduler did not answer a report in time."""


class Refused(Exception):
    """The scheduler refused an agent's first beat (unknown pool, wrong token).

    That answer cannot be signed with a key the agent would trust (the agent
    holds the wrong one), so it is taken as unsigned, and only for the first
    beat, where the worst a forger can do is stop an agent from starting.
    """


#: The signature field of an unsigned refusal.
REFUSED = "refused"
#: Every reply queue's name starts so; the scheduler answers no other queue
#: (a forged report must not make it publish into runq's own queues).
REPLY_PREFIX = "runq.reply."


def new_reply_name() -> str:
    return f"{REPLY_PREFIX}{uuid.uuid4().hex}"


def reply_to_of(body: dict[str, Any]) -> str | None:
    """The reply queue a message asks to be answered on, if it is one."""
    reply_to = body.get("reply_to")
    return reply_to if isinstance(reply_to, str) and reply_to.startswith(REPLY_PREFIX) else None


def connect(url: str) -> Connection:
    """A kombu connection to the broker at ``url``, with runq's options for it."""
    return Connection(url, connect_timeout=5, transport_options=transport_options(url))


def pool_queue(pool: str) -> str:
    """The queue an agent pool's agents consume."""
    return f"runq.pool.{pool}"


def reports_queue() -> Queue:
    return Queue(REPORTS_QUEUE, Exchange(REPORTS_QUEUE, "direct"), routing_key=REPORTS_QUEUE)


def reply_queue(name: str) -> Queue:
    # Both sides declare it the same way (RabbitMQ refuses a re-declaration
    # with other arguments). Redis ignores the arguments.
    return Queue(
        name,
        Exchange(REPLIES_EXCHANGE, "direct"),
        routing_key=name,
        durable=False,
        queue_arguments={"x-expires": 600_000},
    )


def delete_reply_queue(conn: Connection, name: str) -> None:
    """Best effort: a reply queue left behind expires on its own (RabbitMQ)."""
    try:
        reply_queue(name)(conn.default_channel).delete()
    except Exception:
        log.debug("deleting reply queue %s failed", name, exc_info=True)


def publish(conn: Connection, queue: Queue, body: dict[str, Any]) -> None:
    """Publish ``body`` (JSON) to ``queue``, declaring it; retried briefly on
    a broken connection."""
    producer = conn.Producer(serializer="json")
    publish_ = conn.ensure(producer, producer.publish, max_retries=3)
    publish_(
        body,
        exchange=queue.exchange,
        routing_key=queue.routing_key,
        declare=[queue],
    )


class BrokerReporter:
    """Reports one claim to the scheduler over the broker, signed."""

    def __init__(
        self,
        broker_url: str,
        pool: str,
        key: bytes,
        *,
        timeout: float = 10.0,
        give_up_after: float = 600.0,
    ) -> None:
        self.broker_url = broker_url
        self.pool = pool
        self.key = key
        self.timeout = timeout
        self.give_up_after = give_up_after
        self.reply_name = new_reply_name()
        self._conn: Connection | None = None

    @classmethod
    def of(cls, settings: Settings, broker_url: str, pool: str, key: bytes) -> BrokerReporter:
        """A reporter with the settings' reply timeout, giving up on a report
        once its lease has long lapsed (ten lease times)."""
        return cls(
            broker_url,
            pool,
            key,
            timeout=settings.report_timeout,
            give_up_after=10 * settings.lease_ttl,
        )

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = connect(self.broker_url)
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:  # it is broken already
                log.debug("closing a broken broker connection failed", exc_info=True)
        self._conn = None

    def report(self, report: Report) -> Reply:
        if isinstance(report, Heartbeat):
            return self._once(report)
        return with_backoff(
            lambda: self._once(report),
            what=f"{type(report).__name__} report of task {report.task_id}",
            give_up_after=self.give_up_after,
            retry_if=lambda _exc: True,  # no reply, or the broker away: ask again
            first=0.5,
            cap=10.0,
        )

    def _once(self, report: Report) -> Reply:
        request = uuid.uuid4().hex
        body = {"report": wire.report_to_json(report), "reply_to": self.reply_name, "id": request}
        try:
            doc = request_reply(
                self._connection(), self.key, self.pool, body, self.reply_name, self.timeout
            )
        except Exception:
            self._reset()
            raise
        return wire.reply_from_json(doc)

    def close(self) -> None:
        """Delete this reporter's reply queue and close its connection."""
        if self._conn is None:
            return
        delete_reply_queue(self._conn, self.reply_name)
        self._reset()


def request_reply(
    conn: Connection,
    key: bytes,
    pool: str,
    body: dict[str, Any],
    reply_name: str,
    timeout: float,
    *,
    refusable: bool = False,
) -> dict[str, Any]:
    """Send ``body`` (with its ``id`` and ``reply_to``) signed with ``key``,
    and return the verified reply with the same id. With ``refusable``, an
    unsigned refusal raises :class:`Refused`."""
    # kombu takes a Queue here as well as a name (its stubs say str only).
    replies = conn.SimpleQueue(cast(Any, reply_queue(reply_name)))
    try:
        publish(conn, reports_queue(), signing.seal(key, pool, body))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoReply(f"no reply from the scheduler in {timeout:g}s")
            try:
                message = replies.get(block=True, timeout=left)
            except Empty:
                continue
            message.ack()
            try:
                doc = signing.open_(key, message.payload)
            except signing.BadSignature as exc:
                payload = message.payload
                if refusable and isinstance(payload, dict) and payload.get("sig") == REFUSED:
                    refusal = signing.body_of({**payload, "sig": REFUSED})
                    if refusal.get("id") == body["id"]:
                        raise Refused(str(refusal.get("reason", "refused"))) from exc
                log.warning("dropped a reply that failed verification: %s", exc)
                continue
            if doc.get("id") == body["id"]:
                return doc
            # A late answer to an earlier, timed-out request: not this one's.
    finally:
        replies.close()


# -- running a phase from a bundle directory (a Kubernetes Job's container) ---

# The files of the Secret a Job mounts (executors.k8s writes them): BUNDLE_FILE,
# RUN_KEY_FILE, POOL_FILE, BROKER_FILE.


def run_phase_from_dir(bundle_dir: Path, settings: Settings) -> int:
    """Run the phase in ``bundle_dir`` (as mounted from a Secret), with the
    runner ``settings`` choose, reporting over the broker with the claim's
    run key. Returns an exit code: 0 once the phase was run and reported
    (its outcome is in the report, not the exit code)."""
    import json

    from executors import runner_for

    bundle = Bundle.from_json(json.loads((bundle_dir / BUNDLE_FILE).read_text()))
    key = bytes.fromhex((bundle_dir / RUN_KEY_FILE).read_text().strip())
    pool = (bundle_dir / POOL_FILE).read_text().strip()
    broker_url = os.environ.get("RUNQ_BROKER_URL") or (bundle_dir / BROKER_FILE).read_text().strip()
    reporter = BrokerReporter.of(settings, broker_url, pool, key)
    try:
        runner_for(settings, kind="k8s").run(bundle, reporter)
    finally:
        reporter.close()
    return 0


# -- agents' beats -------------------------------------------------------------


def agent_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class AgentBeats:
    """Tells the scheduler, every ``interval`` seconds, that this agent lives,
    its capacity and what it runs (signed with the pool's agent key)."""

    def __init__(
        self,
        broker_url: str,
        pool: str,
        token: str,
        capacity: int,
        running: Callable[[], list[dict[str, Any]]],
        *,
        interval: float,
        ident: str | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.pool = pool
        self.key = signing.derive(token, "agent")
        self.capacity = capacity
        self.running = running
        self.interval = interval
        self.id = ident or agent_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self, *, stopping: bool = False) -> dict[str, Any]:
        return {
            "kind": "agent",
            "agent": self.id,
            "hostname": socket.gethostname(),
            "capacity": self.capacity,
            "running": self.running(),
            "stopping": stopping,
        }

    def hello(self, timeout: float) -> Reply:
        """The first beat, answered: is this token accepted for this pool?"""
        name = new_reply_name()
        body = {**self.body(), "id": uuid.uuid4().hex, "reply_to": name}
        with connect(self.broker_url) as conn:
            try:
                doc = request_reply(conn, self.key, self.pool, body, name, timeout, refusable=True)
            finally:
                delete_reply_queue(conn, name)
        return wire.reply_from_json(doc)

    def send(self, *, stopping: bool = False) -> None:
        with connect(self.broker_url) as conn:
            publish(
                conn,
                reports_queue(),
                signing.seal(self.key, self.pool, self.body(stopping=stopping)),
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="runq-agent-beats", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.send()
            except Exception as exc:  # the next beat may get through
                log.warning("agent beat failed (%s: %s)", type(exc).__name__, exc)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.send(stopping=True)
        except Exception as exc:  # it will lapse on its own
            log.warning("final agent beat failed (%s: %s)", type(exc).__name__, exc)
