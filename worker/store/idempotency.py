"""Idempotency keys: the first job a caller's key created, so that a retry returns it.

A claim inserts ``(owner, key hash) -> (request hash, job id)`` unless the pair is held by a
live (unexpired) row; an expired row is replaced. Conflicts are decided by the primary key in
one statement, so two concurrent requests with the same key cannot both create a job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.store.models import IdempotencyKey


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """A job about to be created under an idempotency key."""

    owner: str
    key_hash: bytes
    request_hash: bytes
    job_id: str


@dataclass(frozen=True, slots=True)
class HeldKey:
    """The job an idempotency key already names, and the request it was created for."""

    request_hash: bytes
    job_id: str
    created_at: datetime


def claim(
    session: Session, claims: Sequence[IdempotencyClaim], *, now: datetime, expired_before: datetime
) -> dict[tuple[str, bytes], HeldKey]:
    """Record each claim whose key is free (never used, or its row expired before
    ``expired_before``); return, for the claims whose key is held, what holds it.
    The (owner, key hash) pairs must be distinct."""
    if not claims:
        return {}
    pairs = [(c.owner, c.key_hash) for c in claims]
    key = tuple_(IdempotencyKey.owner, IdempotencyKey.key_hash)
    session.execute(
        delete(IdempotencyKey).where(key.in_(pairs), IdempotencyKey.created_at < expired_before)
    )
    rows = [
        {
            "owner": c.owner,
            "key_hash": c.key_hash,
            "request_hash": c.request_hash,
            "job_id": c.job_id,
            "created_at": now,
        }
        for c in claims
    ]
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(IdempotencyKey)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.owner, IdempotencyKey.key_hash)
    )
    inserted = {(owner, bytes(key_hash)) for owner, key_hash in session.execute(statement)}
    held_pairs = [pair for pair in pairs if pair not in inserted]
    if not held_pairs:
        return {}
    found = session.execute(
        select(
            IdempotencyKey.owner,
            IdempotencyKey.key_hash,
            IdempotencyKey.request_hash,
            IdempotencyKey.job_id,
            IdempotencyKey.created_at,
        ).where(key.in_(held_pairs))
    )
    return {
        (owner, bytes(key_hash)): HeldKey(bytes(request_hash), job_id, created_at)
        for owner, key_hash, request_hash, job_id, created_at in found
    }


def replace_job(
    session: Session,
    owner: str,
    key_hash: bytes,
    *,
    old_job_id: str,
    new_job_id: str,
    now: datetime,
) -> bool:
    """Point a held key at a new job, if it still names ``old_job_id`` (a job that was lost
    before any worker saw it); True when this call moved it."""
    result = session.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.owner == owner,
            IdempotencyKey.key_hash == key_hash,
            IdempotencyKey.job_id == old_job_id,
        )
        .values(job_id=new_job_id, created_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def held_job(session: Session, owner: str, key_hash: bytes) -> str | None:
    """The job a key names now (None when it names none)."""
    return session.execute(
        select(IdempotencyKey.job_id).where(
            IdempotencyKey.owner == owner, IdempotencyKey.key_hash == key_hash
        )
    ).scalar_one_or_none()
