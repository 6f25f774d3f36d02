"""The outbox: messages leave after the root commit, never before, never on
rollback; and the runtime's wake-up rules."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from scheduler import messages, outbox
from scheduler.messages import Message, RecordingPublisher
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import DispatchMode, TaskStatus, TaskType
from scheduler.transitions import Transition

A = messages.claim_plan(1)
B = messages.dispatch("net")


@pytest.fixture
def rt(sqlite_url: str, tmp_path: Path) -> Iterator[Runtime]:
    # An unreachable Redis: nothing here may need it.
    runtime = Runtime(
        Settings(database_url=sqlite_url, data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"),
        RecordingPublisher(),
    )
    yield runtime
    runtime.close()


def sent(rt: Runtime) -> list[Message]:
    assert isinstance(rt.publisher, RecordingPublisher)
    return rt.publisher.sent


def test_published_after_commit_once_each(rt: Runtime) -> None:
    with rt.transaction() as s:
        outbox.add(s, A)
        outbox.add(s, B)
        outbox.add(s, A)  # one wake-up per commit is enough
        s.execute(text("SELECT 1"))
        assert sent(rt) == []
    assert sent(rt) == [A, B]


def test_rollback_forgets(rt: Runtime) -> None:
    with pytest.raises(ZeroDivisionError), rt.transaction() as s:
        outbox.add(s, A)
        _ = 1 / 0
    assert sent(rt) == []
    # The session's next transaction starts clean.
    with rt.sessions() as s:
        rt.attach(s)
        with s.begin():
            outbox.add(s, A)
            s.rollback()
        with s.begin():
            outbox.add(s, B)
    assert sent(rt) == [B]


def test_savepoints_neither_publish_nor_forget(rt: Runtime) -> None:
    with rt.transaction() as s:
        outbox.add(s, A)
        with s.begin_nested():
            outbox.add(s, B)
        assert sent(rt) == [], "a SAVEPOINT release is not a commit"
        with pytest.raises(KeyError), s.begin_nested():
            raise KeyError
        assert sent(rt) == []
    assert sent(rt) == [A, B], "a rolled-back SAVEPOINT keeps the outer messages"


def test_attach_is_idempotent(rt: Runtime) -> None:
    with rt.sessions() as s:
        rt.attach(s)
        rt.attach(s)
        with s.begin():
            outbox.add(s, A)
    assert sent(rt) == [A]


def test_publish_failure_is_logged_not_raised(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    class Down:
        def __init__(self) -> None:
            self.tried: list[Message] = []

        def publish(self, message: Message) -> str:
            self.tried.append(message)
            raise ConnectionError("broker down")

    down = Down()
    caplog.set_level(logging.ERROR, logger="scheduler.outbox")
    # A plain session (not the runtime's, whose factory already publishes to
    # the runtime's publisher), hooked to the failing publisher.
    with Session(rt.engine) as s:
        outbox.attach(s, down)
        with s.begin():
            outbox.add(s, A)
            outbox.add(s, B)
    assert down.tried == [A, B], "one failure does not stop the others"
    failures = [r for r in caplog.records if getattr(r, "action", None) == "publish_failed"]
    assert len(failures) == 2


def _t(ws: str, task_type: TaskType, to: TaskStatus) -> Transition:
    return Transition(1, 1, ws, task_type, TaskStatus.PENDING, to, 1, datetime.now(UTC))


@pytest.mark.parametrize(
    ("mode", "task_type", "to", "wakes"),
    [
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.SUCCESS, True),
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.FAILED, True),
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.APPLIED, True),
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.CANCELLED, True),
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.DISCARDED, True),
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.APPLY_QUEUED, True),
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.PLANNING, False),
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.APPLY_PENDING, False),
        (DispatchMode.NEW, TaskType.PLAN_AND_APPLY, TaskStatus.APPLYING, False),
        (DispatchMode.NEW, TaskType.PLAN, TaskStatus.SUCCESS, False),
        (DispatchMode.NEW, TaskType.PLAN, TaskStatus.FAILED, False),
        (DispatchMode.NEW, TaskType.PLAN, TaskStatus.CANCELLED, False),
        (DispatchMode.LEGACY, TaskType.PLAN, TaskStatus.SUCCESS, True),
        (DispatchMode.LEGACY, TaskType.PLAN, TaskStatus.PLANNING, False),
        (DispatchMode.LEGACY, TaskType.PLAN_AND_APPLY, TaskStatus.APPLIED, True),
    ],
)
def test_wakeups(
    tmp_path: Path, mode: DispatchMode, task_type: TaskType, to: TaskStatus, wakes: bool
) -> None:
    rt = Runtime(Settings(data_dir=tmp_path, dispatch_mode=mode), RecordingPublisher())
    got = rt._wakeups(Session(), [_t("net", task_type, to)])
    assert got == ([messages.dispatch("net")] if wakes else [])


def test_wakeups_one_per_workspace_sorted(tmp_path: Path) -> None:
    rt = Runtime(Settings(data_dir=tmp_path), RecordingPublisher())
    pa = TaskType.PLAN_AND_APPLY
    got = rt._wakeups(
        Session(),
        [
            _t("b", pa, TaskStatus.APPLIED),
            _t("a", pa, TaskStatus.CANCELLED),
            _t("b", pa, TaskStatus.APPLY_QUEUED),
            _t("c", TaskType.PLAN, TaskStatus.SUCCESS),
            "not a transition",
        ],
    )
    assert got == [messages.dispatch("a"), messages.dispatch("b")]


def test_runtime_sessions_publish_without_attach(rt: Runtime) -> None:
    """Every session from the runtime's factory is hooked once, at the
    factory; attaching again is a no-op (no double publish)."""
    with rt.sessions() as s:
        rt.attach(s)
        with s.begin():
            outbox.add(s, A)
    assert sent(rt) == [A]
