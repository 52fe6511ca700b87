"""Parsing of authenticator data into typed, frozen structures.

authData is parsed by its structure, never by its flag bits: Apple's iOS 27 sample appends an
extensions map while the flags still read 0x40.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from worker.core.decoding import decode_cbor_prefix
from worker.core.reasons import Reason, Rejected

_RP_ID_HASH_LEN: Final = 32
_HEADER_LEN: Final = 37  # rpIdHash (32) | flags (1) | counter (4)
_AAGUID_LEN: Final = 16
_MAX_CREDENTIAL_ID_LEN: Final = 1023

# COSE_Key labels (RFC 9053): kty=EC2 (2), alg=ES256 (-7), crv=P-256 (1), x, y.
_COSE_KTY, _COSE_ALG, _COSE_CRV, _COSE_X, _COSE_Y = 1, 3, -1, -2, -3
_P256_COORD_LEN: Final = 32
# The deterministic CBOR encoding of an ES256 P-256 COSE key is fixed but for its coordinates:
# {1: 2, 3: -7, -1: 1, -2: x, -3: y} with keys in canonical order. A key that starts like this
# is read in place; anything else goes through the decoder, which says what is wrong with it.
_COSE_P256_HEAD: Final = bytes.fromhex("a501020326200121") + b"\x58\x20"
_COSE_P256_MID: Final = b"\x22\x58\x20"
_COSE_P256_LEN: Final = len(_COSE_P256_HEAD) + len(_COSE_P256_MID) + 2 * _P256_COORD_LEN

_EXT_VALIDATION_CATEGORY: Final = "apple_validation_category_01"
_EXT_BUNDLE_VERSION: Final = "apple_bundle_version_01"
_MAX_EXTENSION_ENTRIES: Final = 32

ExtensionValue = str | int | bytes


@dataclass(frozen=True)
class AuthDataExtensions:
    """The optional extensions map that iOS 27 and later append to authenticator data.

    The two keys Apple documents are decoded; any other entry is kept as it came, so that a
    newer iOS release surfaces its data instead of being refused.
    """

    validation_category: int | None = None
    bundle_version: str | None = None
    other: MappingProxyType[str, ExtensionValue] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True)
class AttestedAuthData:
    """authData of an attestation object."""

    rp_id_hash: bytes
    flags: int
    sign_count: int
    aaguid: bytes
    credential_id: bytes
    public_x: bytes
    public_y: bytes
    extensions: AuthDataExtensions | None

    @property
    def public_point(self) -> bytes:
        """The COSE key as a 65-byte uncompressed X9.62 point."""
        return b"\x04" + self.public_x + self.public_y


@dataclass(frozen=True)
class AssertionAuthData:
    """authenticatorData of an assertion object."""

    rp_id_hash: bytes
    flags: int
    counter: int
    extensions: AuthDataExtensions | None


def _malformed(detail: str) -> Rejected:
    return Rejected(Reason.MALFORMED_TOKEN, detail)


def _parse_header(raw: bytes, what: str) -> tuple[bytes, int, int]:
    if len(raw) < _HEADER_LEN:
        raise _malformed(f"{what} is {len(raw)} bytes, shorter than its {_HEADER_LEN}-byte header")
    return (
        raw[:_RP_ID_HASH_LEN],
        raw[_RP_ID_HASH_LEN],
        int.from_bytes(raw[_RP_ID_HASH_LEN + 1 : _HEADER_LEN], "big"),
    )


def _parse_cose_p256(item: object) -> tuple[bytes, bytes]:
    if not isinstance(item, dict):
        raise _malformed("credential public key is not a COSE map")
    expected_labels = {_COSE_KTY, _COSE_ALG, _COSE_CRV, _COSE_X, _COSE_Y}
    # Exact types: in Python True == 1 and 2.0 == 2, and neither is a COSE integer.
    if set(item) != expected_labels or not all(type(label) is int for label in item):
        raise _malformed("credential public key has unexpected COSE labels")
    header = (item[_COSE_KTY], item[_COSE_ALG], item[_COSE_CRV])
    if not all(type(value) is int for value in header) or header != (2, -7, 1):
        raise _malformed("credential public key is not an ES256 P-256 EC2 key")
    x, y = item[_COSE_X], item[_COSE_Y]
    if not (type(x) is bytes and type(y) is bytes):
        raise _malformed("credential public key coordinates are not byte strings")
    if len(x) != _P256_COORD_LEN or len(y) != _P256_COORD_LEN:
        raise _malformed("credential public key coordinates are not 32 bytes")
    return x, y


def _read_cose_p256(raw: bytes, offset: int) -> tuple[bytes, bytes, int]:
    """The coordinates of the COSE key at ``offset`` and the offset just past it."""
    x_at = offset + len(_COSE_P256_HEAD)
    y_at = x_at + _P256_COORD_LEN + len(_COSE_P256_MID)
    end = offset + _COSE_P256_LEN
    if (
        len(raw) >= end
        and raw.startswith(_COSE_P256_HEAD, offset)
        and raw.startswith(_COSE_P256_MID, x_at + _P256_COORD_LEN)
    ):
        return raw[x_at : x_at + _P256_COORD_LEN], raw[y_at:end], end
    cose, end = decode_cbor_prefix(raw, offset)
    x, y = _parse_cose_p256(cose)
    return x, y, end


def _parse_extensions(raw: bytes, offset: int) -> AuthDataExtensions | None:
    """Parse the optional trailing extensions map; it must end the data exactly."""
    if offset == len(raw):
        return None
    item, end = decode_cbor_prefix(raw, offset)
    if end != len(raw):
        raise _malformed(f"{len(raw) - end} bytes trail the authenticator data extensions")
    if not isinstance(item, dict):
        raise _malformed("authenticator data extensions are not a CBOR map")
    if len(item) > _MAX_EXTENSION_ENTRIES:
        raise _malformed("authenticator data extensions map has too many entries")
    category: int | None = None
    version: str | None = None
    other: dict[str, ExtensionValue] = {}
    for key, value in item.items():
        if type(key) is not str:
            raise _malformed("authenticator data extension keys must be text")
        if key == _EXT_VALIDATION_CATEGORY:
            if type(value) is not bytes or len(value) != 4:
                raise _malformed(f"{key} must be 4 bytes")
            category = int.from_bytes(value, "little")
        elif key == _EXT_BUNDLE_VERSION:
            if type(value) is not str:
                raise _malformed(f"{key} must be text")
            version = value
        elif type(value) in (str, int, bytes):
            other[key] = value
        else:
            raise _malformed(f"authenticator data extension {key!r} has an unsupported type")
    return AuthDataExtensions(
        validation_category=category, bundle_version=version, other=MappingProxyType(other)
    )


def parse_attested_auth_data(raw: bytes) -> AttestedAuthData:
    """Parse an attestation's authData.

    Layout: rpIdHash (32) | flags (1) | signCount (4, BE) | aaguid (16) | credentialId length
    (2, BE) | credentialId | COSE EC2 key | optional extensions map. Raises
    ``Rejected(malformed_token)`` when the bytes do not have exactly this structure.
    """
    rp_id_hash, flags, sign_count = _parse_header(raw, "authData")
    offset = _HEADER_LEN
    if len(raw) < offset + _AAGUID_LEN + 2:
        raise _malformed("authData ends before its attested credential data")
    aaguid = raw[offset : offset + _AAGUID_LEN]
    offset += _AAGUID_LEN
    cred_len = int.from_bytes(raw[offset : offset + 2], "big")
    offset += 2
    if cred_len > _MAX_CREDENTIAL_ID_LEN or len(raw) < offset + cred_len:
        raise _malformed("authData credentialId length exceeds the data")
    credential_id = raw[offset : offset + cred_len]
    offset += cred_len
    x, y, offset = _read_cose_p256(raw, offset)
    return AttestedAuthData(
        rp_id_hash=rp_id_hash,
        flags=flags,
        sign_count=sign_count,
        aaguid=aaguid,
        credential_id=credential_id,
        public_x=x,
        public_y=y,
        extensions=_parse_extensions(raw, offset),
    )


def parse_assertion_auth_data(raw: bytes) -> AssertionAuthData:
    """Parse an assertion's authenticatorData: rpIdHash | flags | counter | optional extensions.

    Raises ``Rejected(malformed_token)`` when the bytes do not have exactly this structure.
    """
    rp_id_hash, flags, counter = _parse_header(raw, "authenticatorData")
    return AssertionAuthData(
        rp_id_hash=rp_id_hash,
        flags=flags,
        counter=counter,
        extensions=_parse_extensions(raw, _HEADER_LEN),
    )
