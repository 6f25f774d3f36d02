"""Initial schema: workspaces, tasks, task_events.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scheduler.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the enums at this revision: a migration must not change
# meaning when the Python enums grow.
MODES = "'agent', 'k8s', 'local'"
TYPES = "'plan', 'plan_and_apply'"
STATUSES = (
    "'applied', 'apply_pending', 'apply_queued', 'applying', 'cancelled', "
    "'discarded', 'failed', 'pending', 'planning', 'success'"
)
ACTIVE = "type = 'plan_and_apply' AND status IN ('applying', 'apply_pending', 'apply_queued', 'planning')"

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "workspaces",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("execution_mode", sa.String(16), nullable=False),
        sa.Column("auto_apply", sa.Boolean(), nullable=False),
        sa.Column("source_dir", sa.Text()),
        sa.Column("agent_pool", sa.String(200)),
        sa.Column("locked_by", sa.String(200)),
        sa.Column("lock_reason", sa.Text()),
        sa.Column("locked_at", UTCDateTime()),
        sa.Column("task_seq", BigId, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_workspaces"),
        sa.UniqueConstraint("name", name="uq_workspaces_name"),
        sa.CheckConstraint(f"execution_mode IN ({MODES})", name="ck_workspaces_execution_mode"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("workspace_id", BigId, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("queue_seq", BigId, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime()),
        sa.Column("finished_at", UTCDateTime()),
        sa.Column("fence", BigId, nullable=False),
        sa.Column("executor_handle", sa.String(300)),
        sa.Column("changes_add", sa.Integer()),
        sa.Column("changes_change", sa.Integer()),
        sa.Column("changes_destroy", sa.Integer()),
        sa.Column("has_changes", sa.Boolean()),
        sa.Column("error", sa.Text()),
        sa.Column("created_by", sa.String(200)),
        sa.Column("message", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.ForeignKeyConstraint(
            ["workspace_id"], ["workspaces.id"], name="fk_tasks_workspace_id_workspaces"
        ),
        sa.CheckConstraint(f"type IN ({TYPES})", name="ck_tasks_type"),
        sa.CheckConstraint(f"status IN ({STATUSES})", name="ck_tasks_status"),
    )
    op.create_index("ix_tasks_workspace_id", "tasks", ["workspace_id"])
    op.create_index("ix_tasks_status_type", "tasks", ["status", "type"])
    op.create_index("uq_tasks_workspace_seq", "tasks", ["workspace_id", "queue_seq"], unique=True)
    op.create_index(
        "uq_tasks_one_active_apply",
        "tasks",
        ["workspace_id"],
        unique=True,
        postgresql_where=sa.text(ACTIVE),
        sqlite_where=sa.text(ACTIVE),
    )
    op.create_table(
        "task_events",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("task_id", BigId, nullable=False),
        sa.Column("from_status", sa.String(32)),
        sa.Column("to_status", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("fence", BigId, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_task_events"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_task_events_task_id_tasks"),
    )
    op.create_index("ix_task_events_task_id", "task_events", ["task_id"])


def downgrade() -> None:
    op.drop_table("task_events")
    op.drop_index("uq_tasks_one_active_apply", table_name="tasks")
    op.drop_index("uq_tasks_workspace_seq", table_name="tasks")
    op.drop_index("ix_tasks_status_type", table_name="tasks")
    op.drop_index("ix_tasks_workspace_id", table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("workspaces")
