"""Checks on a receipt Apple's fraud-metric service returned, before it replaces the stored one.

``verify_receipt`` proves who signed a receipt (signature, chain to the pinned root, Apple's
role markers). A refreshed receipt must also be *about* the key it was asked for: its App ID
is the key's app, its attested key (field 3) is the key's stored credential certificate, it is
of type ``RECEIPT``, recently created and not expired. Each failure has its own
``RefreshRejection`` code, so a run can count forged or stale answers by reason; none of them
is ever stored.
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from worker.core.reasons import Rejected
from worker.core.receipt import Receipt, ReceiptTrustStore, verify_receipt

__all__ = [
    "APPLE_DATA_DEVELOPMENT_URL",
    "APPLE_DATA_URL",
    "MAX_RECEIPT_AGE",
    "RefreshRejected",
    "RefreshRejection",
    "verify_refreshed_receipt",
]

# Apple's fraud-metric service, one URL per App Attest environment (a receipt is only
# accepted by the service of its own environment).
APPLE_DATA_URL: Final = "https://data.appattest.apple.com/v1/attestationData"
APPLE_DATA_DEVELOPMENT_URL: Final = (
    "https://data-development.appattest.apple.com/v1/attestationData"
)

# Apple creates the receipt as it answers; one created long before is a replayed answer.
MAX_RECEIPT_AGE: Final = timedelta(minutes=10)
# Clocks of Apple's servers and ours differ a little.
_CLOCK_SKEW: Final = timedelta(minutes=2)


class RefreshRejection(StrEnum):
    """Why a returned receipt was not stored. Stable codes, append-only."""

    RECEIPT_INVALID = "receipt_invalid"  # parse, signature or chain
    APP_ID_MISMATCH = "app_id_mismatch"
    KEY_MISMATCH = "key_mismatch"
    WRONG_TYPE = "wrong_type"
    NOT_FRESH = "not_fresh"
    EXPIRED = "expired"
    REPLAYED = "replayed"  # not newer than the receipt it replaces


class RefreshRejected(Exception):
    """A returned receipt failed a check; ``reason`` is the code, ``detail`` for humans."""

    def __init__(self, reason: RefreshRejection, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _check_app_id(receipt: Receipt, app_ids: frozenset[str]) -> None:
    # Field 2 names the key's app.
    if not any(hmac.compare_digest(receipt.app_id.encode(), a.encode()) for a in app_ids):
        raise RefreshRejected(RefreshRejection.APP_ID_MISMATCH, "receipt is for another app")


def _check_attested_key(receipt: Receipt, credential_certificate: bytes) -> None:
    # Field 3 is the credential certificate stored at registration.
    if not hmac.compare_digest(receipt.credential_certificate, credential_certificate):
        raise RefreshRejected(RefreshRejection.KEY_MISMATCH, "receipt is for another key")


def _check_type(receipt: Receipt) -> None:
    # Apple's server answers with type RECEIPT; ATTEST only comes with an attestation.
    if receipt.receipt_type != "RECEIPT":
        raise RefreshRejected(
            RefreshRejection.WRONG_TYPE, f"receipt type is {receipt.receipt_type}, not RECEIPT"
        )


def _check_creation(receipt: Receipt, now: datetime) -> None:
    # Field 12: created just now, not long ago and not in the future.
    if receipt.creation_time > now + _CLOCK_SKEW:
        raise RefreshRejected(RefreshRejection.NOT_FRESH, "receipt is created in the future")
    if receipt.creation_time < now - MAX_RECEIPT_AGE:
        raise RefreshRejected(
            RefreshRejection.NOT_FRESH,
            f"receipt was created at {receipt.creation_time.isoformat()}, too long ago",
        )


def _check_expiration(receipt: Receipt, now: datetime) -> None:
    # Field 21: a receipt past its expiration can no longer be exchanged.
    if receipt.expiration_time <= now:
        raise RefreshRejected(RefreshRejection.EXPIRED, "receipt has expired")


def _check_newer(receipt: Receipt, stored_created_at: datetime | None) -> None:
    # A receipt Apple returns is created after the one it replaces: an older or equal one is
    # a replayed answer (it would roll the risk metric back).
    if stored_created_at is not None and receipt.creation_time <= stored_created_at:
        raise RefreshRejected(
            RefreshRejection.REPLAYED,
            f"receipt was created at {receipt.creation_time.isoformat()}, not after the stored "
            f"one ({stored_created_at.isoformat()})",
        )


def verify_refreshed_receipt(
    *,
    receipt: bytes,
    trust: ReceiptTrustStore,
    now: datetime,
    app_ids: frozenset[str],
    credential_certificate: bytes,
    stored_created_at: datetime | None = None,
) -> Receipt:
    """Verify a receipt returned by Apple's fraud-metric service for one stored key.

    Takes the receipt bytes, the receipt trust store (Apple Root CA - G3 in production), the
    instant, the App IDs the key may belong to, the key's credential certificate (DER) and the
    creation time of the receipt it replaces (the new one must be newer).
    Returns the parsed ``Receipt`` (risk metric, not-before and expiration included). Raises
    ``RefreshRejected`` with the first failing check.
    """
    try:
        parsed = verify_receipt(receipt=receipt, trust=trust, now=now)
    except Rejected as exc:
        raise RefreshRejected(RefreshRejection.RECEIPT_INVALID, exc.detail) from exc
    _check_type(parsed)
    _check_app_id(parsed, app_ids)
    _check_attested_key(parsed, credential_certificate)
    _check_creation(parsed, now)
    _check_newer(parsed, stored_created_at)
    _check_expiration(parsed, now)
    return parsed
