"""runq's publishers on RabbitMQ (the workers' through Celery, the clients'
through kombu alone), against the machine's server (a private vhost per
test): each message lands in its own durable queue, a message the broker
refuses raises a clear error (publisher confirms), and a dead broker raises one
the reconciler logs and recovers from once the broker is back, on the same
pooled connections. ``runq status`` counts the queues there too.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from celery import Celery
from kombu import Connection
from kombu.exceptions import OperationalError

from celery_app.runtime import CeleryPublisher, build_runtime, private_app
from scheduler import messages, reconciler, status, tasks, workspaces
from scheduler.brokers import KombuPublisher
from scheduler.messages import Publisher, RecordingPublisher
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.supervise import free_port
from tests.workers import RabbitMQ

pytestmark = [pytest.mark.amqp, pytest.mark.redis]


def make_app(broker_url: str) -> Celery:
    return private_app(Settings(broker_url=broker_url), "runq-amqp-test")


@pytest.fixture
def app(amqp_url: str) -> Iterator[Celery]:
    made = make_app(amqp_url)
    yield made
    made.close()


@pytest.fixture(params=["celery", "light"])
def publisher(request: pytest.FixtureRequest, app: Celery, amqp_url: str) -> Iterator[Publisher]:
    """Workers' publisher (Celery's app) and the clients' (kombu alone)."""
    if request.param == "celery":
        yield CeleryPublisher(app)
        return
    light = KombuPublisher(amqp_url)
    yield light
    light.close()


def waiting(url: str) -> dict[str, int]:
    """Messages ready in each of runq's queues (0 if never declared)."""
    out: dict[str, int] = {}
    with Connection(url) as conn:
        for name in messages.ALL_QUEUES:
            channel = conn.channel()
            try:
                out[name] = int(channel.queue_declare(queue=name, passive=True)[1])
            except conn.channel_errors:
                out[name] = 0
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    return out


def take(url: str, queue: str) -> tuple[str, list[object]]:
    """Get one message off ``queue``: (task name, args)."""
    with Connection(url) as conn:
        message = conn.SimpleQueue(queue, no_ack=True).get(timeout=5)
        args, _kwargs, _embed = message.decode()
        return str(message.headers["task"]), list(args)


def test_each_message_lands_in_its_own_durable_queue(
    publisher: Publisher, amqp_url: str, rabbitmq: RabbitMQ
) -> None:
    publisher.publish(messages.claim_plan(7))
    publisher.publish(messages.dispatch("net"))
    publisher.publish(messages.dispatch("app"))
    publisher.publish(messages.Message(messages.TASK_EXECUTE, messages.QUEUE_RUNS, (7, 3)))

    assert waiting(amqp_url) == {"runq.plans": 1, "runq.dispatch": 2, "runq.runs": 1}
    assert take(amqp_url, "runq.plans") == ("runq.claim_plan", [7])
    assert take(amqp_url, "runq.runs") == ("runq.execute", [7, 3])
    assert take(amqp_url, "runq.dispatch") == ("runq.dispatch", ["net"])

    # Durable queues of persistent messages: a broker restart keeps them.
    vhost = urlsplit(amqp_url).path.lstrip("/")
    listed = rabbitmq.ctl("list_queues", "-p", vhost, "name", "durable", "--no-table-headers")
    durable = dict(line.split() for line in listed.splitlines() if line.startswith("runq."))
    assert durable == dict.fromkeys(messages.ALL_QUEUES, "true")


def test_a_refused_message_raises_a_clear_error(
    publisher: Publisher, amqp_url: str, rabbitmq: RabbitMQ
) -> None:
    publisher.publish(messages.claim_plan(1))
    # The broker refuses every further message for runq.plans: a full queue
    # that rejects publishes, as a length limit in production would.
    vhost = urlsplit(amqp_url).path.lstrip("/")
    rabbitmq.ctl(
        "set_policy",
        "-p",
        vhost,
        "full",
        r"^runq\.plans$",
        '{"max-length": 1, "overflow": "reject-publish"}',
        "--apply-to",
        "queues",
    )
    deadline = time.monotonic() + 10
    while True:  # the policy reaches the queue a moment later
        try:
            publisher.publish(messages.claim_plan(2))
        except OperationalError as exc:
            error = str(exc)
            break
        assert time.monotonic() < deadline, "the broker never refused a message"
        time.sleep(0.2)
    assert "did not take runq.claim_plan (task 2: plan) for runq.plans" in error
    assert "MessageNacked" in error
    assert "guest:**@" in error  # the broker is named, its password is not
    # Without confirms the publish would have returned and the message been
    # dropped; other queues still take theirs.
    publisher.publish(messages.dispatch("net"))
    assert waiting(amqp_url) == {"runq.plans": 1, "runq.dispatch": 1, "runq.runs": 0}


class Proxy:
    """A TCP proxy to RabbitMQ a test can take down (every connection through
    it is cut, as a broker crash would) and bring back on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.server: socket.socket | None = None
        self.sockets: list[socket.socket] = []

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        for s in [*self.sockets, *([self.server] if self.server else [])]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.sockets.clear()
        self.server = None

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_dead_broker_raises_and_the_reconciler_recovers(
    amqp_url: str,
    sqlite_url: str,
    redis_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = urlsplit(amqp_url)
    proxy = Proxy((real.hostname or "127.0.0.1", real.port or 5672))
    proxy.up()
    via_proxy = amqp_url.replace(f"@{real.hostname}:{real.port}", f"@127.0.0.1:{proxy.port}")
    settings = Settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        broker_url=via_proxy,
        data_dir=tmp_path / "data",
        resend_after=0.1,
    )
    app = private_app(settings, "runq-amqp-test")
    rt = build_runtime(app, settings, actor="reconciler-test")
    quiet = Runtime(settings=settings, publisher=RecordingPublisher(), actor="test")
    try:
        src = tmp_path / "src"
        src.mkdir()
        workspaces.create(quiet, "net", source_dir=str(src))
        # The pool holds a live connection when the broker goes.
        rt.publisher.publish(messages.dispatch("net"))
        plan = tasks.submit(quiet, "net", "plan")  # its claim never sent
        time.sleep(0.2)  # older than resend_after

        proxy.down()
        started = time.monotonic()
        with pytest.raises(
            OperationalError, match=r"did not take runq.dispatch \(workspace x\) for runq.dispatch"
        ):
            rt.publisher.publish(messages.dispatch("x"))
        assert time.monotonic() - started < 15, "a dead broker should fail fast"

        caplog.set_level(logging.ERROR, logger="scheduler.reconciler")
        swept = reconciler.sweep(rt)  # logs the failed hints; does not raise
        assert swept.plans == [plan.id]
        assert "hints not sent" in caplog.text
        assert "did not take runq.claim_plan" in caplog.text
        beat = reconciler.last_sweep(rt)
        assert beat is not None  # the sweep is recorded: beat alive, broker not

        down = status.collect(rt, app, ping_timeout=0.5)
        assert down.workers is None  # unknown, not "none"
        assert set(down.queues.values()) == {None}

        proxy.up()
        reconciler.sweep(rt)  # the same pooled publisher reconnects
        assert take(amqp_url, "runq.plans") == ("runq.claim_plan", [plan.id])

        up = status.collect(rt, app, ping_timeout=0.5)
        assert up.workers == []  # no worker runs on this vhost
        # runq's queues, and the reports queue of remote executors (no pool
        # exists here, so no pool queue is listed).
        assert up.queues == {
            "runq.plans": 0,
            "runq.dispatch": 1,
            "runq.runs": 0,
            "runq.reports": 0,
        }
    finally:
        proxy.down()
        rt.close()
        quiet.close()
        app.close()
