"""Receipt states and the risk metric history.

``receipt_states`` holds per key the receipt the next exchange with Apple's fraud-metric
service sends, its dates, the risk metric and the last exchange's outcome; existing keys get
their attestation receipt, due at once. ``risk_metric_history`` keeps every reading.
``refresh_runs`` and ``refresh_results`` hold the runs of ``appattest receipts refresh`` and
their per-key outcomes. ``device_keys.registered_by`` names the API key whose registration
stored the key (only it may read the key's state); existing keys get it from their
registration's verdict.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from worker.store.types import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipt_states",
        sa.Column("key_id", sa.String(44), nullable=False),
        sa.Column("receipt", sa.LargeBinary(), nullable=False),
        sa.Column("receipt_type", sa.String(8), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=True),
        sa.Column("not_before", UTCDateTime(), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("risk_metric", sa.BigInteger(), nullable=True),
        sa.Column("measured_at", UTCDateTime(), nullable=True),
        sa.Column("refreshed_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(24), nullable=True),
        sa.Column("detail", sa.String(300), nullable=True),
        sa.Column("next_refresh_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_receipt_states")),
    )
    op.create_index(
        op.f("ix_receipt_states_next_refresh_at"), "receipt_states", ["next_refresh_at"]
    )
    op.create_table(
        "risk_metric_history",
        sa.Column("key_id", sa.String(44), nullable=False),
        sa.Column("measured_at", UTCDateTime(), nullable=False),
        sa.Column("risk_metric", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "measured_at", name=op.f("pk_risk_metric_history")),
    )
    op.execute(
        "INSERT INTO receipt_states (key_id, receipt) SELECT key_id, receipt FROM device_keys"
    )
    op.create_table(
        "refresh_runs",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("stopped_at", UTCDateTime(), nullable=True),
        sa.Column("stopped_reason", sa.String(300), nullable=True),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_refresh_runs")),
    )
    op.create_table(
        "refresh_results",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(44), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("outcome", sa.String(24), nullable=True),
        sa.Column("reason", sa.String(40), nullable=True),
        sa.Column("detail", sa.String(300), nullable=True),
        sa.Column("risk_metric", sa.BigInteger(), nullable=True),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "key_id", name=op.f("pk_refresh_results")),
    )
    op.create_index(op.f("ix_refresh_results_status"), "refresh_results", ["status"])
    with op.batch_alter_table("device_keys") as batch:
        batch.add_column(sa.Column("registered_by", sa.String(64), nullable=True))
    op.execute(
        "UPDATE device_keys SET registered_by = (SELECT MIN(v.submitted_by) FROM verdicts v"
        " WHERE v.key_id = device_keys.key_id AND v.kind = 'registration' AND v.ok = TRUE)"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_refresh_results_status"), table_name="refresh_results")
    op.drop_table("refresh_results")
    op.drop_table("refresh_runs")
    with op.batch_alter_table("device_keys") as batch:
        batch.drop_column("registered_by")
    op.drop_table("risk_metric_history")
    op.drop_index(op.f("ix_receipt_states_next_refresh_at"), table_name="receipt_states")
    op.drop_table("receipt_states")
