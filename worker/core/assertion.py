"""Verification of an App Attest assertion object."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from worker.core.authdata import AssertionAuthData, AuthDataExtensions, parse_assertion_auth_data
from worker.core.decoding import MAX_TOKEN_BYTES, decode_cbor_exact
from worker.core.reasons import Reason, Rejected

_MAX_COUNTER: Final = 2**32 - 1
# The deterministic CBOR encoding of an assertion whose two byte strings are 24 to 255 bytes
# long (every real one: a DER ECDSA signature and 37 bytes of authenticatorData, more with
# extensions) is fixed but for those strings: a map of "signature" then "authenticatorData"
# (canonical key order), each string with a one-byte length. An object laid out exactly so is
# read in place; anything else goes through the decoder, which accepts or refuses it by the
# same rules.
_SIGNATURE_HEAD: Final = b"\xa2\x69signature\x58"
_AUTH_DATA_HEAD: Final = b"\x71authenticatorData\x58"
_ONE_BYTE_LENGTHS: Final = range(24, 256)
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class AssertionObject:
    """An assertion object decoded into typed fields; nothing in it is verified yet."""

    signature: bytes
    raw_auth_data: bytes
    auth_data: AssertionAuthData


@dataclass(frozen=True)
class VerifiedAssertion:
    """What a caller must store after a successful assertion: the new counter."""

    counter: int
    extensions: AuthDataExtensions | None


def parse_assertion_object(raw: bytes) -> AssertionObject:
    """Decode the CBOR assertion object ``{"signature", "authenticatorData"}`` strictly.

    Raises ``Rejected(malformed_token)`` for anything else.
    """
    if len(raw) > MAX_TOKEN_BYTES:
        raise Rejected(Reason.MALFORMED_TOKEN, "assertion object is too large")
    fields = _read_canonical_layout(raw)
    if fields is not None:
        signature, auth_data = fields
        return AssertionObject(
            signature=signature,
            raw_auth_data=auth_data,
            auth_data=parse_assertion_auth_data(auth_data),
        )
    obj = decode_cbor_exact(raw)
    if not isinstance(obj, dict) or set(obj) != {"signature", "authenticatorData"}:
        raise Rejected(
            Reason.MALFORMED_TOKEN, "assertion is not a map of signature and authenticatorData"
        )
    signature, auth_data = obj["signature"], obj["authenticatorData"]
    if type(signature) is not bytes or type(auth_data) is not bytes:
        raise Rejected(Reason.MALFORMED_TOKEN, "signature and authenticatorData must be bytes")
    return AssertionObject(
        signature=signature,
        raw_auth_data=auth_data,
        auth_data=parse_assertion_auth_data(auth_data),
    )


def _read_canonical_layout(raw: bytes) -> tuple[bytes, bytes] | None:
    """(signature, authenticatorData) of an object in the fixed layout, else None."""
    head = len(_SIGNATURE_HEAD)
    if not raw.startswith(_SIGNATURE_HEAD) or len(raw) <= head:
        return None
    signature_len = raw[head]
    signature_end = head + 1 + signature_len
    auth_data_at = signature_end + len(_AUTH_DATA_HEAD) + 1
    if (
        signature_len not in _ONE_BYTE_LENGTHS
        or len(raw) < auth_data_at
        or not raw.startswith(_AUTH_DATA_HEAD, signature_end)
    ):
        return None
    auth_data_len = raw[auth_data_at - 1]
    if auth_data_len not in _ONE_BYTE_LENGTHS or len(raw) != auth_data_at + auth_data_len:
        return None
    return raw[head + 1 : signature_end], raw[auth_data_at:]


def load_public_key(point: bytes) -> ec.EllipticCurvePublicKey:
    """Load a stored 65-byte uncompressed P-256 point; raises ValueError if it is not one."""
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def _check_app_id(auth_data: AssertionAuthData, app_id: str) -> None:
    # Step 4: rpIdHash is the App ID the key was registered for.
    expected = hashlib.sha256(app_id.encode("utf-8")).digest()
    if not hmac.compare_digest(auth_data.rp_id_hash, expected):
        raise Rejected(Reason.APP_ID_MISMATCH, "rpIdHash is not the App ID of this key")


def _check_counter(auth_data: AssertionAuthData, previous_counter: int) -> None:
    # Step 5: the counter must move forward; a stalled or falling counter is a replay or clone.
    if auth_data.counter <= previous_counter:
        raise Rejected(
            Reason.COUNTER_REPLAY,
            f"counter {auth_data.counter} is not above the stored {previous_counter}",
        )


def _check_signature(
    parsed: AssertionObject, client_data_hash: bytes, public_key: ec.EllipticCurvePublicKey
) -> None:
    # Steps 1-3: the device signed nonce = SHA256(authenticatorData || clientDataHash) with
    # ECDSA-SHA256, so the nonce is hashed once more inside the signature scheme.
    nonce = hashlib.sha256(parsed.raw_auth_data + client_data_hash).digest()
    try:
        public_key.verify(parsed.signature, nonce, _ECDSA_SHA256)
    except (InvalidSignature, ValueError) as exc:
        raise Rejected(Reason.SIGNATURE_INVALID, "assertion signature does not verify") from exc


def verify_assertion(
    *,
    assertion_object: bytes,
    client_data_hash: bytes,
    public_key: bytes | ec.EllipticCurvePublicKey,
    app_id: str,
    previous_counter: int,
) -> VerifiedAssertion:
    """Verify an assertion object against a registered key.

    Takes the CBOR object, the clientDataHash of the payload (32 bytes from the plugin), the
    key's public key (a 65-byte uncompressed point or a loaded key), the App ID the key was
    registered for and the stored counter. Returns the new counter, which the caller must
    store with a compare-and-set against ``previous_counter``, and the extensions, which the
    caller holds to the app's rules (``AppConfig.extensions.check``) once it told the key's
    state. Raises ``Rejected`` with the reason of the first failed check.
    """
    if not 0 <= previous_counter <= _MAX_COUNTER:
        raise ValueError("previous_counter must fit in 32 bits")
    key = load_public_key(public_key) if isinstance(public_key, bytes) else public_key
    parsed = parse_assertion_object(assertion_object)
    # Apple's order: the signature first, so that nothing about the key's state (its App ID,
    # its counter) can be learnt from an assertion its device did not sign.
    _check_signature(parsed, client_data_hash, key)
    _check_app_id(parsed.auth_data, app_id)
    _check_counter(parsed.auth_data, previous_counter)
    return VerifiedAssertion(
        counter=parsed.auth_data.counter, extensions=parsed.auth_data.extensions
    )
