"""Set-at-a-time repository functions, so that a batch of jobs costs a few statements.

Each function takes a session and plain values and works inside the caller's transaction.
The conditional updates keep the guarantees of their one-row counterparts: a challenge is
claimed once, a counter only moves forward; ``RETURNING`` tells exactly which rows changed.
PostgreSQL gets one statement per call (``UPDATE ... FROM (VALUES ...)``); SQLite, which has
no column aliases for VALUES and no network round trip to save, runs one statement per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, LargeBinary, String, column, or_, select, update, values
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.store.models import Challenge, DeviceKey, Verdict


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def get_verdicts(session: Session, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Recorded results of the given jobs that were decided before."""
    ids = list(job_ids)
    if not ids:
        return {}
    rows = session.execute(select(Verdict.job_id, Verdict.result).where(Verdict.job_id.in_(ids)))
    return {job_id: dict(result) for job_id, result in rows}


def get_challenges(session: Session, digests: Iterable[bytes]) -> dict[bytes, Challenge]:
    """Issued challenges by digest."""
    wanted = list(set(digests))
    if not wanted:
        return {}
    return {
        c.digest: c for c in session.scalars(select(Challenge).where(Challenge.digest.in_(wanted)))
    }


def get_keys(session: Session, key_ids: Iterable[str]) -> dict[str, DeviceKey]:
    """Stored keys by keyId."""
    wanted = list(set(key_ids))
    if not wanted:
        return {}
    return {
        k.key_id: k for k in session.scalars(select(DeviceKey).where(DeviceKey.key_id.in_(wanted)))
    }


@dataclass(frozen=True)
class Claim:
    """A job's claim on a challenge: its digest, purpose, the job's keyId and the job id."""

    digest: bytes
    purpose: str
    key_id: str
    job_id: str


def consume_challenges(session: Session, claims: Sequence[Claim], now: datetime) -> set[bytes]:
    """Mark each claimed challenge used by its job if it is issued for that purpose and key,
    unused and unexpired; return the digests consumed. Digests must be distinct."""
    if not claims:
        return set()
    if _is_postgresql(session):
        rows = values(
            column("digest", LargeBinary),
            column("purpose", String),
            column("key_id", String),
            column("job_id", String),
            name="claims",
        ).data([(c.digest, c.purpose, c.key_id, c.job_id) for c in claims])
        statement = (
            update(Challenge)
            .where(
                Challenge.digest == rows.c.digest,
                Challenge.used_at.is_(None),
                Challenge.expires_at > now,
                Challenge.purpose == rows.c.purpose,
                or_(Challenge.key_id.is_(None), Challenge.key_id == rows.c.key_id),
            )
            .values(used_at=now, used_by_job=rows.c.job_id)
            .returning(Challenge.digest)
            .execution_options(synchronize_session=False)
        )
        return set(session.scalars(statement))
    consumed: set[bytes] = set()
    for claim in claims:
        statement = (
            update(Challenge)
            .where(
                Challenge.digest == claim.digest,
                Challenge.used_at.is_(None),
                Challenge.expires_at > now,
                Challenge.purpose == claim.purpose,
                or_(Challenge.key_id.is_(None), Challenge.key_id == claim.key_id),
            )
            .values(used_at=now, used_by_job=claim.job_id)
            .returning(Challenge.digest)
            .execution_options(synchronize_session=False)
        )
        consumed.update(session.scalars(statement))
    return consumed


def advance_counters(session: Session, updates: Sequence[tuple[str, int]]) -> set[str]:
    """Set each key's counter to its new value only where that is above the stored one;
    return the keys advanced. Keys must be distinct."""
    if not updates:
        return set()
    if _is_postgresql(session):
        rows = values(
            column("key_id", String), column("counter", BigInteger), name="advances"
        ).data(list(updates))
        statement = (
            update(DeviceKey)
            .where(DeviceKey.key_id == rows.c.key_id, DeviceKey.counter < rows.c.counter)
            .values(counter=rows.c.counter)
            .returning(DeviceKey.key_id)
            .execution_options(synchronize_session=False)
        )
        return set(session.scalars(statement))
    advanced: set[str] = set()
    for key_id, counter in updates:
        statement = (
            update(DeviceKey)
            .where(DeviceKey.key_id == key_id, DeviceKey.counter < counter)
            .values(counter=counter)
            .returning(DeviceKey.key_id)
            .execution_options(synchronize_session=False)
        )
        advanced.update(session.scalars(statement))
    return advanced


def _insert_ignoring_conflicts(
    session: Session, model: type[Any], rows: Sequence[dict[str, Any]], returning: Any
) -> set[Any]:
    if not rows:
        return set()
    module = postgresql if _is_postgresql(session) else sqlite
    # One statement executed with many parameter sets: SQLAlchemy sends it as multi-row
    # INSERTs ("insertmanyvalues") from a compiled form it caches, where a statement with the
    # rows inlined would be compiled anew for every batch.
    statement = module.insert(model.__table__).on_conflict_do_nothing().returning(returning)
    result = session.connection().execute(statement, list(rows))
    return set(result.scalars())


def insert_keys(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert new keys (``device_keys`` column values) unless their keyId exists; return the
    keyIds inserted. KeyIds must be distinct."""
    return _insert_ignoring_conflicts(session, DeviceKey, rows, DeviceKey.key_id)


def record_verdicts(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert verdict rows unless their job already has one; return the job ids recorded."""
    return _insert_ignoring_conflicts(session, Verdict, rows, Verdict.job_id)
