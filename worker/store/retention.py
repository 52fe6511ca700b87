"""Retention: deleting the rows the service no longer needs, in bounded batches.

Three tables grow with traffic and are purged here:

- ``challenges`` that expired more than a grace period ago (within it, a job still queued
  with one is told ``challenge_expired`` rather than ``challenge_unknown``);
- ``verdicts`` decided before the retention cutoff, except a verdict that an unexpired
  idempotency key still names (a retry with that key answers with it);
- ``idempotency_keys`` older than their time to live (the producer treats them as free
  already).

Device keys are never purged. Each batch is one short transaction deleting at most
``batch_size`` rows picked by an indexed condition, so a purge running beside busy workers
never holds long locks; running two purges at once is harmless (a row is deleted once), and
on PostgreSQL an advisory lock keeps it to one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import ColumnElement, Connection, delete, exists, func, select, text, tuple_
from sqlalchemy.orm import Session, sessionmaker

from worker.store.models import Challenge, IdempotencyKey, Verdict

# The PostgreSQL advisory lock a purge holds (an arbitrary constant of this service).
PURGE_LOCK_ID: Final = 0x61707074_70757267  # "appt" "purg"


@dataclass(frozen=True)
class Cutoffs:
    """What is old enough to go: rows before these instants (None keeps the table's rows)."""

    challenges_expired_before: datetime
    verdicts_decided_before: datetime | None
    idempotency_created_before: datetime

    @classmethod
    def at(
        cls,
        now: datetime,
        *,
        challenge_grace: timedelta,
        verdict_retention: timedelta | None,
        idempotency_ttl: timedelta,
    ) -> Cutoffs:
        """The cutoffs as of ``now``; ``verdict_retention`` None keeps every verdict."""
        return cls(
            challenges_expired_before=now - challenge_grace,
            verdicts_decided_before=None if verdict_retention is None else now - verdict_retention,
            idempotency_created_before=now - idempotency_ttl,
        )


@dataclass(frozen=True)
class PurgeCounts:
    """Rows deleted (or, for a dry run, that would be) per table."""

    challenges: int = 0
    verdicts: int = 0
    idempotency_keys: int = 0

    def __add__(self, other: PurgeCounts) -> PurgeCounts:
        return PurgeCounts(
            *(getattr(self, f.name) + getattr(other, f.name) for f in fields(PurgeCounts))
        )

    def items(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(PurgeCounts)]


def _challenge_condition(cutoffs: Cutoffs) -> ColumnElement[bool]:
    return Challenge.expires_at < cutoffs.challenges_expired_before


def _verdict_condition(cutoffs: Cutoffs) -> ColumnElement[bool]:
    assert cutoffs.verdicts_decided_before is not None
    still_named = exists().where(
        IdempotencyKey.job_id == Verdict.job_id,
        IdempotencyKey.created_at >= cutoffs.idempotency_created_before,
    )
    return (Verdict.decided_at < cutoffs.verdicts_decided_before) & ~still_named


def _key_condition(cutoffs: Cutoffs) -> ColumnElement[bool]:
    return IdempotencyKey.created_at < cutoffs.idempotency_created_before


def count_purgeable(session: Session, cutoffs: Cutoffs) -> PurgeCounts:
    """How many rows a purge with these cutoffs would delete now (for ``--dry-run``)."""

    def count(condition: ColumnElement[bool], table: type[object]) -> int:
        return int(session.scalar(select(func.count()).select_from(table).where(condition)) or 0)

    return PurgeCounts(
        challenges=count(_challenge_condition(cutoffs), Challenge),
        verdicts=0
        if cutoffs.verdicts_decided_before is None
        else count(_verdict_condition(cutoffs), Verdict),
        idempotency_keys=count(_key_condition(cutoffs), IdempotencyKey),
    )


def _purge_batch(session: Session, table: str, cutoffs: Cutoffs, limit: int) -> int:
    """Delete at most ``limit`` purgeable rows of ``table`` (a field of ``PurgeCounts``) in
    ``session``'s transaction; return how many."""
    if table == "challenges":
        digests = select(Challenge.digest).where(_challenge_condition(cutoffs)).limit(limit)
        statement = delete(Challenge).where(Challenge.digest.in_(digests.scalar_subquery()))
    elif table == "verdicts":
        if cutoffs.verdicts_decided_before is None:
            return 0
        picked = select(Verdict.job_id).where(_verdict_condition(cutoffs)).limit(limit)
        statement = delete(Verdict).where(Verdict.job_id.in_(picked.scalar_subquery()))
    elif table == "idempotency_keys":
        pair = tuple_(IdempotencyKey.owner, IdempotencyKey.key_hash)
        chosen = (
            select(IdempotencyKey.owner, IdempotencyKey.key_hash)
            .where(_key_condition(cutoffs))
            .limit(limit)
        )
        statement = delete(IdempotencyKey).where(pair.in_(chosen))
    else:
        raise ValueError(f"no purge for table {table!r}")
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]


def purge(
    sessions: sessionmaker[Session],
    cutoffs: Cutoffs,
    *,
    batch_size: int,
    on_batch: Callable[[str, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PurgeCounts:
    """Delete every purgeable row, ``batch_size`` rows per transaction; ``on_batch`` hears
    (table, rows) after each batch. Rows that turn purgeable meanwhile may be left for the
    next purge. Returns the counts deleted. Stops between batches once ``should_stop()``."""
    done: dict[str, int] = {}
    for table in (f.name for f in fields(PurgeCounts)):
        done[table] = 0
        while not should_stop():
            with sessions() as session, session.begin():
                deleted = _purge_batch(session, table, cutoffs, batch_size)
            done[table] += deleted
            if on_batch is not None and deleted:
                on_batch(table, deleted)
            if deleted < batch_size:
                break
    return PurgeCounts(**done)


@contextmanager
def purge_lock(connection: Connection) -> Iterator[bool]:
    """Hold the purge's advisory lock on ``connection`` for the block (PostgreSQL); yields
    whether it was taken (always True on a database without advisory locks). It is released
    at the end, since a pooled connection outlives the block."""
    if connection.dialect.name != "postgresql":
        yield True
        return
    taken = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:id)"), {"id": PURGE_LOCK_ID}))
    connection.commit()
    try:
        yield taken
    finally:
        if taken:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": PURGE_LOCK_ID})
            connection.commit()
