"""Bundles: what one claimed phase needs, read from the database.

Local mode builds the bundle in the worker that runs the phase; agent and
Kubernetes launchers build it at hand-off and send it (signed) to the
executor, which needs no database.
"""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy.orm import Session

from executors.base import Bundle, Handoff
from scheduler import artifacts, leases
from scheduler.errors import ConcurrentChange, InvalidInput
from scheduler.models import ConfigurationVersion, Task, Workspace
from scheduler.settings import Settings
from scheduler.states import Phase


class Unrunnable(ConcurrentChange):
    """The claim is current, but no executor can ever run it: its apply has
    no saved plan, or its configuration cannot be snapshotted (a task queued
    before configuration versions existed, whose directory is gone since).

    A :class:`ConcurrentChange`, so a launcher that only skips stale claims
    still skips it; an executor that can report fails the phase with it
    instead, so the task says why at once rather than after every re-send.
    """

    def __init__(self, handoff: Handoff, message: str) -> None:
        super().__init__(message)
        self.handoff = handoff


def build(session: Session, settings: Settings, task_id: int, fence: int) -> Bundle:
    """The bundle of ``task_id``'s claim ``fence``; :class:`ConcurrentChange`
    if that claim is no longer current or was started already,
    :class:`Unrunnable` if it can never run."""
    handoff = leases.load_handoff(session, settings, task_id, fence)
    task = session.get(Task, task_id)
    ws = session.get(Workspace, task.workspace_id) if task is not None else None
    if task is None or ws is None:
        raise ConcurrentChange(f"task {task_id} does not exist")
    return of(session, settings, task, ws, handoff)


def of(session: Session, settings: Settings, task: Task, ws: Workspace, handoff: Handoff) -> Bundle:
    try:
        version = config_of(session, settings, task, ws)
    except InvalidInput as exc:
        raise Unrunnable(handoff, str(exc)) from exc
    state = artifacts.latest(session, ws.id)
    plan: bytes | None = None
    if handoff.phase is Phase.APPLY:
        saved = artifacts.plan_of(session, task.id)
        if saved is None:
            raise Unrunnable(handoff, f"task {task.id} has no saved plan to apply")
        plan = saved.content
    return Bundle(
        # The submitting host's directory means nothing to an executor (it
        # runs the snapshot), and a path on it should not travel to agents.
        handoff=replace(handoff, config_sha256=version.sha256, source_dir=None),
        config=version.content,
        state=state.content if state is not None else None,
        plan=plan,
    )


def config_of(
    session: Session, settings: Settings, task: Task, ws: Workspace
) -> ConfigurationVersion:
    """The task's configuration version.

    A task submitted before configuration versions existed (upgraded from an
    older runq) has none: it gets a snapshot of its workspace's directory now.
    """
    if task.config_version_id is not None:
        version = session.get(ConfigurationVersion, task.config_version_id)
        if version is not None:
            return version
    content = artifacts.snapshot(ws.source_dir, settings.max_config_bytes, ws.name)
    version = artifacts.store_config(session, ws.id, content)
    task.config_version_id = version.id
    return version
