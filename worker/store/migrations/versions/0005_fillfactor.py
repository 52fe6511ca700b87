"""PostgreSQL: leave room in the pages of the tables updated per job.

Every assertion moves a key's counter and consumes a challenge. With full pages each such
UPDATE writes the new row version to another page and a new entry into every index of the
table; with free space on the page PostgreSQL can keep the new version on the same page and
skip the indexes (a heap-only tuple update), about half the cost of the counter update when
measured here. Applies to pages written from now on; existing data gains the room when it is
rewritten (VACUUM FULL, or as rows move). SQLite has no such setting: nothing to do there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TABLES = ("device_keys", "challenges")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
