"""Leases, heartbeats, cancel requests, timeouts, state versions, service beats.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scheduler.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("workspaces") as batch:
        batch.add_column(sa.Column("plan_timeout", sa.Float()))
        batch.add_column(sa.Column("apply_timeout", sa.Float()))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("status_changed_at", UTCDateTime()))
        batch.add_column(sa.Column("handoff_at", UTCDateTime()))
        batch.add_column(
            sa.Column("handoff_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("phase_started_at", UTCDateTime()))
        batch.add_column(sa.Column("heartbeat_at", UTCDateTime()))
        batch.add_column(sa.Column("lease_expires_at", UTCDateTime()))
        batch.add_column(
            sa.Column("plan_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("cancel_requested_at", UTCDateTime()))
        batch.add_column(sa.Column("cancel_requested_by", sa.String(200)))
        batch.add_column(
            sa.Column("cancel_force", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.create_index("ix_tasks_lease_expires_at", ["lease_expires_at"])
    # Phases running across the upgrade were started under a protocol with no
    # heartbeats: count their leases as lapsed now (a plan is re-claimed, an
    # apply fails "executor lost"), and unstarted ones as just handed off
    # (re-sent under the new message format after RUNQ_RESEND_AFTER).
    # Without this no sweep would ever select them.
    op.execute(
        "UPDATE tasks SET handoff_at = CURRENT_TIMESTAMP, handoff_attempts = 1, "
        "heartbeat_at = CASE WHEN executor_handle IS NULL THEN NULL ELSE CURRENT_TIMESTAMP END, "
        "lease_expires_at = CASE WHEN executor_handle IS NULL THEN NULL ELSE CURRENT_TIMESTAMP END "
        "WHERE status IN ('planning', 'applying')"
    )
    op.create_table(
        "state_versions",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("workspace_id", BigId, nullable=False),
        sa.Column("serial", sa.BigInteger(), nullable=False),
        sa.Column("lineage", sa.String(100), nullable=False),
        sa.Column("task_id", BigId),
        sa.Column("fence", BigId, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name="fk_state_versions_workspace_id_workspaces",
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_state_versions_task_id_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_state_versions"),
    )
    op.create_index("ix_state_versions_workspace_id_id", "state_versions", ["workspace_id", "id"])
    op.create_table(
        "service_beats",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("detail", sa.Text()),
        sa.PrimaryKeyConstraint("name", name="pk_service_beats"),
    )


def downgrade() -> None:
    op.drop_table("service_beats")
    op.drop_index("ix_state_versions_workspace_id_id", table_name="state_versions")
    op.drop_table("state_versions")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_lease_expires_at")
        for column in (
            "cancel_force",
            "cancel_requested_by",
            "cancel_requested_at",
            "plan_attempts",
            "lease_expires_at",
            "heartbeat_at",
            "phase_started_at",
            "handoff_attempts",
            "handoff_at",
            "status_changed_at",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("workspaces") as batch:
        batch.drop_column("apply_timeout")
        batch.drop_column("plan_timeout")
