"""Which broker a URL names, and what runq asks of each.

Redis (the default) and RabbitMQ are supported. Both the Celery apps
(celery_app.config, celery_app.agent) and the plain kombu connections of
remote executors and the report consumer (executors.remote, scheduler.remote)
take their per-broker options from here, so every publisher behaves alike.

:class:`KombuPublisher` is the clients' publisher: Celery's task messages,
sent without a Celery app (kombu is imported on first use).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kombu import Connection, Queue

    from scheduler.messages import Message

#: URL schemes of the brokers runq knows (kombu's names for them).
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
REDIS_SCHEMES = frozenset({"redis", "rediss"})


def broker_kind(url: str) -> str:
    """``"redis"``, ``"amqp"``, or the URL's scheme for any other broker."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    if scheme in AMQP_SCHEMES:
        return "amqp"
    if scheme in REDIS_SCHEMES:
        return "redis"
    return scheme


def transport_options(url: str) -> dict[str, Any]:
    """kombu transport options for a connection to ``url``.

    RabbitMQ: publisher confirms, so a publish returns once the broker has
    taken the message and raises when it did not (a nack, or the channel
    closed under it). Without them a basic.publish is fire-and-forget, and a
    message the broker dropped would look sent; the outbox, the reconciler
    and every executor that reports over the broker rely on a failed send
    raising.
    """
    if broker_kind(url) == "amqp":
        return {"confirm_publish": True}
    return {}


def durable_queue(name: str) -> Queue:
    """Queue ``name`` on its own direct exchange, both durable.

    One direct exchange per queue: a bare Queue(name) would bind every queue
    to the default queue's exchange and routing key, so a publish to that
    exchange would land in all of them. Durable exchanges and queues and
    persistent messages: a RabbitMQ restart keeps what was queued (Redis
    keeps it only as far as its own persistence is configured).
    """
    from kombu import Exchange, Queue

    return Queue(name, Exchange(name, "direct", durable=True), routing_key=name, durable=True)


def queue_depths(conn: Connection, names: list[str]) -> dict[str, int | None]:
    """Messages waiting in each queue (not those a worker has reserved), over
    kombu connection ``conn``; None for every queue when the broker cannot
    be reached."""
    depths: dict[str, int | None] = {}
    try:
        conn.ensure_connection(max_retries=1)
        for name in names:
            depths[name] = _depth(conn, name)
    except Exception:
        return dict.fromkeys(names)
    return depths


def _depth(conn: Connection, name: str) -> int:
    # A channel per queue: on RabbitMQ a passive declare of a queue that does
    # not exist fails with 404 and closes its channel, which would fail every
    # queue asked after it. (Redis answers 0.)
    channel: Any = conn.channel()  # kombu's Channel, untyped
    try:
        return int(channel.queue_declare(queue=name, passive=True)[1])
    except conn.channel_errors:
        return 0  # never declared: nothing was ever sent to it
    finally:
        with contextlib.suppress(Exception):
            channel.close()


#: What ``app.send_task`` retries a publish with (Celery's default
#: ``task_publish_retry_policy``, which runq does not change).
PUBLISH_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 1,
}
#: Celery's ``broker_connection_timeout``.
CONNECT_TIMEOUT = 4.0


class KombuPublisher:
    """Publishes runq messages as Celery task messages with kombu alone.

    A client that only sends a message (``runq submit``, the Python API)
    need not import Celery and build its app for that: Celery's import and
    configuration were a quarter of the CLI's start-up (issue 8). What goes
    on the wire is what ``app.send_task(task, args, queue=, argsrepr=)``
    sends (protocol 2, JSON): the same headers, body and properties, to the
    default exchange with the queue's name as routing key, declaring the
    queue as Celery does. tests/integration/test_light_publisher.py checks
    it field by field against a message Celery sent, and that a real worker
    runs it.

    One thing Celery does is left out: the ``task-sent`` event
    (``task_send_sent_event``). Flower learns of the task from the worker's
    ``task-received`` event instead, which carries the same name, id and
    ``argsrepr`` (tests/scenario/test_flower.py submits through this
    publisher and finds each task in Flower by its label, with its state);
    what it cannot show is a message still waiting in a queue, which ``runq
    show`` and ``runq status`` (queue depths) do.

    Errors are :class:`celery_app.runtime.CeleryPublisher`'s: a send the
    broker did not take, after the same retries, raises kombu's
    ``OperationalError`` naming the message, the queue and the broker; on
    RabbitMQ that includes a message it refused (publisher confirms, see
    :func:`transport_options`).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        #: Celery's ``reply_to`` (the app's thread oid): unused, as runq
        #: ignores results, but sent as Celery sends it.
        self._reply_to = str(uuid.uuid4())

    def _connection(self) -> Connection:
        if self._conn is None:
            from kombu import Connection

            self._conn = Connection(
                self.url,
                transport_options=transport_options(self.url),
                connect_timeout=CONNECT_TIMEOUT,
            )
        return self._conn

    def publish(self, message: Message) -> str:
        from kombu.exceptions import OperationalError

        task_id = str(uuid.uuid4())
        headers, properties, body = task_message(message, task_id)
        properties["reply_to"] = self._reply_to
        with self._lock:
            conn = self._connection()
            try:
                # As app.send_task: the transport's connection errors become
                # kombu's OperationalError. (The stubs type this context
                # manager as a bare generator.)
                with conn._reraise_as_library_errors():  # type: ignore[attr-defined]
                    conn.Producer().publish(
                        body,
                        exchange="",
                        routing_key=message.queue,
                        serializer="json",
                        retry=True,
                        retry_policy=PUBLISH_RETRY_POLICY,
                        delivery_mode=2,  # persistent, as task_default_delivery_mode
                        declare=[durable_queue(message.queue)],
                        headers=headers,
                        **properties,
                    )
            except OperationalError as exc:
                raise not_taken(message, conn.as_uri(), exc) from exc
        return task_id

    def depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue``, not counting those a worker holds."""
        with self._lock:
            return queue_depths(self._connection(), [queue])[queue]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.release()
                self._conn = None


def not_taken(message: Message, broker: str, exc: Exception) -> Exception:
    """The error for a send the broker did not take: kombu's
    ``OperationalError`` (the type workers and the reconciler read as "the
    broker was away"), naming the message, its queue and the broker. On
    RabbitMQ a refused message (a nack) comes with an empty message, so the
    cause is named instead."""
    from kombu.exceptions import OperationalError

    cause = exc.__cause__ or exc.__context__ or exc
    why = str(exc) or f"{type(cause).__name__} {cause}".strip()
    return OperationalError(
        f"the broker did not take {message.task} ({message.describe()}) "
        f"for {message.queue} ({broker}): {why}"
    )


def task_message(
    message: Message, task_id: str
) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, ...]]:
    """Celery's protocol-2 ``(headers, properties, body)`` for ``message``,
    as ``app.send_task`` builds them (celery.app.amqp.AMQP.as_task_v2) for a
    task with no ETA, expiry, time limits, parent, group or callbacks."""
    return (
        {
            "lang": "py",
            "task": message.task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            # What Flower shows as the task's arguments.
            "argsrepr": message.describe(),
            "kwargsrepr": "{}",
            "origin": f"gen{os.getpid()}@{socket.gethostname()}",
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        {"correlation_id": task_id, "reply_to": ""},
        (
            list(message.args),
            {},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        ),
    )
