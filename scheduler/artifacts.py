"""Stored artifacts: configuration versions, saved plans, log chunks, and
the Terraform state of each workspace, versioned.

Everything a phase reads or leaves is here, not on a worker's disk, so a
plan made on one host is applied on another and a wiped host loses nothing.

The newest ``state_versions`` row of a workspace *is* its state. Executors
fetch it at the start of a phase and report every state terraform writes
(:class:`executors.base.StateWritten`), so no worker's disk holds the only
copy: a worker killed mid-apply loses at most the writes of its last moment.

Hazards and what guards them:

* a superseded executor (paused past its lease, then resumed) writing over a
  newer state: a write is accepted only under the task's current fence while
  the task is applying;
* a stale writer replacing newer state, or two lineages mixing: the serial
  must grow within the workspace's lineage, as Terraform's own remote
  backends require (an equal serial is accepted only for identical bytes).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from executors import archive
from executors.base import LogWritten, Reply, StateWritten
from scheduler.errors import InvalidInput, NotFound, TaskNotFound
from scheduler.models import ConfigurationVersion, LogChunk, PlanArtifact, StateVersion, Task
from scheduler.states import SETTLED, TaskStatus, phase_of

if TYPE_CHECKING:
    from scheduler.runtime import Runtime

log = logging.getLogger(__name__)


#: Built once, as the hot paths' other reads (see models.task_and_workspace).
_LATEST = (
    select(StateVersion)
    .where(StateVersion.workspace_id == bindparam("workspace_id"))
    .order_by(StateVersion.id.desc())
    .limit(1)
)
_CONFIG_BY_DIGEST = (
    select(ConfigurationVersion)
    # Not the content (up to RUNQ_MAX_CONFIG_BYTES): a submit needs only the
    # id, and an executor that reads it loads it then.
    .options(defer(ConfigurationVersion.content))
    .where(
        ConfigurationVersion.workspace_id == bindparam("workspace_id"),
        ConfigurationVersion.sha256 == bindparam("sha256"),
    )
)


def latest(session: Session, workspace_id: int) -> StateVersion | None:
    return session.scalars(_LATEST, {"workspace_id": workspace_id}).first()


@dataclass(frozen=True)
class StateVersionView:
    workspace: str
    #: 1 for the workspace's first stored state, counting up.
    version: int
    serial: int
    lineage: str
    task_id: int | None
    created_at: datetime
    size: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {
            "workspace": self.workspace,
            "version": self.version,
            "serial": self.serial,
            "lineage": self.lineage,
            "task_id": self.task_id,
            "created_at": self.created_at.isoformat(),
            "size": self.size,
            "sha256": self.sha256,
        }


#: What a state version's view shows (everything but its content), in the
#: order of :class:`StateVersionView`'s fields after ``version``.
STATE_VERSION_FIELDS = (
    StateVersion.serial,
    StateVersion.lineage,
    StateVersion.task_id,
    StateVersion.created_at,
    StateVersion.size,
    StateVersion.sha256,
)


def state_versions(session: Session, workspace: str) -> list[StateVersionView]:
    """``workspace``'s stored states, oldest first (without their content)."""
    from scheduler.workspaces import load

    ws = load(session, workspace)
    rows = session.execute(
        select(*STATE_VERSION_FIELDS)
        .where(StateVersion.workspace_id == ws.id)
        .order_by(StateVersion.id)
    ).all()
    return [StateVersionView(workspace, n, *row) for n, row in enumerate(rows, start=1)]


def state_version(
    session: Session, workspace: str, number: int | None = None
) -> tuple[StateVersionView, bytes]:
    """Version ``number`` of ``workspace``'s state (default: the current one)."""
    from scheduler.workspaces import load

    ws = load(session, workspace)
    ids = session.scalars(
        select(StateVersion.id).where(StateVersion.workspace_id == ws.id).order_by(StateVersion.id)
    ).all()
    if not ids:
        raise NotFound(f"workspace {workspace!r} has no stored state yet")
    if number is None:
        number = len(ids)
    if not 1 <= number <= len(ids):
        raise NotFound(f"workspace {workspace!r} has state versions 1..{len(ids)}, not {number}")
    row = session.get_one(StateVersion, ids[number - 1])
    view = StateVersionView(
        workspace,
        number,
        row.serial,
        row.lineage,
        row.task_id,
        row.created_at,
        row.size,
        row.sha256,
    )
    return view, row.content


def store_state(session: Session, report: StateWritten) -> Reply:
    """Record the state an applying executor wrote, if it may write it."""
    # FOR UPDATE: two writes of one apply (a mid-apply write and the final
    # one, retried after a blip) must compare serials one after the other.
    task = session.scalars(
        select(Task).where(Task.id == report.task_id).with_for_update()
    ).one_or_none()
    if task is None:
        return Reply.stale(f"task {report.task_id} does not exist")
    if task.fence != report.fence:
        return Reply.stale(f"fence {report.fence} is stale (the task holds {task.fence})")
    if task.status != TaskStatus.APPLYING:
        return Reply.stale(f"task is {task.status}, not applying")
    current = latest(session, task.workspace_id)
    digest = hashlib.sha256(report.content).hexdigest()
    if current is not None:
        if current.lineage != report.lineage:
            return Reply(
                False,
                reason=f"lineage {report.lineage} differs from the workspace's {current.lineage}",
            )
        if report.serial < current.serial or (
            report.serial == current.serial and digest != current.sha256
        ):
            return Reply(
                False,
                reason=f"serial {report.serial} is not newer than the stored {current.serial}",
            )
        if report.serial == current.serial:
            return Reply.ok()  # the same state again (a retried report)
    session.add(
        StateVersion(
            workspace_id=task.workspace_id,
            serial=report.serial,
            lineage=report.lineage,
            task_id=task.id,
            fence=report.fence,
            sha256=digest,
            size=len(report.content),
            content=report.content,
        )
    )
    session.flush()
    log.info(
        "task %s: state serial %s stored",
        report.task_id,
        report.serial,
        extra={"action": "state_stored", "task_id": report.task_id, "serial": report.serial},
    )
    return Reply.ok()


# -- configuration versions ------------------------------------------------


def snapshot(source_dir: str | None, limit: int, workspace: str) -> bytes:
    """The configuration version of ``source_dir``: refused with a clear
    error if it is missing or over ``limit`` bytes (nothing is stored)."""
    if not source_dir:
        raise InvalidInput(f"workspace {workspace!r} has no configuration directory (--dir)")
    try:
        return archive.pack_dir(Path(source_dir), limit)
    except archive.ArchiveError as exc:
        hint = " (RUNQ_MAX_CONFIG_BYTES sets it)" if "limit" in str(exc) else ""
        raise InvalidInput(f"cannot snapshot workspace {workspace!r}: {exc}{hint}") from exc


def store_config(session: Session, workspace_id: int, content: bytes) -> ConfigurationVersion:
    """The stored version with ``content``'s digest, stored now if new."""
    digest = archive.sha256(content)

    def find() -> ConfigurationVersion | None:
        return session.scalars(
            _CONFIG_BY_DIGEST, {"workspace_id": workspace_id, "sha256": digest}
        ).first()

    found = find()
    if found is not None:
        return found
    version = ConfigurationVersion(
        workspace_id=workspace_id, sha256=digest, size=len(content), content=content
    )
    try:
        # A savepoint: two submits of the same new snapshot race on the
        # unique index, and the loser uses the winner's row.
        with session.begin_nested():
            session.add(version)
    except IntegrityError:
        found = find()
        if found is None:
            raise
        return found
    return version


# -- saved plans --------------------------------------------------------------


def store_plan(session: Session, task: Task, fence: int, content: bytes) -> None:
    """Keep ``content`` as ``task``'s saved plan (the caller holds the task's
    current fence, checked in the same transaction)."""
    row = session.get(PlanArtifact, task.id)
    if row is None:
        row = PlanArtifact(task_id=task.id)
        session.add(row)
    row.fence = fence
    row.sha256 = archive.sha256(content)
    row.size = len(content)
    row.content = content
    session.flush()


def plan_of(session: Session, task_id: int) -> PlanArtifact | None:
    return session.get(PlanArtifact, task_id)


# -- logs ---------------------------------------------------------------------


def store_log(session: Session, report: LogWritten) -> Reply:
    """Keep a chunk of a phase's output (once per offset) under its fence."""
    task = session.get(Task, report.task_id)
    if task is None:
        return Reply.stale(f"task {report.task_id} does not exist")
    if task.fence != report.fence:
        return Reply.stale(f"fence {report.fence} is stale (the task holds {task.fence})")
    # Only while the claim runs that phase: output under another phase's name,
    # or after the phase ended (its Finished ships the last of it first).
    running = phase_of(TaskStatus(task.status))
    if running is not report.phase:
        return Reply.stale(f"task is {task.status}, not running a {report.phase}")
    exists = session.scalar(
        select(LogChunk.id).where(
            LogChunk.task_id == report.task_id,
            LogChunk.phase == str(report.phase),
            LogChunk.fence == report.fence,
            LogChunk.offset == report.offset,
        )
    )
    if exists is None:
        try:
            with session.begin_nested():
                session.add(
                    LogChunk(
                        task_id=report.task_id,
                        phase=str(report.phase),
                        fence=report.fence,
                        offset=report.offset,
                        content=report.content,
                    )
                )
        except IntegrityError:
            pass  # the same chunk, stored by a retry that raced this one
    return Reply.ok()


def _past(end: int, offset: int, content: bytes) -> bytes | None:
    """What chunk ``content``, stored at byte ``offset`` of a phase's log,
    adds after byte ``end``; None if it ends by ``end`` (a re-sent chunk)."""
    return content[max(0, end - offset) :] if offset + len(content) > end else None


def log_text(session: Session, task_id: int, phase: str | None = None) -> bytes:
    """A task's stored output, phase by phase, latest claim of each phase."""
    rows = session.execute(
        select(LogChunk.phase, LogChunk.fence, LogChunk.offset, LogChunk.content)
        .where(LogChunk.task_id == task_id)
        .order_by(LogChunk.id)
    ).all()
    latest_fence: dict[str, int] = {}
    for ph, fence, _, _ in rows:
        latest_fence[ph] = max(fence, latest_fence.get(ph, fence))
    out = bytearray()
    for ph in ("plan", "apply"):
        if phase is not None and ph != phase:
            continue
        chunks = sorted((o, c) for p, f, o, c in rows if p == ph and f == latest_fence.get(ph))
        end = 0
        for offset, content in chunks:
            out += _past(end, offset, content) or b""
            end = max(end, offset + len(content))
    return bytes(out)


@dataclass(frozen=True)
class LogPiece:
    """New output of one claim of one phase (``runq logs --follow``)."""

    phase: str
    fence: int
    text: bytes


def follow(
    rt: Runtime,
    task_id: int,
    *,
    poll: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[LogPiece]:
    """A task's output as it is stored, until the task settles.

    Executors send their output at each heartbeat and before they report a
    phase finished, so it arrives here at most a heartbeat after terraform
    wrote it, from whichever host runs the phase. A chunk sent twice (a
    retried report) is skipped by its offset. It ends once the task is
    settled (ended, or waiting for confirmation) and everything stored
    before that has been given: the finish is committed after the last
    chunk, so reading the status first and the chunks second misses none.
    """
    last_id = 0
    ends: dict[tuple[str, int], int] = {}
    while True:
        with rt.sessions() as s:
            status = s.scalar(select(Task.status).where(Task.id == task_id))
            if status is None:
                raise TaskNotFound(f"task {task_id} does not exist")
            rows = s.execute(
                select(
                    LogChunk.id, LogChunk.phase, LogChunk.fence, LogChunk.offset, LogChunk.content
                )
                .where(LogChunk.task_id == task_id, LogChunk.id > last_id)
                .order_by(LogChunk.id)
            ).all()
        for chunk_id, phase, fence, offset, content in rows:
            last_id = chunk_id
            end = ends.get((phase, fence), 0)
            if (new := _past(end, offset, content)) is not None:
                ends[(phase, fence)] = offset + len(content)
                yield LogPiece(phase, fence, new)
        if TaskStatus(status) in SETTLED and not rows:
            return
        sleep(poll)
