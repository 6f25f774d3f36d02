"""Worker-side retries: a report that fails on a database error is retried
until it lands (scheduler.reports.DirectReporter), across a real
PostgreSQL backend kill and a real outage of the server's address.

PostgreSQL only: these are faults of a database server and its connections.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from executors.base import Finished, Heartbeat, Started, StateWritten
from executors.fake import FAKE_PLAN
from scheduler import tasks
from scheduler.models import PlanArtifact, StateVersion
from scheduler.reports import DirectReporter
from scheduler.runtime import Runtime
from scheduler.states import Phase, TaskStatus, TaskType
from scheduler.supervise import free_port
from tests.conftest import PG_ADMIN_URL
from tests.integration.helpers import (
    APPLY_OK,
    PLAN_WITH_CHANGES,
    applying,
    claimed,
    task_events,
    tuned,
)

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)

S = TaskStatus


def retries(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if getattr(r, "action", None) == "report_retry"]


# ---------------------------------------------------------------- a backend killed mid-report


@pytest.fixture
def worker(rt: Runtime) -> Iterator[Runtime]:
    r = tuned(rt, actor="worker")
    yield r
    r.close()


def kill_backend_at_next_statement(rt: Runtime, *, times: int = 1) -> list[int]:
    """Terminate the backend of whichever connection runs ``rt``'s next
    statement, just before it is sent (``times`` statements in a row)."""
    killed: list[int] = []

    def before(conn: Any, *_: Any) -> None:
        if len(killed) >= times:
            return
        pid = conn.connection.dbapi_connection.info.backend_pid
        killed.append(pid)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            # The timeout argument waits until the backend has exited.
            assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (
                True,
            )

    event.listen(rt.engine, "before_cursor_execute", before)
    return killed


def test_finished_lands_after_its_backend_is_killed_mid_report(
    rt: Runtime, ws: str, worker: Runtime, caplog: Any
) -> None:
    tid, f = claimed(rt, ws, TaskType.PLAN_AND_APPLY)
    reporter = DirectReporter(worker)
    assert reporter.report(Started(tid, f, Phase.PLAN, "exec:1")).accepted
    killed = kill_backend_at_next_statement(worker, times=2)
    caplog.set_level(logging.WARNING, logger="scheduler.reports")

    reply = reporter.report(Finished(tid, f, Phase.PLAN, PLAN_WITH_CHANGES, plan=FAKE_PLAN))

    assert reply.accepted
    assert len(killed) == 2 and killed[0] != killed[1], "two backends were killed"
    assert len(retries(caplog.records)) == 2
    assert all("OperationalError" in r.getMessage() for r in retries(caplog.records))
    view = tasks.get(rt, tid)
    assert (view.status, view.has_changes, view.add) == (S.APPLY_PENDING, True, 2)
    assert [(e.from_status, e.to_status) for e in task_events(rt, tid)].count(
        (S.PLANNING, S.APPLY_PENDING)
    ) == 1
    # The saved plan was stored in the transition's transaction, once.
    with rt.sessions() as s:
        saved = s.get(PlanArtifact, tid)
        assert saved is not None and (saved.fence, saved.content) == (f, FAKE_PLAN)


def test_a_state_write_retried_after_a_kill_is_stored_once(
    rt: Runtime, ws: str, worker: Runtime
) -> None:
    tid, f = applying(rt, ws)
    reporter = DirectReporter(worker)
    assert reporter.report(Started(tid, f, Phase.APPLY, "exec:1")).accepted
    kill_backend_at_next_statement(worker)
    content = b'{"serial": 1, "lineage": "L"}'
    assert reporter.report(StateWritten(tid, f, 1, "L", content)).accepted
    assert reporter.report(Finished(tid, f, Phase.APPLY, APPLY_OK)).accepted
    assert tasks.get(rt, tid).status is S.APPLIED
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(StateVersion)) == 1


@pytest.mark.parametrize("pre_ping", [True, False])
def test_finished_lands_after_a_kill_between_two_reports(
    rt: Runtime, ws: str, pre_ping: bool
) -> None:
    # A worker's runtime does not pre-ping: the retry alone must land it.
    worker = Runtime(rt.settings, rt.publisher, actor="worker", pre_ping=pre_ping)
    tid, f = claimed(rt, ws)
    reporter = DirectReporter(worker)
    assert reporter.report(Started(tid, f, Phase.PLAN, "exec:1")).accepted
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        name = make_url(rt.settings.database_url).database
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    assert killed and all(ok for (ok,) in killed)
    assert reporter.report(Finished(tid, f, Phase.PLAN, PLAN_WITH_CHANGES)).accepted
    worker.close()
    assert tasks.get(rt, tid).status is S.SUCCESS


# ---------------------------------------------------------------- the server unreachable


class Proxy:
    """A TCP proxy to PostgreSQL that a test can cut (every connection
    through it dropped, new ones refused) and restore."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._server: socket.socket | None = None

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self._server is not None
        # shutdown() wakes the accept() blocked in the other thread.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._server = None
        with self._lock:
            dropped, self._open = self._open, []
        for s in dropped:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        if self._server is not None:
            self.cut()


@pytest.fixture
def proxy(rt: Runtime) -> Iterator[Proxy]:
    url = make_url(rt.settings.database_url)
    p = Proxy((url.host or "127.0.0.1", url.port or 5432))
    p.start()
    yield p
    p.stop()


@pytest.fixture
def behind_proxy(rt: Runtime, proxy: Proxy) -> Iterator[Runtime]:
    url = make_url(rt.settings.database_url).set(port=proxy.port)
    r = tuned(rt, actor="worker", database_url=url.render_as_string(hide_password=False))
    yield r
    r.close()


def test_finished_lands_after_the_database_was_unreachable(
    rt: Runtime, ws: str, proxy: Proxy, behind_proxy: Runtime, caplog: Any
) -> None:
    tid, f = applying(rt, ws)
    reporter = DirectReporter(behind_proxy)
    assert reporter.report(Started(tid, f, Phase.APPLY, "exec:1")).accepted
    caplog.set_level(logging.WARNING, logger="scheduler.reports")

    proxy.cut()
    # A heartbeat is not retried (the next is due in a moment): it fails fast.
    t0 = time.monotonic()
    with pytest.raises(OperationalError):
        reporter.report(Heartbeat(tid, f, Phase.APPLY))
    assert time.monotonic() - t0 < 5
    # The server comes back a second later; Finished, sent now, waits for it.
    back = threading.Timer(1.0, proxy.start)
    back.start()
    try:
        reply = reporter.report(Finished(tid, f, Phase.APPLY, APPLY_OK))
    finally:
        back.join()

    assert reply.accepted
    assert len(retries(caplog.records)) >= 2
    view = tasks.get(rt, tid)
    assert (view.status, view.fence, view.error) == (S.APPLIED, f, None)
    assert task_events(rt, tid)[-1].actor == "worker"


# ---------------------------------------------------------------- paused mid-report


def test_a_report_paused_past_the_idle_timeout_is_retried(
    rt: Runtime, ws: str, caplog: Any
) -> None:
    tid, f = applying(rt, ws)
    paused = tuned(rt, actor="worker", db_idle_in_transaction_timeout=0.5)
    try:
        reporter = DirectReporter(paused)
        assert reporter.report(Started(tid, f, Phase.APPLY, "exec:1")).accepted
        stopped: list[int] = []

        def sigstop_once(conn: Any, *_: Any) -> None:
            # The worker is stopped (SIGSTOP) inside the report's transaction,
            # after its first statement, until the server has ended the session.
            if stopped:
                return
            pid = conn.connection.dbapi_connection.info.backend_pid
            stopped.append(pid)
            deadline = time.monotonic() + 10
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                while admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone():
                    assert time.monotonic() < deadline, "the idle session was not ended"
                    time.sleep(0.05)

        event.listen(paused.engine, "after_cursor_execute", sigstop_once)
        caplog.set_level(logging.WARNING, logger="scheduler.reports")

        reply = reporter.report(Finished(tid, f, Phase.APPLY, APPLY_OK))

        assert stopped and reply.accepted
        assert len(retries(caplog.records)) == 1
        assert tasks.get(rt, tid).status is S.APPLIED
    finally:
        paused.close()


# ---------------------------------------------------------------- a pooled connection gone stale


def kill_pooled_connection(rt: Runtime) -> int:
    """Terminate the backend of the connection ``rt``'s pool holds idle (as a
    server restart or an admin would), and return its pid."""
    with rt.engine.connect() as conn:
        pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (True,)
    return int(pid)


@pytest.fixture
def unpinged(rt: Runtime) -> Iterator[Runtime]:
    """A worker's runtime: no pre-ping (see scheduler.db.make_engine)."""
    r = Runtime(rt.settings, rt.publisher, actor="worker", inline_wakeups=True, pre_ping=False)
    yield r
    r.close()


def test_worker_tasks_retry_once_on_a_connection_the_server_dropped(
    rt: Runtime, ws: str, unpinged: Runtime, caplog: Any
) -> None:
    """Workers' pools do not pre-ping (a round trip per checkout). A pooled
    connection that died while idle fails its next statement; a worker task
    tries once more on a fresh connection instead of leaving the hint to the
    reconciler."""
    from sqlalchemy.exc import DBAPIError

    from celery_app.tasks import _retry_lost_connection
    from scheduler import dispatcher

    worker = unpinged
    first = tasks.submit(rt, ws, TaskType.PLAN)
    kill_pooled_connection(worker)
    # Without the retry the hazard is real: the stale connection fails.
    with pytest.raises(DBAPIError) as failed:
        dispatcher.claim_plan(worker, first.id)
    assert failed.value.connection_invalidated
    assert tasks.get(rt, first.id).status is S.PENDING

    second = tasks.submit(rt, ws, TaskType.PLAN)
    kill_pooled_connection(worker)
    caplog.set_level(logging.INFO, logger="celery_app.tasks")
    _retry_lost_connection("claim_plan", lambda: dispatcher.claim_plan(worker, second.id))

    assert tasks.get(rt, second.id).status is S.PLANNING
    reconnects = [r for r in caplog.records if getattr(r, "action", None) == "db_reconnect"]
    assert len(reconnects) == 1
