"""The public codes a verdict carries: why a request was rejected, and which App Attest
environment a key belongs to.

They are defined here, in the client's package, because they are part of what the client
reads off the wire; the verification core (``worker.core``) imports them from here, so the
server and every client share one definition. This module imports nothing but the standard
library.
"""

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
    # The job was accepted, but its queue message was lost with the broker's data before any
    # worker decided it: recorded so that a late delivery decides nothing. Reported as the
    # job status ``lost``; submit the request again.
    JOB_LOST = "job_lost"
    VALIDATION_CATEGORY_NOT_ALLOWED = "validation_category_not_allowed"
    BUNDLE_VERSION_TOO_OLD = "bundle_version_too_old"
    EXTENSIONS_MISSING = "extensions_missing"

    # Optional policy (APPATTEST_MAX_RISK_METRIC): the key's risk metric, from Apple's last
    # refreshed receipt, is above the configured limit.
    RISK_METRIC_EXCEEDED = "risk_metric_exceeded"
    # Android (Google Play Integrity standard requests).
    INTEGRITY_TOKEN_INVALID = "integrity_token_invalid"  # noqa: S105 - a reason code
    INTEGRITY_REQUEST_HASH_MISMATCH = "integrity_request_hash_mismatch"
    INTEGRITY_PACKAGE_MISMATCH = "integrity_package_mismatch"
    INTEGRITY_APP_UNRECOGNIZED = "integrity_app_unrecognized"
    INTEGRITY_CERTIFICATE_MISMATCH = "integrity_certificate_mismatch"
    INTEGRITY_VERSION_TOO_OLD = "integrity_version_too_old"
    INTEGRITY_DEVICE_NOT_TRUSTED = "integrity_device_not_trusted"
    INTEGRITY_UNLICENSED = "integrity_unlicensed"
    INTEGRITY_TOKEN_STALE = "integrity_token_stale"  # noqa: S105 - a reason code


class Environment(StrEnum):
    """The App Attest environment a key was created in, as told by its aaguid."""

    PRODUCTION = "production"
    DEVELOPMENT = "development"
