"""Repository functions for one-time challenges."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy.orm import Session

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
