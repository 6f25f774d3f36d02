"""Publish broker messages only after the database commit that makes them true.

A message published before its row commits can reach a worker that does not
see the row yet (and drops the hint); one published inside a transaction that
then rolls back points at nothing. So messages are queued on the session and
sent from its ``after_commit`` hook, and forgotten on rollback.

If publishing fails after the commit, the work is still in the database and
the reconciler re-sends the hint; the failure is logged, not raised, because
the caller's transaction has already succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from scheduler.messages import Message, Publisher

log = logging.getLogger(__name__)

_PENDING = "runq.outbox"
_HOOKED = "runq.outbox.hooked"

#: Called after commit with the session and the transitions committed;
#: returns extra messages (the runtime uses it to wake the dispatcher when a
#: workspace frees up).
AfterCommit = Callable[[Session, list[object]], list[Message]]
_TRANSITIONS = "runq.transitions"


def attach(
    target: Session | sessionmaker[Session],
    publisher: Publisher,
    after_commit: AfterCommit | None = None,
) -> None:
    """Install the hooks on a session, or once on a sessionmaker for every
    session it makes (idempotent: a session that has them is left alone)."""
    if isinstance(target, Session):
        if target.info.get(_HOOKED):
            return
        target.info[_HOOKED] = True
    else:
        # Sessions made by the factory carry the flag in their info.
        target.configure(info={_HOOKED: True})

    def _send(sess: Session) -> None:
        # after_commit also fires when a SAVEPOINT is released (a claim's
        # transition() uses one); only the root commit makes rows visible.
        if sess.in_nested_transaction():
            return
        messages: list[Message] = sess.info.pop(_PENDING, [])
        transitions: list[object] = sess.info.pop(_TRANSITIONS, [])
        if after_commit is not None and transitions:
            messages.extend(after_commit(sess, transitions))
        for message in dict.fromkeys(messages):  # one wake-up per workspace per commit
            publish_logged(publisher, message)

    def _drop(sess: Session, transaction: SessionTransaction) -> None:
        # Only the end of the root transaction forgets what is queued: a
        # rolled-back SAVEPOINT (a lost claim race) leaves the outer
        # transaction, and what it queued, alive. After a commit the lists
        # were already consumed by _send.
        if transaction.parent is None and not transaction.nested:
            sess.info.pop(_PENDING, None)
            sess.info.pop(_TRANSITIONS, None)

    event.listen(target, "after_commit", _send)
    event.listen(target, "after_transaction_end", _drop)


def publish_logged(publisher: Publisher, message: Message) -> None:
    """Publish ``message`` after a commit; a failure is logged, not raised."""
    try:
        publisher.publish(message)
    except Exception as exc:
        # Usually the broker is unreachable: one line says so; the
        # traceback is for -vv / DEBUG.
        log.error(  # noqa: TRY400 - the traceback only at DEBUG, see above
            "publishing %s (%s) failed after commit (%s: %s); the work is saved "
            "and the reconciler will re-send it",
            message.task,
            message.describe(),
            type(exc).__name__,
            exc,
            exc_info=log.isEnabledFor(logging.DEBUG),
            extra={"action": "publish_failed", "message_task": message.task},
        )


def add(session: Session, message: Message) -> None:
    """Queue ``message`` to be published when ``session`` commits."""
    session.info.setdefault(_PENDING, []).append(message)


def record_transition(session: Session, transition: object) -> None:
    session.info.setdefault(_TRANSITIONS, []).append(transition)
