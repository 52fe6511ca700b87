"""Repository functions for one-time challenges."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import ColumnElement, delete, or_, select, update
from sqlalchemy.orm import Session

from worker.core import Reason
from worker.store.models import Challenge

# 32 random bytes: 256 bits, well above the 128 the threat model needs, as URL-safe text.
_CHALLENGE_BYTES = 32


class Purpose(StrEnum):
    """What a challenge may be used for."""

    REGISTRATION = "registration"
    ASSERTION = "assertion"


def challenge_digest(challenge: str) -> bytes:
    """The stored form of a challenge: its SHA-256, so the table never holds usable values."""
    return hashlib.sha256(challenge.encode("utf-8")).digest()


def issue_challenge(
    session: Session, *, purpose: Purpose, key_id: str | None, ttl: timedelta, now: datetime
) -> tuple[str, datetime]:
    """Create and store a fresh challenge; return its text and when it expires."""
    challenge = secrets.token_urlsafe(_CHALLENGE_BYTES)
    expires_at = now + ttl
    session.add(
        Challenge(
            digest=challenge_digest(challenge),
            purpose=purpose.value,
            key_id=key_id,
            issued_at=now,
            expires_at=expires_at,
        )
    )
    return challenge, expires_at


def _matching(purpose: Purpose, key_id: str) -> list[ColumnElement[bool]]:
    return [
        Challenge.purpose == purpose.value,
        or_(Challenge.key_id.is_(None), Challenge.key_id == key_id),
    ]


def challenge_problem(
    session: Session, *, challenge: str, purpose: Purpose, key_id: str, now: datetime
) -> Reason | None:
    """Why this challenge cannot be used now (unknown, used or expired), or None.

    A read for early refusal and for explaining a failed consumption; it decides nothing.
    A challenge issued for another purpose or bound to another key counts as unknown.
    """
    row = session.scalar(
        select(Challenge).where(
            Challenge.digest == challenge_digest(challenge), *_matching(purpose, key_id)
        )
    )
    if row is None:
        return Reason.CHALLENGE_UNKNOWN
    if row.used_at is not None:
        return Reason.CHALLENGE_USED
    if row.expires_at <= now:
        return Reason.CHALLENGE_EXPIRED
    return None


def consume_challenge(
    session: Session,
    *,
    challenge: str,
    purpose: Purpose,
    key_id: str,
    job_id: str,
    now: datetime,
) -> Reason | None:
    """Mark the challenge used by ``job_id``, atomically and exactly once.

    One conditional UPDATE decides: of many jobs racing for one challenge, exactly one sees
    None; the others get ``challenge_used`` (or unknown/expired when that is the reason).
    """
    result = session.execute(
        update(Challenge)
        .where(
            Challenge.digest == challenge_digest(challenge),
            Challenge.used_at.is_(None),
            Challenge.expires_at > now,
            *_matching(purpose, key_id),
        )
        .values(used_at=now, used_by_job=job_id)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return None
    return (
        challenge_problem(session, challenge=challenge, purpose=purpose, key_id=key_id, now=now)
        or Reason.CHALLENGE_USED
    )


def purge_challenges(session: Session, *, expired_before: datetime) -> int:
    """Delete challenges that expired before the given instant; return how many."""
    result = session.execute(delete(Challenge).where(Challenge.expires_at < expired_before))
    return int(result.rowcount)  # type: ignore[attr-defined]
