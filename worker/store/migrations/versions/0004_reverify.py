"""Re-verification runs and key revocation.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from worker.store.types import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_keys") as batch:
        batch.add_column(sa.Column("revoked_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("revoked_reason", sa.String(40), nullable=True))
        batch.add_column(sa.Column("revoked_by_run", sa.String(64), nullable=True))
    op.create_table(
        "reverify_runs",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("apply", sa.Boolean(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_reverify_runs")),
    )
    op.create_table(
        "reverify_results",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(44), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=True),
        sa.Column("reason", sa.String(40), nullable=True),
        sa.Column("detail", sa.String(500), nullable=True),
        sa.Column("app_id", sa.String(300), nullable=True),
        sa.Column("environment", sa.String(16), nullable=True),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "key_id", name=op.f("pk_reverify_results")),
    )
    op.create_index(op.f("ix_reverify_results_status"), "reverify_results", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_reverify_results_status"), table_name="reverify_results")
    op.drop_table("reverify_results")
    op.drop_table("reverify_runs")
    with op.batch_alter_table("device_keys") as batch:
        batch.drop_column("revoked_by_run")
        batch.drop_column("revoked_reason")
        batch.drop_column("revoked_at")
