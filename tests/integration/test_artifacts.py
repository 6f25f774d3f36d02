"""What runs need, stored by runq instead of on a worker's disk:
configuration versions (taken at submit), saved plans (sent with a plan's
Finished), output (LogWritten chunks), and the 0002 -> 0003 upgrade of tasks
submitted before configuration versions existed. No terraform here: the
executors are reports sent by hand or a FakeRunner."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update

from executors import archive
from executors.base import Finished, LogWritten, Reply
from executors.fake import FAKE_PLAN, FakeRunner
from scheduler import artifacts, bundles, dispatcher, local_runs, reports, tasks
from scheduler.db import make_engine, upgrade
from scheduler.errors import ConcurrentChange, InvalidInput
from scheduler.messages import RecordingPublisher
from scheduler.models import ConfigurationVersion, LogChunk, PlanArtifact, Task
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import Phase, TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_NO_CHANGES,
    PLAN_WITH_CHANGES,
    begin,
    claimed,
    counts,
    end,
    everything,
    is_stale,
    messages_of,
    rejected_reports,
    status,
)

PA = TaskType.PLAN_AND_APPLY


def config_rows(rt: Runtime) -> list[tuple[int, str, int]]:
    with rt.sessions() as s:
        rows = s.execute(
            select(
                ConfigurationVersion.id, ConfigurationVersion.sha256, ConfigurationVersion.size
            ).order_by(ConfigurationVersion.id)
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def config_id(rt: Runtime, task_id: int) -> int | None:
    with rt.sessions() as s:
        return s.scalar(select(Task.config_version_id).where(Task.id == task_id))


# ------------------------------------------------------------ configuration versions


def test_submit_snapshots_the_directory_and_stores_it_once(rt: Runtime, ws: str, src: Path) -> None:
    (src / "main.tf").write_text('output "x" {\n  value = 1\n}\n')
    a = tasks.submit(rt, ws, TaskType.PLAN)
    b = tasks.submit(rt, ws, PA)
    [(vid, sha, size)] = config_rows(rt)
    assert config_id(rt, a.id) == config_id(rt, b.id) == vid
    with rt.sessions() as s:
        version = s.get(ConfigurationVersion, vid)
        assert version is not None
        assert version.content == archive.pack_dir(src, rt.settings.max_config_bytes)
        assert (sha, size) == (archive.sha256(version.content), len(version.content))

    # Changed since: a new version for the next task; the queued ones keep theirs.
    (src / "main.tf").write_text('output "x" {\n  value = 2\n}\n')
    c = tasks.submit(rt, ws, TaskType.PLAN)
    assert len(config_rows(rt)) == 2
    assert config_id(rt, c.id) != vid
    assert config_id(rt, a.id) == config_id(rt, b.id) == vid
    # Changed back: the first version again, not a third copy.
    (src / "main.tf").write_text('output "x" {\n  value = 1\n}\n')
    d = tasks.submit(rt, ws, TaskType.PLAN)
    assert config_id(rt, d.id) == vid and len(config_rows(rt)) == 2


def refused_unchanged(rt: Runtime, ws: str) -> str:
    """Submit to ``ws``, which must be refused with nothing inserted or sent."""
    before, sent, rows = counts(rt), len(messages_of(rt)), config_rows(rt)
    with pytest.raises(InvalidInput) as refused:
        tasks.submit(rt, ws, PA)
    assert counts(rt) == before
    assert len(messages_of(rt)) == sent
    assert config_rows(rt) == rows
    return str(refused.value)


def test_an_oversized_directory_is_refused_at_submit(
    rt: Runtime, ws: str, src: Path, tune: Callable[..., Runtime]
) -> None:
    small = tune(max_config_bytes=4096)
    (src / "main.tf").write_text("# fine\n")
    assert tasks.submit(small, ws, TaskType.PLAN).status is TaskStatus.PENDING
    (src / "blob.bin").write_bytes(os.urandom(8192))  # does not compress
    message = refused_unchanged(small, ws)
    assert message.startswith("cannot snapshot workspace 'net': configuration directory")
    assert "bytes compressed, over the limit of 4096 bytes" in message
    assert "RUNQ_MAX_CONFIG_BYTES" in message
    # Far over it before compression: refused without compressing it all.
    (src / "blob.bin").write_bytes(b"\0" * 64 * 1024)
    message = refused_unchanged(small, ws)
    assert "before compression, far over the limit of 4096 bytes" in message
    assert "RUNQ_MAX_CONFIG_BYTES" in message
    # The default limit takes it.
    assert tasks.submit(rt, ws, TaskType.PLAN).status is TaskStatus.PENDING


def test_a_symlink_out_of_the_directory_is_refused_at_submit(
    rt: Runtime, ws: str, src: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the executor\n")
    (src / "creds.tf").symlink_to(secret)
    message = refused_unchanged(rt, ws)
    assert "creds.tf is a symlink to" in message and "outside the configuration" in message


def test_a_directory_gone_since_the_workspace_was_made_is_refused_at_submit(
    rt: Runtime, ws: str, src: Path
) -> None:
    src.rmdir()
    message = refused_unchanged(rt, ws)
    assert message == (
        f"cannot snapshot workspace 'net': configuration directory {str(src)!r} does not exist"
    )


def test_the_bundle_carries_the_submitted_snapshot(rt: Runtime, ws: str, src: Path) -> None:
    (src / "main.tf").write_text("# as submitted\n")
    tid, f = claimed(rt, ws, PA)
    (src / "main.tf").write_text("# edited after submit\n")
    with rt.transaction() as s:
        bundle = bundles.build(s, rt.settings, tid, f)
    with rt.sessions() as s:
        version = s.get(ConfigurationVersion, config_id(rt, tid))
        assert version is not None
    assert bundle.config == version.content
    assert bundle.handoff.config_sha256 == version.sha256
    out = src.parent / "unpacked"
    archive.unpack(bundle.config, out)
    assert (out / "main.tf").read_text() == "# as submitted\n"
    assert (bundle.state, bundle.plan) == (None, None)


# ------------------------------------------------------------ the 0002 -> 0003 upgrade


def test_a_task_submitted_before_configuration_versions_is_snapshotted_at_bundle_build(
    rt: Runtime, ws: str, src: Path
) -> None:
    """As a task left pending by an older runq: no configuration version.
    Its first bundle snapshots the directory, and its apply runs the same."""
    (src / "main.tf").write_text("# before the upgrade\n")
    tid, f = claimed(rt, ws, PA)
    with rt.transaction() as s:
        s.execute(update(Task).where(Task.id == tid).values(config_version_id=None))
        s.execute(text("DELETE FROM configuration_versions"))
    (src / "main.tf").write_text("# at the plan\n")

    with rt.transaction() as s:
        plan = bundles.build(s, rt.settings, tid, f)
    vid = config_id(rt, tid)
    assert vid is not None and len(config_rows(rt)) == 1
    out = src.parent / "plan-copy"
    archive.unpack(plan.config, out)
    assert (out / "main.tf").read_text() == "# at the plan\n"

    # The plan runs (a FakeRunner-like report) and is confirmed; the
    # directory changes again; the apply gets the plan's snapshot.
    assert begin(rt, tid, f).accepted
    assert end(rt, tid, f, PLAN_WITH_CHANGES).accepted
    (src / "main.tf").write_text("# after the plan\n")
    tasks.confirm(rt, tid)
    decision = dispatcher.dispatch(rt, ws)
    assert decision.claimed and decision.fence is not None
    with rt.transaction() as s:
        apply = bundles.build(s, rt.settings, tid, decision.fence)
    assert apply.config == plan.config
    assert apply.handoff.config_sha256 == plan.handoff.config_sha256
    assert apply.plan == FAKE_PLAN
    assert config_id(rt, tid) == vid and len(config_rows(rt)) == 1


def test_upgrading_a_0002_database_keeps_pending_tasks_runnable(
    tmp_path: Path, redis_url: str
) -> None:
    """A real 0002 database with a pending task, upgraded to head: the task
    has no configuration version, and gets one when its plan is claimed and
    its bundle built."""
    src = tmp_path / "cfg"
    src.mkdir()
    (src / "main.tf").write_text("# from the old days\n")
    db = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{db}")
    try:
        upgrade(engine, "0002")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO workspaces"
                    " (name, source_dir, execution_mode, auto_apply, task_seq, created_at)"
                    " VALUES ('old', :src, 'local', false, 1, CURRENT_TIMESTAMP)"
                ),
                {"src": str(src)},
            )
            conn.execute(
                text(
                    "INSERT INTO tasks (workspace_id, type, status, queue_seq, fence, created_at)"
                    " VALUES (1, 'plan_and_apply', 'pending', 1, 0, CURRENT_TIMESTAMP)"
                )
            )
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT config_version_id FROM tasks")) is None
    finally:
        engine.dispose()

    rt = Runtime(
        Settings(database_url=f"sqlite:///{db}", redis_url=redis_url, data_dir=tmp_path / "d"),
        RecordingPublisher(),
        actor="test",
    )
    try:
        decision = dispatcher.dispatch(rt, "old")
        assert decision.claimed and decision.task_id == 1 and decision.fence is not None
        with rt.transaction() as s:
            bundle = bundles.build(s, rt.settings, 1, decision.fence)
        assert bundle.config == archive.pack_dir(src, rt.settings.max_config_bytes)
        assert config_id(rt, 1) is not None
        [(_, sha, _)] = config_rows(rt)
        assert bundle.handoff.config_sha256 == sha
    finally:
        rt.close()


# ------------------------------------------------------------ saved plans


def plan_row(rt: Runtime, task_id: int) -> tuple[int, str, int, bytes] | None:
    with rt.sessions() as s:
        row = s.get(PlanArtifact, task_id)
        return None if row is None else (row.fence, row.sha256, row.size, row.content)


def test_a_plans_saved_plan_is_stored_with_its_transition(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws, PA)
    assert begin(rt, tid, f).accepted
    assert end(rt, tid, f, PLAN_WITH_CHANGES).accepted
    assert status(rt, tid) is TaskStatus.APPLY_PENDING
    assert plan_row(rt, tid) == (f, archive.sha256(FAKE_PLAN), len(FAKE_PLAN), FAKE_PLAN)


def test_a_plan_that_sends_no_saved_plan_fails_clearly(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws, PA)
    assert begin(rt, tid, f).accepted
    assert reports.accept(rt, Finished(tid, f, Phase.PLAN, PLAN_WITH_CHANGES)).accepted
    view = tasks.get(rt, tid)
    assert view.status is TaskStatus.FAILED
    assert view.error == "the executor sent no saved plan to apply"
    assert plan_row(rt, tid) is None


def test_a_saved_plan_over_the_limit_fails_the_plan(
    rt: Runtime, ws: str, tune: Callable[..., Runtime]
) -> None:
    small = tune(max_artifact_bytes=16)
    tid, f = claimed(small, ws, PA)
    assert begin(small, tid, f).accepted
    report = Finished(tid, f, Phase.PLAN, PLAN_WITH_CHANGES, plan=b"x" * 17)
    assert reports.accept(small, report).accepted
    view = tasks.get(small, tid)
    assert view.status is TaskStatus.FAILED
    assert view.error is not None and "17 bytes, over the limit of 16" in view.error
    assert plan_row(small, tid) is None


@pytest.mark.parametrize("task_type", [TaskType.PLAN, PA])
def test_no_saved_plan_is_kept_when_nothing_will_apply_it(
    rt: Runtime, ws: str, task_type: TaskType
) -> None:
    tid, f = claimed(rt, ws, task_type)
    assert begin(rt, tid, f).accepted
    result = PLAN_WITH_CHANGES if task_type is TaskType.PLAN else PLAN_NO_CHANGES
    # (A speculative plan with changes: its executor may still send one.)
    assert reports.accept(rt, Finished(tid, f, Phase.PLAN, result, plan=FAKE_PLAN)).accepted
    assert status(rt, tid) is TaskStatus.SUCCESS
    assert plan_row(rt, tid) is None


def test_an_apply_without_its_saved_plan_is_not_run(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws, PA)
    assert begin(rt, tid, f).accepted
    assert end(rt, tid, f, PLAN_WITH_CHANGES).accepted
    tasks.confirm(rt, tid)
    decision = dispatcher.dispatch(rt, ws)
    assert decision.claimed and decision.fence is not None
    with rt.transaction() as s:
        s.execute(text("DELETE FROM plan_artifacts"))
    with pytest.raises(ConcurrentChange, match="no saved plan"), rt.transaction() as s:
        bundles.build(s, rt.settings, tid, decision.fence)
    # A worker given it fails it at once, saying why (not after every re-send).
    runner = FakeRunner()
    note = local_runs.execute(rt, tid, decision.fence, runner)
    assert isinstance(note, local_runs.Note) and note.failed, note
    assert runner.ran == []
    view = tasks.get(rt, tid)
    assert view.status is TaskStatus.FAILED
    assert view.error == f"cannot run the apply: task {tid} has no saved plan to apply"


def test_a_pre_upgrade_task_whose_directory_is_gone_fails_clearly(
    rt: Runtime, ws: str, src: Path
) -> None:
    tid, f = claimed(rt, ws, PA)
    with rt.transaction() as s:  # queued before configuration versions
        s.execute(update(Task).where(Task.id == tid).values(config_version_id=None))
    src.rmdir()
    runner = FakeRunner()
    note = local_runs.execute(rt, tid, f, runner)
    assert isinstance(note, local_runs.Note) and note.failed, note
    assert runner.ran == []
    view = tasks.get(rt, tid)
    assert view.status is TaskStatus.FAILED
    assert view.error == (
        "cannot run the plan: cannot snapshot workspace 'net': "
        f"configuration directory {str(src)!r} does not exist"
    )
    assert config_id(rt, tid) is None


# ------------------------------------------------------------ log chunks


def chunks(rt: Runtime, task_id: int) -> list[tuple[str, int, int, bytes]]:
    with rt.sessions() as s:
        rows = s.execute(
            select(LogChunk.phase, LogChunk.fence, LogChunk.offset, LogChunk.content)
            .where(LogChunk.task_id == task_id)
            .order_by(LogChunk.id)
        ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def send(rt: Runtime, tid: int, fence: int, offset: int, data: bytes) -> Reply:
    return reports.accept(rt, LogWritten(tid, fence, Phase.PLAN, offset, data))


def output(rt: Runtime, task_id: int, phase: str | None = "plan") -> bytes:
    with rt.sessions() as s:
        return artifacts.log_text(s, task_id, phase)


def test_log_chunks_are_stored_once_per_offset(rt: Runtime, ws: str) -> None:
    tid, f = claimed(rt, ws)
    assert begin(rt, tid, f).accepted
    assert send(rt, tid, f, 0, b"$ terraform init\n") == Reply.ok()
    # A re-sent chunk (its reply was lost): accepted, stored once.
    assert send(rt, tid, f, 0, b"$ terraform init\n") == Reply.ok()
    assert send(rt, tid, f, 17, b"Initializing...\n") == Reply.ok()
    assert send(rt, tid, f, 17, b"Initializing...\n") == Reply.ok()
    assert [(p, fe, o) for p, fe, o, _ in chunks(rt, tid)] == [("plan", f, 0), ("plan", f, 17)]
    assert output(rt, tid) == b"$ terraform init\nInitializing...\n"
    assert output(rt, tid, "apply") == b""
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(LogChunk)) == 2


def test_log_chunks_under_a_stale_fence_are_rejected(
    rt: Runtime, ws: str, caplog: pytest.LogCaptureFixture
) -> None:
    tid, f = claimed(rt, ws)
    assert begin(rt, tid, f).accepted
    assert send(rt, tid, f, 0, b"live\n").accepted
    before = everything(rt)
    caplog.set_level(logging.WARNING, logger="scheduler.reports")
    assert is_stale(send(rt, tid, f - 1, 0, b"from a superseded executor\n"))
    assert is_stale(send(rt, tid, f + 1, 5, b"forged\n"))
    assert is_stale(send(rt, 999_999, 1, 0, b"no such task\n"))
    # The current fence, but not the phase it runs.
    wrong = LogWritten(tid, f, Phase.APPLY, 5, b"under the wrong phase\n")
    assert is_stale(reports.accept(rt, wrong))
    assert everything(rt) == before
    assert chunks(rt, tid) == [("plan", f, 0, b"live\n")]
    assert len(rejected_reports(caplog.records)) == 4
    # After the phase ended, nothing more is added to its output.
    assert end(rt, tid, f, PLAN_NO_CHANGES).accepted
    assert is_stale(send(rt, tid, f, 5, b"late\n"))
    assert output(rt, tid) == b"live\n"


def test_log_text_is_the_latest_claim_of_each_phase(rt: Runtime, ws: str) -> None:
    """A plan that ran twice (its first executor lost) shows the second run's
    output only; chunks arriving out of order are put in order."""
    tid, f = claimed(rt, ws, PA)
    assert begin(rt, tid, f).accepted
    assert send(rt, tid, f, 0, b"first attempt\n").accepted
    with rt.transaction() as s:  # re-claimed, as the reconciler does
        s.execute(update(Task).where(Task.id == tid).values(fence=f + 1, executor_handle=None))
    g = f + 1
    assert begin(rt, tid, g).accepted
    assert send(rt, tid, g, 7, b"attempt\n").accepted
    assert send(rt, tid, g, 0, b"second ").accepted
    assert output(rt, tid) == b"second attempt\n"
    assert output(rt, tid, None) == b"second attempt\n"
