"""Bad input over raw broker messages: the Celery task functions called as a
worker would call them, with malformed, oversized, unknown or forged
arguments. Each is logged as rejected or skipped and changes nothing: no
row, no event, no broker message.

The Celery app's runtime is process-global: ``use_settings`` points it at
this test's database and Redis, which is also the broker (flushed per test).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from celery_app import tasks as celery_tasks
from celery_app.app import runtime, use_settings
from executors.outcome import MessageRejected
from scheduler import tasks
from scheduler.runtime import Runtime
from scheduler.settings import Settings
from scheduler.states import TaskStatus, TaskType
from tests.integration.helpers import (
    PLAN_NO_CHANGES,
    begin,
    claimed,
    end,
    everything,
    make_workspace,
    task_events,
)
from tests.runner_harness import write_script

S = TaskStatus
HUGE = "a" * (16 * 1024 * 1024)


@pytest.fixture
def worker(settings: Settings) -> Iterator[Runtime]:
    """This process as a runq worker: the global Celery runtime on the test's
    database and broker."""
    use_settings(settings)
    worker = runtime()
    yield worker
    worker.close()


def broker(rt: Runtime) -> list[tuple[bytes, int]]:
    """Every Redis list (the broker's queues) and its length."""
    r: Redis = rt.redis
    return sorted((k, r.llen(k)) for k in r.scan_iter() if r.type(k) == b"list")


def actions(caplog: Any) -> list[str]:
    return [a for r in caplog.records if (a := getattr(r, "action", None))]


@pytest.fixture
def world(rt: Runtime, ws: str, worker: Runtime, tmp_path: Path) -> dict[str, int]:
    """A pending plan, a pending plan+apply, a started plan, a finished plan."""
    pending_plan = tasks.submit(rt, ws, TaskType.PLAN).id
    make_workspace(rt, "other", tmp_path / "src2")
    pending_pa = tasks.submit(rt, "other", TaskType.PLAN_AND_APPLY).id
    started, f = claimed(rt, ws)
    assert begin(rt, started, f).accepted
    done, g = claimed(rt, ws)
    begin(rt, done, g)
    end(rt, done, g, PLAN_NO_CHANGES)
    return {
        "pending_plan": pending_plan,
        "pending_pa": pending_pa,
        "started": started,
        "started_fence": f,
        "done": done,
        "done_fence": g,
    }


def unchanged(
    rt: Runtime, caplog: Any, call: Any, *, rejects: bool = False
) -> list[logging.LogRecord]:
    """Run ``call``; check it wrote nothing and sent nothing; return its logs.
    ``rejects``: the task must fail with MessageRejected (Flower shows it as
    a FAILURE) saying what its log line says."""
    before = (everything(rt), broker(rt))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        if rejects:
            with pytest.raises(MessageRejected) as info:
                call()
            (line,) = [
                r for r in caplog.records if getattr(r, "action", None) == "message_rejected"
            ]
            assert str(info.value) == line.getMessage()
        else:
            call()
    assert (everything(rt), broker(rt)) == before
    return list(caplog.records)


def brief(value: object) -> str:
    return repr(value)[:30]


def rejected(logs: list[logging.LogRecord], prefix: str) -> str:
    """The one rejection logged, checked to be short and to promise no retry."""
    (line,) = [r for r in logs if getattr(r, "action", None) == "message_rejected"]
    text = line.getMessage()
    assert text.startswith(prefix), text[:200]
    assert len(text) < 200, "an oversized argument is not copied into the log"
    assert all(len(r.getMessage()) < 1000 for r in logs)
    assert not [r for r in logs if "reconciler" in r.getMessage()], "it can never succeed"
    return text


BAD_IDS = ["1", True, False, -1, 2**63, 10**30, 1.0, None, [1], {"id": 1}, HUGE]


def test_claim_plan_with_a_malformed_id_is_rejected(
    rt: Runtime, world: dict[str, int], caplog: Any
) -> None:
    for bad in BAD_IDS:
        logs = unchanged(rt, caplog, lambda bad=bad: celery_tasks.claim_plan.run(bad), rejects=True)
        text = rejected(logs, "claim_plan rejected: task id must be a non-negative integer")
        assert brief(bad)[:20] in text, text


def test_dispatch_with_a_malformed_workspace_is_rejected(
    rt: Runtime, world: dict[str, int], caplog: Any
) -> None:
    bad_names = [123, None, True, "", "has space", "../../etc/passwd", "x" * 201, "ws;rm"]
    for bad in [*bad_names, ["net"], HUGE]:
        logs = unchanged(rt, caplog, lambda bad=bad: celery_tasks.dispatch.run(bad), rejects=True)
        rejected(logs, "dispatch rejected: workspace must be a workspace name")
        assert rt.redis.keys("runq:*") == [], "no lock taken, no dirty mark left"


def test_execute_with_malformed_arguments_is_rejected(
    rt: Runtime, world: dict[str, int], caplog: Any
) -> None:
    started = world["started"]
    cases: list[tuple[object, object]] = [
        ("1", 1),
        (True, 1),
        (-1, 1),
        (2**63, 1),
        (HUGE, 1),
        (started, None),
        (started, "1"),
        (started, True),
        (started, -1),
        (started, 2**64),
        (started, 1.0),
        (started, HUGE),
    ]
    for task_id, fence in cases:
        logs = unchanged(
            rt, caplog, lambda t=task_id, f=fence: celery_tasks.execute.run(t, f), rejects=True
        )
        text = rejected(logs, "execute rejected: ")
        assert "must be a non-negative integer" in text, text


def test_execute_without_a_fence_argument_is_rejected(
    rt: Runtime, world: dict[str, int], caplog: Any
) -> None:
    # An old-style or hand-made message: the task id alone.
    logs = unchanged(rt, caplog, lambda: celery_tasks.execute.run(world["started"]), rejects=True)
    assert "message_rejected" in [getattr(r, "action", None) for r in logs]


def test_wrong_arity_fails_in_celery_and_changes_nothing(
    rt: Runtime, world: dict[str, int], caplog: Any
) -> None:
    results = []

    def calls() -> None:
        results.append(celery_tasks.claim_plan.apply(args=()))
        results.append(celery_tasks.dispatch.apply(args=("net", "extra")))
        results.append(celery_tasks.execute.apply(args=(1, 2, 3)))

    unchanged(rt, caplog, calls)
    assert all(r.failed() and isinstance(r.result, TypeError) for r in results)


def test_messages_for_unknown_or_forged_ids_are_skipped(
    rt: Runtime, world: dict[str, int], caplog: Any
) -> None:
    started, f = world["started"], world["started_fence"]
    calls: list[tuple[Any, tuple[object, ...], str, str]] = [
        (celery_tasks.claim_plan, (999_999,), "claim_skipped", "does not exist"),
        (celery_tasks.claim_plan, (world["pending_pa"],), "claim_skipped", "not a plan task"),
        (celery_tasks.claim_plan, (started,), "claim_skipped", "already planning"),
        (celery_tasks.claim_plan, (world["done"],), "claim_skipped", "already success"),
        (celery_tasks.dispatch, ("nope",), "dispatch_skipped", "no such workspace"),
        (celery_tasks.execute, (999_999, 1), "execute_skipped", "does not exist"),
        # The right task id under a stale, a future or a made-up fence.
        (celery_tasks.execute, (started, f - 1), "execute_skipped", "is stale"),
        (celery_tasks.execute, (started, f + 1), "execute_skipped", "is stale"),
        (celery_tasks.execute, (started, 2**62), "execute_skipped", "is stale"),
        # The current fence of a phase that runs already (a duplicate).
        (celery_tasks.execute, (started, f), "execute_skipped", "already started"),
        # A pending task (fence 0) or a finished one (its last fence): no phase.
        (celery_tasks.execute, (world["pending_plan"], 0), "execute_skipped", "no phase"),
        (celery_tasks.execute, (world["done"], world["done_fence"]), "execute_skipped", "no phase"),
    ]
    for task, args, action, why in calls:
        logs = unchanged(rt, caplog, lambda task=task, args=args: task.run(*args))
        lines = [r for r in logs if getattr(r, "action", None) == action]
        assert len(lines) == 1, (task.name, args, actions(caplog))
        assert why in lines[0].getMessage(), lines[0].getMessage()
        assert not [r for r in logs if r.levelno >= logging.ERROR], (task.name, args)
    assert tasks.get(rt, started).executor_handle == f"exec:{started}:{f}"


def test_a_plan_whose_source_directory_disappeared_runs_its_snapshot(
    rt: Runtime, src: Path, settings: Settings, tmp_path: Path, caplog: Any
) -> None:
    """The directory was snapshotted at submit: the worker needs it no more.
    (A fake terraform lists the working copy it runs in.)"""
    script, marks = write_script(tmp_path, 'ls -A > "$marks/files"\nexit 0\n')
    use_settings(settings.model_copy(update={"terraform_bin": str(script)}))
    worker = runtime()
    try:
        (src / "main.tf").write_text("# as submitted\n")
        make_workspace(rt, "gone", src)
        plan = tasks.submit(rt, "gone", TaskType.PLAN_AND_APPLY)
        celery_tasks.dispatch.run("gone")  # claims it and publishes execute(id, 1)
        assert tasks.get(rt, plan.id).fence == 1
        assert any(k == b"runq.runs" and n == 1 for k, n in broker(rt))
        shutil.rmtree(src)

        celery_tasks.execute.run(plan.id, 1)

        view = tasks.get(rt, plan.id)
        assert view.status is S.SUCCESS, view.error  # planned: no changes
        assert (marks / "files").read_text().split() == ["main.tf", "runq_override.tf"]
        ev = task_events(rt, plan.id)[-1]
        assert (ev.from_status, ev.to_status, ev.reason) == (
            S.PLANNING,
            S.SUCCESS,
            "plan succeeded",
        )
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        worker.close()
