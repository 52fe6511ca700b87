"""Device keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from worker.store.types import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_keys",
        sa.Column("key_id", sa.String(44), nullable=False),
        sa.Column("app_id", sa.String(300), nullable=False),
        sa.Column("environment", sa.String(16), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.Column("receipt", sa.LargeBinary(), nullable=False),
        sa.Column("attestation", sa.LargeBinary(), nullable=False),
        sa.Column("verified_at", UTCDateTime(), nullable=False),
        sa.Column("leaf_fingerprint", sa.LargeBinary(), nullable=False),
        sa.Column("intermediate_fingerprint", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_device_keys")),
    )
    op.create_index(op.f("ix_device_keys_app_id"), "device_keys", ["app_id"])
    op.create_index(op.f("ix_device_keys_verified_at"), "device_keys", ["verified_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_device_keys_verified_at"), table_name="device_keys")
    op.drop_index(op.f("ix_device_keys_app_id"), table_name="device_keys")
    op.drop_table("device_keys")
