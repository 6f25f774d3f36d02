"""Configuration versions, plan artifacts, log chunks, agent pools, agents.

Runs need no shared disk after this: what a phase runs (the configuration
snapshot), what it reads (state) and what it leaves (the saved plan, its
output) are all stored here.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scheduler.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "configuration_versions",
        sa.Column("id", BigId, primary_key=True),
        sa.Column(
            "workspace_id",
            BigId,
            sa.ForeignKey(
                "workspaces.id", name="fk_configuration_versions_workspace_id_workspaces"
            ),
            nullable=False,
        ),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_configuration_versions"),
    )
    op.create_index(
        "uq_configuration_versions_workspace_sha",
        "configuration_versions",
        ["workspace_id", "sha256"],
        unique=True,
    )
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column(
                "config_version_id",
                BigId,
                sa.ForeignKey(
                    "configuration_versions.id",
                    name="fk_tasks_config_version_id_configuration_versions",
                ),
            )
        )
    with op.batch_alter_table("workspaces") as batch:
        batch.add_column(sa.Column("k8s", sa.Text()))
    op.create_table(
        "plan_artifacts",
        sa.Column(
            "task_id",
            BigId,
            sa.ForeignKey("tasks.id", name="fk_plan_artifacts_task_id_tasks"),
            nullable=False,
        ),
        sa.Column("fence", BigId, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", name="pk_plan_artifacts"),
    )
    op.create_table(
        "log_chunks",
        sa.Column("id", BigId, primary_key=True),
        sa.Column(
            "task_id",
            BigId,
            sa.ForeignKey("tasks.id", name="fk_log_chunks_task_id_tasks"),
            nullable=False,
        ),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("fence", BigId, nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_log_chunks"),
    )
    op.create_index(
        "uq_log_chunks_task_phase",
        "log_chunks",
        ["task_id", "phase", "fence", "offset"],
        unique=True,
    )
    op.create_table(
        "agent_pools",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("token", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_agent_pools"),
        sa.UniqueConstraint("name", name="uq_agent_pools_name"),
        sa.CheckConstraint("kind IN ('agent', 'k8s')", name="ck_agent_pools_kind"),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column(
            "pool_id",
            BigId,
            sa.ForeignKey("agent_pools.id", name="fk_agents_pool_id_agent_pools"),
            nullable=False,
        ),
        sa.Column("hostname", sa.String(300), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("running", sa.Text(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_agents"),
    )
    op.create_index("ix_agents_pool_id", "agents", ["pool_id"])


def downgrade() -> None:
    op.drop_index("ix_agents_pool_id", "agents")
    op.drop_table("agents")
    op.drop_table("agent_pools")
    op.drop_index("uq_log_chunks_task_phase", "log_chunks")
    op.drop_table("log_chunks")
    op.drop_table("plan_artifacts")
    with op.batch_alter_table("workspaces") as batch:
        batch.drop_column("k8s")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("config_version_id")
    op.drop_index("uq_configuration_versions_workspace_sha", "configuration_versions")
    op.drop_table("configuration_versions")
