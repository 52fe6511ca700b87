"""Verification of an App Attest attestation object (Apple's nine steps)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from worker.core.authdata import AttestedAuthData, AuthDataExtensions, parse_attested_auth_data
from worker.core.chain import IntermediateCache, parse_credential_chain, verify_chain
from worker.core.decoding import MAX_TOKEN_BYTES, decode_cbor_exact
from worker.core.policy import AppConfig, Environment, Policy
from worker.core.reasons import Reason, Rejected

APPLE_APPATTEST_FMT: Final = "apple-appattest"
NONCE_EXTENSION_OID: Final = x509.ObjectIdentifier("1.2.840.113635.100.8.2")
# DER of SEQUENCE { [1] EXPLICIT OCTET STRING (32 bytes) }, the nonce follows.
_NONCE_EXTENSION_PREFIX: Final = bytes.fromhex("3024a1220420")
AAGUID_PRODUCTION: Final = b"appattest" + b"\x00" * 7
AAGUID_DEVELOPMENT: Final = b"appattestdevelop"
_HASH_LEN: Final = 32


@dataclass(frozen=True)
class AttestationObject:
    """An attestation object decoded into typed fields; nothing in it is verified yet."""

    x5c: tuple[bytes, ...]
    receipt: bytes
    raw_auth_data: bytes
    auth_data: AttestedAuthData


@dataclass(frozen=True)
class VerifiedAttestation:
    """What a caller must store after a successful attestation."""

    key_id: bytes
    public_key: bytes
    app_id: str
    environment: Environment
    sign_count: int
    receipt: bytes
    extensions: AuthDataExtensions | None
    leaf_fingerprint: bytes
    intermediate_fingerprint: bytes
    leaf_not_after: datetime


def parse_attestation_object(raw: bytes) -> AttestationObject:
    """Decode the CBOR attestation object strictly.

    Raises ``Rejected`` with ``unsupported_format`` when ``fmt`` is not ``apple-appattest`` and
    ``malformed_token`` for anything else that is not exactly
    ``{"fmt", "attStmt": {"x5c", "receipt"}, "authData"}``.
    """
    if len(raw) > MAX_TOKEN_BYTES:
        raise Rejected(Reason.MALFORMED_TOKEN, "attestation object is too large")
    obj = decode_cbor_exact(raw)
    if not isinstance(obj, dict):
        raise Rejected(Reason.MALFORMED_TOKEN, "attestation object is not a CBOR map")
    fmt = obj.get("fmt")
    if type(fmt) is not str:
        raise Rejected(Reason.MALFORMED_TOKEN, "attestation object has no text fmt")
    if fmt != APPLE_APPATTEST_FMT:
        raise Rejected(Reason.UNSUPPORTED_FORMAT, f"fmt {fmt[:40]!r} is not {APPLE_APPATTEST_FMT}")
    if set(obj) != {"fmt", "attStmt", "authData"}:
        raise Rejected(
            Reason.MALFORMED_TOKEN, "attestation object keys are not fmt/attStmt/authData"
        )
    stmt, auth_data = obj["attStmt"], obj["authData"]
    if not isinstance(stmt, dict) or set(stmt) != {"x5c", "receipt"}:
        raise Rejected(Reason.MALFORMED_TOKEN, "attStmt is not a map of x5c and receipt")
    x5c, receipt = stmt["x5c"], stmt["receipt"]
    if not isinstance(x5c, list) or not all(type(c) is bytes for c in x5c):
        raise Rejected(Reason.MALFORMED_TOKEN, "x5c is not an array of byte strings")
    if type(receipt) is not bytes or type(auth_data) is not bytes:
        raise Rejected(Reason.MALFORMED_TOKEN, "receipt and authData must be byte strings")
    return AttestationObject(
        x5c=tuple(x5c),
        receipt=receipt,
        raw_auth_data=auth_data,
        auth_data=parse_attested_auth_data(auth_data),
    )


def _uncompressed_point(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # parse_chain admits P-256 keys only
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _check_nonce(leaf: x509.Certificate, raw_auth_data: bytes, client_data_hash: bytes) -> None:
    # Steps 2-4: nonce = SHA256(authData || clientDataHash) must be the credCert extension value.
    nonce = hashlib.sha256(raw_auth_data + client_data_hash).digest()
    try:
        ext = leaf.extensions.get_extension_for_oid(NONCE_EXTENSION_OID).value
    except x509.ExtensionNotFound as exc:
        raise Rejected(Reason.NONCE_MISMATCH, "credCert has no nonce extension") from exc
    except ValueError as exc:  # duplicate or undecodable extensions
        raise Rejected(Reason.CERTIFICATE_CHAIN_INVALID, "credCert extensions are invalid") from exc
    value = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    if not hmac.compare_digest(value, _NONCE_EXTENSION_PREFIX + nonce):
        raise Rejected(
            Reason.NONCE_MISMATCH, "credCert nonce does not match authData and challenge"
        )


def _check_key_id(point: bytes, key_id: bytes) -> None:
    # Step 5: SHA256 of the credCert's uncompressed public key point is the keyId.
    if not hmac.compare_digest(hashlib.sha256(point).digest(), key_id):
        raise Rejected(Reason.KEY_ID_MISMATCH, "keyId is not the hash of the credCert public key")


def _check_app_id(auth_data: AttestedAuthData, policy: Policy) -> AppConfig:
    # Step 6: rpIdHash is SHA256 of one of the configured App IDs.
    app = policy.app_for_rp_id_hash(auth_data.rp_id_hash)
    if app is None or not hmac.compare_digest(app.rp_id_hash, auth_data.rp_id_hash):
        raise Rejected(Reason.APP_ID_MISMATCH, "rpIdHash matches no configured App ID")
    return app


def _check_counter_zero(auth_data: AttestedAuthData) -> None:
    # Step 7: a fresh key has signed nothing yet.
    if auth_data.sign_count != 0:
        raise Rejected(Reason.COUNTER_NOT_ZERO, f"signCount is {auth_data.sign_count}, not 0")


def _check_environment(auth_data: AttestedAuthData, app: AppConfig) -> Environment:
    # Step 8: aaguid tells the environment, and the app must accept that environment.
    if hmac.compare_digest(auth_data.aaguid, AAGUID_PRODUCTION):
        environment = Environment.PRODUCTION
    elif hmac.compare_digest(auth_data.aaguid, AAGUID_DEVELOPMENT):
        environment = Environment.DEVELOPMENT
    else:
        raise Rejected(Reason.ENVIRONMENT_MISMATCH, "aaguid is neither production nor development")
    if not app.allows(environment):
        raise Rejected(
            Reason.ENVIRONMENT_MISMATCH, f"{app.app_id} does not accept {environment} keys"
        )
    return environment


def _check_credential_id(auth_data: AttestedAuthData, key_id: bytes, point: bytes) -> None:
    # Step 9: credentialId is the keyId, and the COSE key is the credCert key.
    if not hmac.compare_digest(auth_data.credential_id, key_id):
        raise Rejected(Reason.CREDENTIAL_ID_MISMATCH, "credentialId is not the keyId")
    if not hmac.compare_digest(auth_data.public_point, point):
        raise Rejected(
            Reason.CREDENTIAL_ID_MISMATCH, "authData public key is not the credCert public key"
        )


def _check_distrust(
    leaf_der: bytes, intermediate_der: bytes, key_id: bytes, policy: Policy
) -> tuple[bytes, bytes]:
    # Not one of Apple's steps: the operator's own lists of distrusted certificates and keys.
    leaf_fp = hashlib.sha256(leaf_der).digest()
    intermediate_fp = hashlib.sha256(intermediate_der).digest()
    if leaf_fp in policy.distrusted_certificates:
        raise Rejected(Reason.CERTIFICATE_CHAIN_INVALID, "credCert is on the distrust list")
    if intermediate_fp in policy.distrusted_certificates:
        raise Rejected(Reason.CERTIFICATE_CHAIN_INVALID, "intermediate is on the distrust list")
    if key_id in policy.distrusted_key_ids:
        raise Rejected(Reason.KEY_REVOKED, "keyId is on the distrust list")
    return leaf_fp, intermediate_fp


def _check_build(auth_data: AttestedAuthData, app: AppConfig) -> None:
    # Not one of Apple's steps: the app's rules for the iOS 27 extensions (validation category,
    # bundle version). Checked once the chain verified, so that only a genuine key is ever
    # reported as refused for its build.
    app.extensions.check(auth_data.extensions)


def verify_attestation(
    *,
    attestation_object: bytes,
    key_id: bytes,
    client_data_hash: bytes,
    policy: Policy,
    now: datetime,
    cache: IntermediateCache | None = None,
) -> VerifiedAttestation:
    """Verify an attestation object as Apple's nine steps require.

    Takes the CBOR object, the 32-byte keyId, the clientDataHash the device was given (32 bytes
    from the plugin; Apple's documentation samples used other lengths),
    the policy, the verification instant (timezone-aware) and an optional intermediate cache.
    Returns what must be stored for the key. Raises ``Rejected`` with the reason of the first
    failed check; after Apple's steps, the app's rules for the iOS 27 extensions apply. The
    cheap structural and hash checks run before any signature, so garbage costs microseconds,
    not a P-384 verification; every check still runs before acceptance.

    The receipt is stored as received and is not part of the verdict: no device signature
    covers it, Apple's steps do not include it, and some real receipts do not pass standard
    CMS verification, so gating on it would refuse genuine devices. ``verify_receipt`` checks
    one on its own.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if len(key_id) != _HASH_LEN:
        raise ValueError("key_id must be 32 bytes")
    parsed = parse_attestation_object(attestation_object)
    leaf, intermediate, point = parse_credential_chain(parsed.x5c)
    _check_nonce(leaf, parsed.raw_auth_data, client_data_hash)
    _check_key_id(point, key_id)
    app = _check_app_id(parsed.auth_data, policy)
    _check_counter_zero(parsed.auth_data)
    environment = _check_environment(parsed.auth_data, app)
    _check_credential_id(parsed.auth_data, key_id, point)
    fingerprints = _check_distrust(parsed.x5c[0], parsed.x5c[1], key_id, policy)
    # Step 1, last because it is the expensive one.
    chain = verify_chain(
        leaf=leaf,
        intermediate=intermediate,
        trust=policy.trust,
        now=now,
        cache=cache,
        fingerprints=fingerprints,
    )
    _check_build(parsed.auth_data, app)
    return VerifiedAttestation(
        key_id=key_id,
        public_key=point,
        app_id=app.app_id,
        environment=environment,
        sign_count=parsed.auth_data.sign_count,
        receipt=parsed.receipt,
        extensions=parsed.auth_data.extensions,
        leaf_fingerprint=chain.leaf_fingerprint,
        intermediate_fingerprint=chain.intermediate_fingerprint,
        leaf_not_after=leaf.not_valid_after_utc,
    )
