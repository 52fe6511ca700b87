"""Stable rejection reason codes and the one exception family that carries them."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a request was rejected.

    These strings are a public contract: callers branch on them and store them. New codes may be
    appended; existing ones are never renamed or removed.
    """

    INVALID_REQUEST = "invalid_request"
    MALFORMED_TOKEN = "malformed_token"  # noqa: S105 - a reason code, not a secret
    UNSUPPORTED_FORMAT = "unsupported_format"
    CERTIFICATE_CHAIN_INVALID = "certificate_chain_invalid"
    CERTIFICATE_EXPIRED = "certificate_expired"
    NONCE_MISMATCH = "nonce_mismatch"
    KEY_ID_MISMATCH = "key_id_mismatch"
    CREDENTIAL_ID_MISMATCH = "credential_id_mismatch"
    APP_ID_MISMATCH = "app_id_mismatch"
    ENVIRONMENT_MISMATCH = "environment_mismatch"
    COUNTER_NOT_ZERO = "counter_not_zero"
    KEY_UNKNOWN = "key_unknown"
    KEY_ALREADY_REGISTERED = "key_already_registered"
    SIGNATURE_INVALID = "signature_invalid"
    COUNTER_REPLAY = "counter_replay"
    CHALLENGE_UNKNOWN = "challenge_unknown"
    CHALLENGE_EXPIRED = "challenge_expired"
    CHALLENGE_USED = "challenge_used"
    INTERNAL_ERROR = "internal_error"
    KEY_REVOKED = "key_revoked"
    RECEIPT_INVALID = "receipt_invalid"
    RISK_METRIC_EXCEEDED = "risk_metric_exceeded"


class Rejected(Exception):
    """A verification rejected its input.

    ``reason`` is the stable code callers branch on; ``detail`` is a human explanation that may
    change between releases and must never be parsed.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
