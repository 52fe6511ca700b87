"""Set-at-a-time repository functions, so that a batch of jobs costs a few statements.

Each function takes a session and plain values and works inside the caller's transaction.
The conditional updates keep the guarantees of their one-row counterparts: a challenge is
claimed once, a counter only moves forward; ``RETURNING`` tells exactly which rows changed.
PostgreSQL gets one statement per call (``UPDATE ... FROM unnest(arrays)``); SQLite, which has
no arrays and no network round trip to save, runs one statement per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.store.models import Challenge, DeviceKey, Verdict

# PostgreSQL: one statement of fixed text over array parameters, whatever the batch size, so
# neither SQLAlchemy nor the driver parses or compiles anything per batch.
_CONSUME_PG = text(
    """
    UPDATE challenges SET used_at = :now, used_by_job = claims.job_id
    FROM unnest(
        CAST(:digests AS bytea[]), CAST(:purposes AS text[]),
        CAST(:key_ids AS text[]), CAST(:job_ids AS text[])
    ) AS claims(digest, purpose, key_id, job_id)
    WHERE challenges.digest = claims.digest
      AND challenges.used_at IS NULL
      AND challenges.expires_at > :now
      AND challenges.purpose = claims.purpose
      AND (challenges.key_id IS NULL OR challenges.key_id = claims.key_id)
    RETURNING challenges.digest
    """
)
_ADVANCE_PG = text(
    """
    UPDATE device_keys SET counter = advances.counter
    FROM unnest(CAST(:key_ids AS text[]), CAST(:counters AS bigint[]))
        AS advances(key_id, counter)
    WHERE device_keys.key_id = advances.key_id AND device_keys.counter < advances.counter
    RETURNING device_keys.key_id
    """
)


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
        rows = session.execute(
            _CONSUME_PG,
            {
                "digests": [c.digest for c in claims],
                "purposes": [c.purpose for c in claims],
                "key_ids": [c.key_id for c in claims],
                "job_ids": [c.job_id for c in claims],
                "now": now,
            },
        )
        return {bytes(digest) for (digest,) in rows}
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
        rows = session.execute(
            _ADVANCE_PG,
            {"key_ids": [k for k, _ in updates], "counters": [c for _, c in updates]},
        )
        return {key_id for (key_id,) in rows}
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
