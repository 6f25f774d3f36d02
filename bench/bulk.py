"""Bulk backlogs written straight into runq's tables (no submit per row).

:func:`template` makes one workspace and submits one plan through the public
API (a :class:`~scheduler.messages.RecordingPublisher` runtime), then cancels
it: its ``configuration_versions`` row is what every bulk workspace's
version copies. :func:`load` then writes, with ``INSERT ... SELECT`` over
``generate_series`` (one statement per table), what ``tasks.submit`` would
have: workspaces (``task_seq`` = tasks queued), one configuration version
each, pending tasks with ``queue_seq``, ``fence`` 0, ``created_at`` and
``config_version_id``, and each task's ``submitted`` event; then ``ANALYZE``.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from bench.harness import Bench, pg_url
from scheduler import tasks, workspaces
from scheduler.messages import RecordingPublisher
from scheduler.states import DispatchMode, TaskType


def template(bench: Bench, database_url: str) -> int:
    """The id of a configuration version made through the public API."""
    with bench.local_runtime(DispatchMode.NEW, RecordingPublisher(), database_url) as rt:
        workspaces.create(rt, "bulk-template", source_dir=bench.source_dir)
        task = tasks.submit(rt, "bulk-template", TaskType.PLAN)
        tasks.cancel(rt, task.id, reason="bulk template")
    with psycopg.connect(pg_url(database_url)) as conn:
        row = conn.execute(
            "SELECT config_version_id FROM tasks WHERE id = %s", (task.id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def load(
    database_url: str,
    prefix: str,
    n_workspaces: int,
    per_workspace: int,
    *,
    template_id: int,
    created_at: datetime,
    plan_share: float,
) -> None:
    """``n_workspaces`` auto-apply workspaces ``<prefix>-<i>`` with
    ``per_workspace`` pending tasks each; a task is a plan when its queue
    position falls in the first ``plan_share`` of every ten."""
    plans_of_ten = round(plan_share * 10)
    with psycopg.connect(pg_url(database_url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO workspaces (name, execution_mode, auto_apply, source_dir, task_seq,"
            " created_at) SELECT %(p)s || '-' || i, 'local', true, w.source_dir, %(k)s, %(at)s"
            " FROM generate_series(1, %(n)s) i, workspaces w WHERE w.name = 'bulk-template'",
            {"p": prefix, "k": per_workspace, "n": n_workspaces, "at": created_at},
        )
        like = {"like": f"{prefix}-%", "t": template_id, "at": created_at}
        conn.execute(
            "INSERT INTO configuration_versions (workspace_id, sha256, size, content, created_at)"
            " SELECT w.id, c.sha256, c.size, c.content, %(at)s FROM workspaces w,"
            " configuration_versions c WHERE w.name LIKE %(like)s AND c.id = %(t)s",
            like,
        )
        before = conn.execute("SELECT coalesce(max(id), 0) FROM tasks").fetchone()
        assert before is not None
        conn.execute(
            "INSERT INTO tasks (workspace_id, type, status, queue_seq, created_at, fence,"
            " handoff_attempts, plan_attempts, cancel_force, config_version_id, created_by)"
            " SELECT w.id, CASE WHEN (s - 1) %% 10 < %(plans)s THEN %(plan)s ELSE %(pa)s END,"
            " 'pending', s, %(at)s, 0, 0, 0, false, c.id, 'bench'"
            " FROM workspaces w JOIN configuration_versions c ON c.workspace_id = w.id,"
            " generate_series(1, %(k)s) s WHERE w.name LIKE %(like)s ORDER BY w.id, s",
            {
                **like,
                "plans": plans_of_ten,
                "plan": str(TaskType.PLAN),
                "pa": str(TaskType.PLAN_AND_APPLY),
                "k": per_workspace,
            },
        )
        conn.execute(
            "INSERT INTO task_events (task_id, from_status, to_status, actor, reason, fence, at)"
            " SELECT id, NULL, 'pending', 'bench', 'submitted', 0, created_at FROM tasks"
            " WHERE id > %s ORDER BY id",
            (before[0],),
        )
        conn.execute("ANALYZE")
