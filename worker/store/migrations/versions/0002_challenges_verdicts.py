"""Challenges and verdicts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from worker.store.types import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "challenges",
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(44), nullable=True),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.Column("used_by_job", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_challenges")),
    )
    op.create_index(op.f("ix_challenges_expires_at"), "challenges", ["expires_at"])
    op.create_table(
        "verdicts",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=True),
        sa.Column("app_id", sa.String(300), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(40), nullable=True),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("decided_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_verdicts")),
    )
    op.create_index(op.f("ix_verdicts_key_id"), "verdicts", ["key_id"])
    op.create_index(op.f("ix_verdicts_decided_at"), "verdicts", ["decided_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_verdicts_decided_at"), table_name="verdicts")
    op.drop_index(op.f("ix_verdicts_key_id"), table_name="verdicts")
    op.drop_table("verdicts")
    op.drop_index(op.f("ix_challenges_expires_at"), table_name="challenges")
    op.drop_table("challenges")
