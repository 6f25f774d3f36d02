"""The runtime: settings plus the connections built from them, once.

Entry points build one :class:`Runtime` (the CLI per command, a Celery worker
per child process) and pass it down. Connections are opened lazily, so
building a runtime never touches the network.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from scheduler import messages, outbox
from scheduler.db import make_engine, make_sessionmaker, pg_session_limits
from scheduler.messages import Message, Publisher
from scheduler.settings import Settings
from scheduler.states import TERMINAL, DispatchMode, TaskStatus, TaskType

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

#: Session info keys: dispatch inline after commit; workspaces owed one.
_INLINE = "runq.wakeups.inline"
_OWED = "runq.wakeups.owed"


@dataclass
class Runtime:
    settings: Settings
    publisher: Publisher
    #: Who this process is in event rows ("worker@host:pid", "cli:alice").
    actor: str = "runq"
    #: Run the dispatcher here, right after the commit that frees or
    #: advances a workspace, instead of publishing a wake-up for a worker.
    #: Workers and beat do: a wake-up message waits in line behind every
    #: other workspace's messages (1.5 s at 100 busy workspaces), the direct
    #: call takes milliseconds. Clients (the CLI, the Python API) publish.
    inline_wakeups: bool = False
    #: Check each pooled connection before use (see scheduler.db.make_engine):
    #: off in workers, whose every call retries once on a lost connection.
    pre_ping: bool = True
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            st = self.settings
            self._engine = make_engine(
                st.resolved_database_url,
                pg_connect_args=pg_session_limits(
                    lock_timeout=st.db_lock_timeout,
                    statement_timeout=st.db_statement_timeout,
                    idle_in_transaction=st.db_idle_in_transaction_timeout,
                ),
                pre_ping=self.pre_ping,
            )
        return self._engine

    def after_fork(self) -> None:
        """In a forked child: drop the parent's pooled connections without
        closing them (closing would end the parent's sessions)."""
        if self._engine is not None:
            self._engine.dispose(close=False)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions that publish runq's messages when they commit."""
        factory = make_sessionmaker(self.engine)
        outbox.attach(factory, self.publisher, self._wakeups)
        return factory

    @cached_property
    def redis(self) -> Redis:
        from redis import Redis

        return Redis.from_url(self.settings.redis_url, socket_timeout=10)

    def attach(self, session: Session) -> None:
        """Make ``session`` publish runq's messages when it commits."""
        outbox.attach(session, self.publisher, self._wakeups)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in a transaction, committed on success; then, with
        :attr:`inline_wakeups`, the dispatch its commit made owed."""
        with self.sessions() as session:
            session.info[_INLINE] = self.inline_wakeups
            with session.begin():
                yield session
            owed: list[str] = session.info.pop(_OWED, [])
        if owed:
            self._wake(owed)

    def _wake(self, workspaces: list[str]) -> None:
        """Dispatch ``workspaces`` here. Should that fail (Redis or the
        database away), publish the wake-up instead; should that fail too,
        the reconciler finds the workspace owed a dispatch."""
        from scheduler import dispatcher

        for name in workspaces:
            try:
                dispatcher.dispatch(self, name)
            except Exception as exc:
                log.warning(
                    "dispatch(%s) after commit failed (%s: %s); publishing the wake-up",
                    name,
                    type(exc).__name__,
                    exc,
                    extra={"action": "wakeup_failed", "workspace": name},
                )
                outbox.publish_logged(self.publisher, messages.dispatch(name))

    def _wakeups(self, session: Session, transitions: list[object]) -> list[Message]:
        """Messages owed after these transitions committed.

        The dispatcher is woken the moment a workspace may have a next step:
        a plan+apply ended (its slot is free) or was confirmed (its apply can
        be claimed). In legacy mode every task holds the workspace, so the end
        of any task wakes it. Plans in the new mode never touch the dispatcher.
        """
        from scheduler.transitions import Transition

        legacy = self.settings.dispatch_mode is DispatchMode.LEGACY
        workspaces: set[str] = set()
        for t in transitions:
            if not isinstance(t, Transition):
                continue
            holds_workspace = legacy or t.type is TaskType.PLAN_AND_APPLY
            if holds_workspace and (
                t.to_status in TERMINAL or t.to_status is TaskStatus.APPLY_QUEUED
            ):
                workspaces.add(t.workspace)
        if session.info.get(_INLINE):
            # transaction() dispatches them once this commit is done.
            session.info.setdefault(_OWED, []).extend(sorted(workspaces))
            return []
        return [messages.dispatch(name) for name in sorted(workspaces)]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if "redis" in self.__dict__:
            self.redis.close()
            del self.__dict__["redis"]
        self.__dict__.pop("sessions", None)
