"""The pure App Attest verification core.

Bytes, a policy and an instant go in; a frozen result comes out or ``Rejected`` is raised. No
queue, database, environment variable, network or wall clock is touched in this package.
"""

import hashlib

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
