"""submit: a pending row, its creation event, and a message after commit."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from scheduler import artifacts, messages, tasks
from scheduler.messages import RecordingPublisher
from scheduler.models import ConfigurationVersion, Task, Workspace
from scheduler.pools import PoolNotFound
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import TaskStatus, TaskType
from tests.integration.helpers import claim_plans, counts, dispatches, make_workspace


def test_submit_inserts_pending_task_and_creation_event(rt: Runtime, src: Path) -> None:
    make_workspace(rt, "net", src)
    t = tasks.submit(rt, "net", "plan_and_apply", message="bump vpc", created_by="alice")
    assert (t.workspace, t.type, t.status, t.queue_seq, t.fence) == (
        "net",
        TaskType.PLAN_AND_APPLY,
        TaskStatus.PENDING,
        1,
        0,
    )
    assert (t.message, t.created_by) == ("bump vpc", "alice")
    assert t.started_at is None and t.finished_at is None
    assert tasks.get(rt, t.id) == t
    evs = tasks.events(rt, [t.id])
    assert len(evs) == 1
    ev = evs[0]
    assert (ev.from_status, ev.to_status, ev.actor, ev.reason, ev.fence) == (
        None,
        TaskStatus.PENDING,
        "alice",
        "submitted",
        0,
    )
    # Without created_by, the runtime's actor is recorded.
    t2 = tasks.submit(rt, "net", "plan")
    assert tasks.events(rt, [t2.id])[0].actor == "test"


def test_queue_seq_counts_per_workspace(rt: Runtime, src: Path) -> None:
    make_workspace(rt, "a", src)
    make_workspace(rt, "b", src)
    order = ["a", "a", "b", "a", "b", "b", "b", "a"]
    views = [
        tasks.submit(rt, w, "plan" if i % 2 else "plan_and_apply") for i, w in enumerate(order)
    ]
    assert [v.queue_seq for v in views if v.workspace == "a"] == [1, 2, 3, 4]
    assert [v.queue_seq for v in views if v.workspace == "b"] == [1, 2, 3, 4]
    with rt.sessions() as s:
        assert dict(s.execute(select(Workspace.name, Workspace.task_seq)).all()) == {
            "a": 4,
            "b": 4,
        }


def test_plan_goes_to_claim_plan_and_plan_and_apply_to_dispatch(rt: Runtime, src: Path) -> None:
    make_workspace(rt, "net", src)
    plan = tasks.submit(rt, "net", TaskType.PLAN)
    assert rt.publisher.sent == [messages.Message("runq.claim_plan", "runq.plans", (plan.id,))]  # type: ignore[attr-defined]
    tasks.submit(rt, "net", TaskType.PLAN_AND_APPLY)
    assert rt.publisher.sent[-1] == messages.Message("runq.dispatch", "runq.dispatch", ("net",))  # type: ignore[attr-defined]
    assert claim_plans(rt) == [plan.id]
    assert dispatches(rt) == ["net"]


def test_legacy_mode_sends_plans_through_dispatch(legacy_rt: Runtime, src: Path) -> None:
    legacy = legacy_rt
    make_workspace(legacy, "net", src)
    tasks.submit(legacy, "net", TaskType.PLAN)
    tasks.submit(legacy, "net", TaskType.PLAN_AND_APPLY)
    assert claim_plans(legacy) == []
    assert dispatches(legacy) == ["net", "net"]


def test_message_is_published_only_after_the_callers_commit(rt: Runtime, src: Path) -> None:
    make_workspace(rt, "net", src)
    pub = rt.publisher
    assert isinstance(pub, RecordingPublisher)
    with rt.sessions() as s, s.begin():
        t = tasks.submit(rt, "net", "plan", session=s)
        assert pub.sent == []
        if rt.engine.dialect.name == "postgresql":
            # Not visible to anyone else before the commit either. (On SQLite
            # another session would wait: every transaction there takes the
            # write lock up front.)
            with rt.sessions() as other:
                assert other.get(Task, t.id) is None
    assert claim_plans(rt) == [t.id]
    assert tasks.get(rt, t.id).status is TaskStatus.PENDING


def test_rolled_back_submit_publishes_nothing_and_leaves_no_row(rt: Runtime, src: Path) -> None:
    make_workspace(rt, "net", src)
    before = counts(rt)

    class Abort(Exception):
        pass

    with pytest.raises(Abort), rt.sessions() as s, s.begin():
        tasks.submit(rt, "net", "plan", session=s)
        tasks.submit(rt, "net", "plan_and_apply", session=s)
        raise Abort
    assert rt.publisher.sent == []  # type: ignore[attr-defined]
    assert counts(rt) == before
    # The queue counter rolled back too: the next task is still number 1.
    assert tasks.submit(rt, "net", "plan").queue_seq == 1


def test_failed_savepoint_in_callers_transaction_keeps_earlier_messages(
    rt: Runtime, src: Path
) -> None:
    """A savepoint rolled back inside the caller's transaction must not drop the
    messages of work that the outer transaction still commits."""
    make_workspace(rt, "net", src)
    with rt.sessions() as s, s.begin():
        t = tasks.submit(rt, "net", "plan", session=s)
        with pytest.raises(IntegrityError), s.begin_nested():
            s.add(Workspace(name="net", execution_mode="local", auto_apply=False, task_seq=0))
            s.flush()
    assert tasks.get(rt, t.id).status is TaskStatus.PENDING
    assert claim_plans(rt) == [t.id]


def test_submit_to_an_agent_workspace_without_its_pool_is_refused(rt: Runtime, src: Path) -> None:
    """No executor could run it: refused at submit, nothing inserted (not
    even the configuration snapshot) and nothing sent."""
    from scheduler import workspaces

    workspaces.create(rt, "remote", mode="agent", agent_pool="pool-1", source_dir=str(src))
    before = counts(rt)
    with pytest.raises(PoolNotFound, match="agent pool 'pool-1' does not exist"):
        tasks.submit(rt, "remote", "plan")
    with rt.sessions() as s:
        assert s.scalars(select(ConfigurationVersion.id)).all() == []
    assert counts(rt) == before
    assert rt.publisher.sent == []  # type: ignore[attr-defined]


# ---------------------------------------------------------------- SQLite's write lock


@pytest.fixture
def sqlite_rt(sqlite_url: str, tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime(
        settings=Settings(database_url=sqlite_url, data_dir=tmp_path, redis_url="redis://unused"),
        publisher=RecordingPublisher(),
    )
    yield rt
    rt.close()


def sqlite_path(rt: Runtime) -> str:
    database = rt.engine.url.database
    assert database, rt.engine.url
    return database


def test_on_sqlite_the_snapshot_is_taken_outside_the_write_lock(
    sqlite_rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SQLite transaction takes the one write lock at BEGIN; the
    configuration's tar+gzip must not hold it (other writers would wait)."""
    rt = sqlite_rt
    make_workspace(rt, "net", tmp_path / "src")
    (tmp_path / "src" / "main.tf").write_text("# v1\n")
    real = artifacts.snapshot
    writes: list[str] = []

    def snapshot_while_writing(*args: Any) -> bytes:
        # Another writer, with no patience, during the snapshot.
        other = sqlite3.connect(sqlite_path(rt), timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            writes.append("written")
        except sqlite3.OperationalError as exc:
            writes.append(str(exc))
        finally:
            other.close()
        return real(*args)

    monkeypatch.setattr(artifacts, "snapshot", snapshot_while_writing)
    tasks.submit(rt, "net", "plan")
    assert writes == ["written"], "the snapshot ran under the write lock"


def test_a_directory_changed_meanwhile_is_snapshotted_again_in_the_transaction(
    sqlite_rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = sqlite_rt
    make_workspace(rt, "net", tmp_path / "old")
    (tmp_path / "old" / "main.tf").write_text("# old\n")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "main.tf").write_text("# new\n")
    real = artifacts.snapshot
    taken: list[str] = []

    def snapshot_then_move(source_dir: str, *rest: Any) -> bytes:
        content = real(source_dir, *rest)
        taken.append(Path(source_dir).name)
        if len(taken) == 1:  # between the early snapshot and the transaction
            with sqlite3.connect(sqlite_path(rt)) as db:
                db.execute("UPDATE workspaces SET source_dir = ?", (str(tmp_path / "new"),))
        return content

    monkeypatch.setattr(artifacts, "snapshot", snapshot_then_move)
    t = tasks.submit(rt, "net", "plan")
    assert taken == ["old", "new"]
    with rt.sessions() as s:
        task = s.get(Task, t.id)
        assert task is not None
        version = s.get(ConfigurationVersion, task.config_version_id)
        assert version is not None
        assert version.content == real(str(tmp_path / "new"), 10**7, "net")
