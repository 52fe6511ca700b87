"""The pure App Attest verification core.

Bytes, a policy and an instant go in; a frozen result comes out or ``Rejected`` is raised. No
queue, database, environment variable, network or wall clock is touched in this package.

Each name is imported when first used, so that a process needing only the reason codes (the
API, through ``worker.contract``) does not load the certificate and signature checks.
"""

from __future__ import annotations

import hashlib
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.core.assertion import VerifiedAssertion, verify_assertion
    from worker.core.attestation import VerifiedAttestation, verify_attestation
    from worker.core.authdata import AuthDataExtensions
    from worker.core.chain import IntermediateCache
    from worker.core.decoding import b64decode_strict
    from worker.core.policy import (
        AppConfig,
        Environment,
        ExtensionRules,
        Policy,
        PolicyError,
        parse_bundle_version,
    )
    from worker.core.reasons import Reason, Rejected
    from worker.core.receipt import Receipt, ReceiptTrustStore, parse_receipt, verify_receipt
    from worker.core.spec import PolicySpec
    from worker.core.trust import APPLE_APP_ATTEST_ROOT_SHA256, TrustStore, TrustStoreError

# Where each public name is defined, by module.
_EXPORTS = {
    "APPLE_APP_ATTEST_ROOT_SHA256": "worker.core.trust",
    "AppConfig": "worker.core.policy",
    "AuthDataExtensions": "worker.core.authdata",
    "Environment": "worker.core.policy",
    "ExtensionRules": "worker.core.policy",
    "IntermediateCache": "worker.core.chain",
    "Policy": "worker.core.policy",
    "PolicyError": "worker.core.policy",
    "PolicySpec": "worker.core.spec",
    "Reason": "worker.core.reasons",
    "Receipt": "worker.core.receipt",
    "ReceiptTrustStore": "worker.core.receipt",
    "Rejected": "worker.core.reasons",
    "TrustStore": "worker.core.trust",
    "TrustStoreError": "worker.core.trust",
    "VerifiedAssertion": "worker.core.assertion",
    "VerifiedAttestation": "worker.core.attestation",
    "b64decode_strict": "worker.core.decoding",
    "parse_bundle_version": "worker.core.policy",
    "parse_receipt": "worker.core.receipt",
    "verify_assertion": "worker.core.assertion",
    "verify_attestation": "worker.core.attestation",
    "verify_receipt": "worker.core.receipt",
}


def client_data_hash(text: str) -> bytes:
    """SHA-256 of the UTF-8 bytes of a challenge or payload, exactly as the plugin signs it."""
    return hashlib.sha256(text.encode("utf-8")).digest()


__all__ = [
    "APPLE_APP_ATTEST_ROOT_SHA256",
    "AppConfig",
    "AuthDataExtensions",
    "Environment",
    "ExtensionRules",
    "IntermediateCache",
    "Policy",
    "PolicyError",
    "PolicySpec",
    "Reason",
    "Receipt",
    "ReceiptTrustStore",
    "Rejected",
    "TrustStore",
    "TrustStoreError",
    "VerifiedAssertion",
    "VerifiedAttestation",
    "b64decode_strict",
    "client_data_hash",
    "parse_bundle_version",
    "parse_receipt",
    "verify_assertion",
    "verify_attestation",
    "verify_receipt",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
