"""Repository functions for one-time challenges."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, cast

from sqlalchemy import Connection, Table, insert
from sqlalchemy.orm import Session

from worker.store.models import Challenge

# 32 random bytes: 256 bits, well above the 128 the threat model needs, as URL-safe text.
_CHALLENGE_BYTES = 32

# One statement for every write of new challenges: SQLAlchemy caches its compiled form, and a
# list of rows runs as one executemany (psycopg pipelines it: one round trip for them all).
_INSERT: Final = insert(cast(Table, Challenge.__table__))


class Purpose(StrEnum):
    """What a challenge may be used for."""

    REGISTRATION = "registration"
    ASSERTION = "assertion"


def challenge_digest(challenge: str) -> bytes:
    """The stored form of a challenge: its SHA-256, so the table never holds usable values."""
    return hashlib.sha256(challenge.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class NewChallenge:
    """A fresh challenge not yet stored: its text (for the caller only), when it expires, and
    the row that stores it (its digest, never the text)."""

    challenge: str
    expires_at: datetime
    row: dict[str, Any]


def new_challenge(
    *, purpose: Purpose, key_id: str | None, ttl: timedelta, now: datetime
) -> NewChallenge:
    """Draw a fresh challenge for ``purpose`` (only ``key_id`` may use it, when given), valid
    from ``now`` for ``ttl``. Nothing is stored: see ``store_challenges``."""
    challenge = secrets.token_urlsafe(_CHALLENGE_BYTES)
    expires_at = now + ttl
    row = {
        "digest": challenge_digest(challenge),
        "purpose": purpose.value,
        "key_id": key_id,
        "issued_at": now,
        "expires_at": expires_at,
    }
    return NewChallenge(challenge=challenge, expires_at=expires_at, row=row)


def store_challenges(connection: Connection | Session, challenges: Sequence[NewChallenge]) -> None:
    """Insert the rows of ``challenges`` in one statement, in the caller's transaction."""
    if challenges:
        connection.execute(_INSERT, [issued.row for issued in challenges])
