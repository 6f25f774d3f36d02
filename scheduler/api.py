"""The Python API for application code.

from scheduler.api import Client

client = Client.from_env()
task = client.submit("networking", "plan_and_apply", message="bump vpc")
client.wait([task.id])
client.why(task.id)     # Waiting(kind, sentence, details), or None once it runs
client.workspace("networking")  # active task, queue, running plans, lock, state

# or inside your own transaction (same database as runq):
with client.session() as s, s.begin():
    s.add(my_row)
    client.submit("networking", "plan", session=s)
# the task's message is published only if that transaction commits
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from scheduler import tasks, workspaces
from scheduler.brokers import KombuPublisher
from scheduler.errors import SchedulerError
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import SETTLED, ExecutionMode, TaskStatus, TaskType
from scheduler.views import EventView, TaskView, WorkspaceView

if TYPE_CHECKING:
    from scheduler.artifacts import LogPiece
    from scheduler.waiting import Waiting


class WaitTimeout(SchedulerError):
    """Timed out waiting for tasks to settle."""


class Client:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @classmethod
    def from_env(cls, settings: Settings | None = None, actor: str | None = None) -> Client:
        settings = settings or Settings()
        return cls(
            Runtime(
                settings=settings,
                # Not Celery's app: a client only sends messages, and a
                # read-only one (`runq show`, `runq list`) sends none (issue 8).
                publisher=KombuPublisher(settings.resolved_broker_url),
                actor=actor or f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}",
            )
        )

    def session(self) -> Session:
        """A session on runq's database, publishing runq's messages on commit."""
        return self.runtime.sessions()

    def create_workspace(
        self,
        name: str,
        *,
        mode: ExecutionMode | str = ExecutionMode.LOCAL,
        source_dir: str | None = None,
        auto_apply: bool = False,
        agent_pool: str | None = None,
        plan_timeout: float | None = None,
        apply_timeout: float | None = None,
        k8s: dict[str, Any] | None = None,
    ) -> WorkspaceView:
        return workspaces.create(
            self.runtime,
            name,
            mode=mode,
            source_dir=source_dir,
            auto_apply=auto_apply,
            agent_pool=agent_pool,
            plan_timeout=plan_timeout,
            apply_timeout=apply_timeout,
            k8s=k8s,
        )

    def submit(
        self,
        workspace: str,
        task_type: TaskType | str,
        *,
        message: str | None = None,
        created_by: str | None = None,
        session: Session | None = None,
    ) -> TaskView:
        return tasks.submit(
            self.runtime,
            workspace,
            task_type,
            message=message,
            created_by=created_by or self.runtime.actor,
            session=session,
        )

    def get(self, task_id: int) -> TaskView:
        return tasks.get(self.runtime, task_id)

    def confirm(self, task_id: int) -> TaskView:
        return tasks.confirm(self.runtime, task_id)

    def discard(self, task_id: int) -> TaskView:
        return tasks.discard(self.runtime, task_id)

    def cancel(self, task_id: int, *, force: bool = False) -> TaskView:
        """Cancel ``task_id``; a running phase is interrupted (``force``: killed).
        Returns at once; :meth:`wait` for the task to end."""
        return tasks.cancel(self.runtime, task_id, force=force)

    def logs(self, task_id: int) -> dict[str, str]:
        """The stored output of each phase of ``task_id`` that has any."""
        from scheduler import artifacts

        with self.session() as s:
            texts = {p: artifacts.log_text(s, task_id, p) for p in ("plan", "apply")}
        return {p: t.decode("utf-8", errors="replace") for p, t in texts.items() if t}

    def follow_logs(self, task_id: int, *, poll: float = 0.5) -> Iterator[LogPiece]:
        """``task_id``'s output as it is stored, until the task settles
        (see :func:`scheduler.artifacts.follow`)."""
        from scheduler import artifacts

        return artifacts.follow(self.runtime, task_id, poll=poll)

    def why(self, task_id: int) -> Waiting | None:
        """What task ``task_id`` waits for (see :mod:`scheduler.waiting`):
        ``Waiting(kind, sentence, details)``, or None if it runs or has ended."""
        from scheduler import waiting

        return waiting.why(self.runtime, task_id)

    def workspace(self, name: str) -> workspaces.Overview:
        """Workspace ``name`` with its active task, queue, running plans, lock
        and latest state version (``runq workspace show``)."""
        return workspaces.overview(self.runtime, name)

    def events(self, task_ids: Sequence[int] | None = None) -> list[EventView]:
        return tasks.events(self.runtime, task_ids)

    def wait(
        self,
        task_ids: Iterable[int],
        *,
        timeout: float | None = None,
        until: frozenset[TaskStatus] = SETTLED,
        poll: float = 0.2,
    ) -> list[TaskView]:
        return wait(self.runtime, task_ids, timeout=timeout, until=until, poll=poll)

    def close(self) -> None:
        self.runtime.close()
        if isinstance(self.runtime.publisher, KombuPublisher):
            self.runtime.publisher.close()  # opened again if used again


def wait(
    rt: Runtime,
    task_ids: Iterable[int],
    *,
    timeout: float | None = None,
    until: frozenset[TaskStatus] = SETTLED,
    poll: float = 0.2,
) -> list[TaskView]:
    """Block until every task is in ``until``; the database is polled, as the
    truth lives there (an unknown id fails at once with TaskNotFound)."""
    ids = list(task_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        # One query per poll, not one per task: on SQLite every read takes
        # the write lock, and workers are waiting for it.
        views = tasks.get_many(rt, ids)
        if all(v.status in until for v in views):
            return views
        if deadline is not None and time.monotonic() >= deadline:
            waiting = ", ".join(f"{v.id} ({v.status})" for v in views if v.status not in until)
            raise WaitTimeout(f"timed out after {timeout}s; still waiting for {waiting}")
        time.sleep(poll)
