"""Repository functions for device keys. Each takes a session and plain values."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from worker.store._insert import insert_if_absent
from worker.store.models import DeviceKey


def get_key(session: Session, key_id: str) -> DeviceKey | None:
    """The stored key with this keyId, if any."""
    return session.get(DeviceKey, key_id)


def key_exists(session: Session, key_id: str) -> bool:
    """Whether a key with this keyId is stored."""
    return bool(session.scalar(select(exists().where(DeviceKey.key_id == key_id))))


def insert_key(
    session: Session,
    *,
    key_id: str,
    app_id: str,
    environment: str,
    public_key: bytes,
    receipt: bytes,
    attestation: bytes,
    client_data_hash: bytes,
    verified_at: datetime,
    leaf_fingerprint: bytes,
    intermediate_fingerprint: bytes,
) -> bool:
    """Store a newly attested key with counter 0, inside the caller's transaction.

    Returns False, without raising or spoiling the transaction, when the keyId is already
    stored, including when a concurrent registration of the same key won the race.
    """
    return insert_if_absent(
        session,
        DeviceKey,
        {
            "key_id": key_id,
            "app_id": app_id,
            "environment": environment,
            "public_key": public_key,
            "counter": 0,
            "receipt": receipt,
            "attestation": attestation,
            "client_data_hash": client_data_hash,
            "verified_at": verified_at,
            "leaf_fingerprint": leaf_fingerprint,
            "intermediate_fingerprint": intermediate_fingerprint,
        },
    )


def advance_counter(session: Session, key_id: str, new_counter: int) -> bool:
    """Set the counter to ``new_counter`` only if it is above the stored one.

    One conditional UPDATE, so parallel workers can never move a counter backwards or accept
    the same counter twice. Returns whether the counter was advanced.
    """
    result = session.execute(
        update(DeviceKey)
        .where(DeviceKey.key_id == key_id, DeviceKey.counter < new_counter)
        .values(counter=new_counter)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
