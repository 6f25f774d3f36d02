"""Thin task functions: ids in, the scheduler does the work.

``dispatch`` is idempotent (it re-reads the database and does nothing when
the hint is stale), so it acks late and is re-queued if the worker dies under
it. ``claim_plan`` and ``execute`` may run terraform for hours: see their
notes.

Every argument is checked before anything runs: a message with the wrong
shape, from a buggy or hostile publisher, is logged as rejected and changes
nothing. Only a failure that may pass (the database or Redis down for a
moment) is left to the reconciler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from celery_app.app import app, runtime
from celery_app.prefetch import ExecuteRequest
from executors.outcome import MessageRejected, PhaseFailed
from scheduler import dispatcher, local_runs, reconciler
from scheduler.errors import InvalidInput
from scheduler.messages import (
    TASK_CLAIM_PLAN,
    TASK_DISPATCH,
    TASK_EXECUTE,
    TASK_RECONCILE,
    check_id,
    check_workspace,
)
from scheduler.reports import is_transient
from scheduler.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")


def _transient(exc: BaseException) -> bool:
    """A failure that may pass: the database, Redis or the broker was away."""
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, DBAPIError):
        return is_transient(exc)
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | BrokerError)


class Deferred(Exception):
    """A failure that may pass (the database, Redis or the broker was away);
    the reconciler re-sends what is still owed."""


class TaskFailed(Exception):
    """Anything else: a bug, logged with its traceback."""


#: What a runq task may raise on purpose. Each still ends the task as a
#: FAILURE in Flower and in Celery's events, with its message as the reason;
#: Celery logs it in one line at INFO (we logged it already), where an
#: unexpected exception would be logged again, traceback and all, at ERROR.
EXPECTED = (PhaseFailed, MessageRejected, Deferred, TaskFailed)


def _guarded(what: str, fn: Callable[[Runtime], str]) -> str:
    """Run ``fn`` and return its one-line outcome, which Flower shows as the
    task's result; a failure is logged, then raised as one of
    :data:`EXPECTED`, so Flower counts it as one and says why.

    A failed hint is not retried here (no countdowns: the database is the
    queue). A transient failure is left to the reconciler, which re-sends
    what is still owed; anything else is a rejection or a bug, said as such.
    """
    try:
        return _retry_lost_connection(what, lambda: fn(runtime()))
    except PhaseFailed:
        raise  # the phase's own report said why; the task ran as it should
    except InvalidInput as exc:
        raise _rejected(what, exc) from None
    except Exception as exc:
        if not _transient(exc):
            log.exception("%s failed", what, extra={"action": "task_error", "what": what})
            raise TaskFailed(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        log.error(  # noqa: TRY400 - one line; the traceback only at DEBUG
            "%s failed on %s (%s); the reconciler will re-send what is still owed",
            what,
            type(exc).__name__,
            first_line,
            exc_info=log.isEnabledFor(logging.DEBUG),
            extra={"action": "task_error", "what": what},
        )
        raise Deferred(
            f"{what}: {type(exc).__name__} ({first_line}); "
            "the reconciler will re-send what is still owed"
        ) from None


def _retry_lost_connection(what: str, call: Callable[[], T]) -> T:
    """``call()``, once more if it failed on a connection the server had
    dropped (pools do not pre-ping: see scheduler.db.make_engine). The
    failure invalidated the pool, so the second try gets a fresh one. Safe
    because every task re-reads the database before it acts: a claim that
    committed before the failure is found claimed, and skipped."""
    try:
        return call()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.info(
            "%s: the database connection was gone (%s); once more on a new one",
            what,
            type(exc.orig).__name__,
            extra={"action": "db_reconnect", "what": what},
        )
        return call()


def _check(what: str, check: Callable[[], object]) -> None:
    """Check a message's arguments before anything runs; a bad one is
    logged and raised as :class:`MessageRejected` (never retried)."""
    try:
        check()
    except InvalidInput as exc:
        raise _rejected(what, exc) from None


def _rejected(what: str, exc: InvalidInput) -> MessageRejected:
    """Log a message that can never succeed; the error to end its task with."""
    log.warning("%s rejected: %s", what, exc, extra={"action": "message_rejected", "what": what})
    return MessageRejected(f"{what} rejected: {exc}")


#: A local-mode plan is claimed and run right here (one hop, see
#: local_runs.run_plan), so this task may run terraform for as long as
#: ``execute`` does, and is acknowledged the same way (see its note below).
#: A worker that dies between the ack and the claim's commit loses the hint:
#: the task is still pending, and the reconciler re-sends it.
@app.task(name=TASK_CLAIM_PLAN, acks_late=False, Request=ExecuteRequest, throws=EXPECTED)
def claim_plan(task_id: Any) -> str:
    _check("claim_plan", lambda: check_id(task_id, "task id"))
    return _guarded(f"claim_plan({task_id})", lambda rt: local_runs.run_plan(rt, task_id).outcome())


@app.task(name=TASK_DISPATCH, acks_late=True, reject_on_worker_lost=True, throws=EXPECTED)
def dispatch(workspace: Any) -> str:
    _check("dispatch", lambda: check_workspace(workspace))
    return _guarded(
        f"dispatch({workspace})", lambda rt: dispatcher.dispatch(rt, workspace).summary()
    )


#: acks_late is off: a re-delivered message could do no harm (the start is a
#: compare-and-set under the fence), but a claimed phase whose worker died
#: before it started is the reconciler's to re-send, and a started one's
#: lease lapses and is handled there. The message carries only the task id
#: and the fence: what to run is read from the database.
#:
#: acks_late would also be wrong on RabbitMQ for a second reason: it closes
#: the channel of a consumer that holds a delivery unacknowledged longer than
#: its ``consumer_timeout`` (30 min by default), and a phase may run for
#: hours. The early ack frees a prefetch slot while terraform still runs;
#: ExecuteRequest keeps it held (celery_app.prefetch).
@app.task(name=TASK_EXECUTE, acks_late=False, Request=ExecuteRequest, throws=EXPECTED)
def execute(task_id: Any, fence: Any = None) -> str:
    # Named only once checked: a raw argument may be megabytes long.
    _check("execute", lambda: (check_id(task_id, "task id"), check_id(fence, "fence")))
    what = f"execute(task {task_id}, fence {fence})"
    return _guarded(what, lambda rt: local_runs.execute(rt, task_id, fence).outcome())


@app.task(name=TASK_RECONCILE, acks_late=True, throws=EXPECTED)
def reconcile() -> str:
    return _guarded("reconcile", lambda rt: reconciler.sweep(rt).summary())
