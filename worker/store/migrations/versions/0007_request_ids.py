"""The request that submitted each job.

``verdicts.request_id`` holds the ``X-Request-ID`` of the HTTP request that submitted the job
(given by the caller or made by the producer), so that a verdict can be traced to the
request's log lines. Null for jobs queued otherwise, or recorded before it was kept.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("verdicts") as batch:
        batch.add_column(sa.Column("request_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("verdicts") as batch:
        batch.drop_column("request_id")
