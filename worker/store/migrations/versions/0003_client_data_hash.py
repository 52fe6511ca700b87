"""Keep each key's clientDataHash, so its attestation can be verified again later.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_keys") as batch:
        batch.add_column(sa.Column("client_data_hash", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_keys") as batch:
        batch.drop_column("client_data_hash")
