"""Generate fake Apple App Attest data under a throwaway test certificate authority.

This module mints attestation and assertion objects that have the same structure as the ones
real iOS devices produce, but whose certificate chain ends in a test root created on the fly
instead of Apple's App Attestation Root CA. The verifier never trusts that root unless an
operator names it explicitly (``--root-ca``, ``APPATTEST_ROOT_CA``); the CA's subject says it
is a throwaway test CA. ``appattest simulate`` drives a running service with these devices,
and the tests and benchmarks use them through ``tests.factory``. Callers create one
``TestCA`` (two P-384 key generations, which is the expensive part) and then any number of
``Device`` objects under it; building one attestation costs one P-384 signature for the
credential certificate plus the P-256 key generation of the device.

Every knob that a verifier must check can be turned so that negative tests can forge exactly
one defect at a time: the nonce in the certificate, the certificate key, the chain, the format,
the App ID hash, the flags, the counter, the AAGUID, the credential id, the COSE key and the
optional iOS 27 extensions map.

Only ``cryptography``, ``cbor2`` and the standard library are used.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, ClassVar, Literal

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "AAGUID_DEVELOPMENT",
    "AAGUID_PRODUCTION",
    "APP_ID",
    "DEFAULT_NOT_AFTER",
    "DEFAULT_NOT_BEFORE",
    "DEFAULT_RECEIPT",
    "INTERMEDIATE_NAME",
    "IOS27_EXTENSIONS",
    "LEAF_KEY_USAGE",
    "NONCE_EXTENSION_OID",
    "PLUGIN_FORMAT",
    "PLUGIN_PLATFORM",
    "ROOT_NAME",
    "Device",
    "TestCA",
    "ca_key_usage",
    "client_data_hash",
    "default_ca",
    "nonce_extension",
    "subject_name",
    "uncompressed_point",
]

APP_ID = "TEAMID1234.com.example.app"
"""The App ID (``TEAMID.bundle.id``) that test devices use unless told otherwise."""

ROOT_NAME = "Test App Attestation Root CA"
INTERMEDIATE_NAME = "Test App Attestation CA 1"
ORGANIZATION = "appattest throwaway TEST CA - not Apple, never trust in production"

NONCE_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113635.100.8.2")
"""The credential certificate extension that carries the attestation nonce."""

NONCE_EXTENSION_PREFIX = b"\x30\x24\xa1\x22\x04\x20"

AAGUID_PRODUCTION = b"appattest" + b"\x00" * 7
AAGUID_DEVELOPMENT = b"appattestdevelop"

DEFAULT_RECEIPT = b"TEST-APP-ATTEST-RECEIPT: not a real PKCS#7 receipt"
"""Deterministic placeholder for ``attStmt.receipt``; it is opaque bytes to the verifier."""

IOS27_EXTENSIONS: dict[str, object] = {
    "apple_bundle_version_01": "1",
    "apple_validation_category_01": (1).to_bytes(4, "little"),
}
"""The authenticator-data extensions map that iOS 27 and later append after the COSE key."""

PLUGIN_PLATFORM = "ios"
PLUGIN_FORMAT = "apple-app-attest"

DEFAULT_NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
DEFAULT_NOT_AFTER = datetime(2049, 12, 31, tzinfo=UTC)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def subject_name(common_name: str) -> x509.Name:
    """A subject with ``common_name`` whose organisation says it is a throwaway test CA."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def ca_key_usage() -> x509.KeyUsage:
    """keyCertSign and cRLSign, as a CA certificate carries them."""
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def uncompressed_point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Return the X9.62 uncompressed encoding (``04 || x || y``) of an elliptic-curve key."""
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def nonce_extension(nonce: bytes) -> bytes:
    """Return the DER value of the nonce extension for a 32-byte nonce.

    The value is ``SEQUENCE { [1] EXPLICIT OCTET STRING nonce }``, which is
    ``30 24 A1 22 04 20`` followed by the nonce, exactly as Apple encodes it.
    """
    if len(nonce) != 32:
        raise ValueError(f"nonce must be 32 bytes, got {len(nonce)}")
    return NONCE_EXTENSION_PREFIX + nonce


def client_data_hash(text: str) -> bytes:
    """Return SHA-256 of the UTF-8 bytes of a challenge or payload, as the device computes it."""
    return _sha256(text.encode("utf-8"))


@dataclass(frozen=True)
class TestCA:
    """A throwaway two-level App Attest CA: a P-384 root and a P-384 intermediate.

    Create it once with ``TestCA.create()`` and share it between devices, because generating
    the two P-384 keys is far more expensive than issuing a leaf.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class despite the name

    root_cert: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate_cert: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        *,
        not_before: datetime = DEFAULT_NOT_BEFORE,
        not_after: datetime = DEFAULT_NOT_AFTER,
        intermediate_not_before: datetime | None = None,
        intermediate_not_after: datetime | None = None,
        root_name: str = ROOT_NAME,
    ) -> TestCA:
        """Generate fresh root and intermediate keys and certificates.

        The root is self-signed and valid from ``not_before`` to ``not_after``. The
        intermediate, named "Test App Attestation CA 1", is signed by the root with
        ecdsa-with-SHA384 and shares the root's validity unless its own bounds are given.
        Both carry the extensions that the web-PKI CA policy of pyca/cryptography requires.
        """
        root_key = ec.generate_private_key(ec.SECP384R1())
        root_subject = subject_name(root_name)
        root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
        root_cert = (
            x509.CertificateBuilder()
            .subject_name(root_subject)
            .issuer_name(root_subject)
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ca_key_usage(), critical=True)
            .add_extension(root_ski, critical=False)
            .sign(root_key, hashes.SHA384())
        )

        intermediate_key = ec.generate_private_key(ec.SECP384R1())
        intermediate_cert = (
            x509.CertificateBuilder()
            .subject_name(subject_name(INTERMEDIATE_NAME))
            .issuer_name(root_subject)
            .public_key(intermediate_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(intermediate_not_before or not_before)
            .not_valid_after(intermediate_not_after or not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ca_key_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(intermediate_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                critical=False,
            )
            .sign(root_key, hashes.SHA384())
        )
        return cls(
            root_cert=root_cert,
            root_key=root_key,
            intermediate_cert=intermediate_cert,
            intermediate_key=intermediate_key,
        )

    @cached_property
    def root_pem(self) -> bytes:
        """The root certificate in PEM form, as a verifier would pin it."""
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @cached_property
    def intermediate_der(self) -> bytes:
        """The intermediate certificate in DER form, as it appears in ``x5c[1]``."""
        return self.intermediate_cert.public_bytes(serialization.Encoding.DER)

    @cached_property
    def _intermediate_aki(self) -> x509.AuthorityKeyIdentifier:
        ski = self.intermediate_cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def issue_leaf(
        self,
        *,
        public_key: ec.EllipticCurvePublicKey,
        nonce_extension_value: bytes,
        not_before: datetime,
        not_after: datetime,
        extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> x509.Certificate:
        """Issue a credential certificate for ``public_key`` signed by the intermediate.

        The certificate is signed with ecdsa-with-SHA256 (as Apple does) and carries a critical
        basicConstraints CA:false, a critical keyUsage digitalSignature, an
        authorityKeyIdentifier pointing at the intermediate and the non-critical extension
        1.2.840.113635.100.8.2 whose value is exactly ``nonce_extension_value`` (normally
        ``nonce_extension(nonce)``). ``extra_extensions`` are appended as given, each with its
        criticality flag.
        """
        key_id_hex = _sha256(uncompressed_point(public_key)).hex()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject_name(key_id_hex))
            .issuer_name(self.intermediate_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(LEAF_KEY_USAGE, critical=True)
            .add_extension(self._intermediate_aki, critical=False)
            .add_extension(
                x509.UnrecognizedExtension(NONCE_EXTENSION_OID, nonce_extension_value),
                critical=False,
            )
        )
        for extension, critical in extra_extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self.intermediate_key, hashes.SHA256())


@functools.cache
def default_ca() -> TestCA:
    """Return a process-wide ``TestCA`` with default settings, created on first use."""
    return TestCA.create()


def _new_device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Device:
    """A fake iOS device holding one App Attest key under a ``TestCA``.

    ``counter`` is the last assertion counter this device used; ``assertion_object`` advances
    it. All methods return exactly the bytes (or plugin JSON bodies) a real device would send.
    """

    ca: TestCA
    app_id: str = APP_ID
    environment: Literal["production", "development"] = "production"
    private_key: ec.EllipticCurvePrivateKey = field(default_factory=_new_device_key)
    counter: int = 0

    @property
    def public_point(self) -> bytes:
        """The 65-byte uncompressed X9.62 point of the device's public key."""
        return uncompressed_point(self.private_key.public_key())

    @property
    def key_id(self) -> bytes:
        """The key identifier: SHA-256 of the uncompressed public point (32 bytes)."""
        return _sha256(self.public_point)

    @property
    def key_id_b64(self) -> str:
        """The key identifier in standard padded base64 (44 characters), as the plugin sends it."""
        return base64.b64encode(self.key_id).decode("ascii")

    @property
    def aaguid(self) -> bytes:
        """The 16-byte AAGUID that a device in this environment writes into authData."""
        return AAGUID_DEVELOPMENT if self.environment == "development" else AAGUID_PRODUCTION

    def cose_key(self) -> dict[int, object]:
        """Return the COSE EC2 P-256 key map ``{1: 2, 3: -7, -1: 1, -2: x, -3: y}``."""
        point = self.public_point
        return {1: 2, 3: -7, -1: 1, -2: point[1:33], -3: point[33:65]}

    def _rp_id_hash(self, rp_id: str | None) -> bytes:
        return _sha256((self.app_id if rp_id is None else rp_id).encode("utf-8"))

    def auth_data(
        self,
        *,
        rp_id: str | None = None,
        flags: int = 0x40,
        sign_count: int = 0,
        aaguid: bytes | None = None,
        credential_id: bytes | None = None,
        cose_key: dict[int, object] | None = None,
        extensions: dict[str, object] | None = None,
    ) -> bytes:
        """Return attestation authenticator data for this device's key.

        The layout is SHA-256(rp_id or app_id) | flags (1) | sign_count (4, big-endian) |
        aaguid (16) | length of credential_id (2, big-endian) | credential_id | CBOR COSE key,
        followed by the CBOR ``extensions`` map when it is not None. The AAGUID defaults to the
        one of the device's environment, the credential id to ``key_id`` and the COSE key to
        the device's public key. Any value may be overridden to forge a defect.
        """
        cred_id = self.key_id if credential_id is None else credential_id
        parts = [
            self._rp_id_hash(rp_id),
            struct.pack(">BI", flags, sign_count),
            self.aaguid if aaguid is None else aaguid,
            struct.pack(">H", len(cred_id)),
            cred_id,
            cbor2.dumps(self.cose_key() if cose_key is None else cose_key, canonical=True),
        ]
        if extensions is not None:
            parts.append(cbor2.dumps(extensions, canonical=True))
        return b"".join(parts)

    def attestation_object(
        self,
        client_data_hash: bytes,
        *,
        now: datetime,
        leaf_not_before: datetime | None = None,
        leaf_not_after: datetime | None = None,
        nonce: bytes | None = None,
        leaf_public_key: ec.EllipticCurvePublicKey | None = None,
        x5c: list[bytes] | None = None,
        fmt: str = "apple-appattest",
        receipt: bytes = DEFAULT_RECEIPT,
        extra_top_level: dict[str, object] | None = None,
        ios27_extensions: bool = False,
        rp_id: str | None = None,
        flags: int = 0x40,
        sign_count: int = 0,
        aaguid: bytes | None = None,
        credential_id: bytes | None = None,
        cose_key: dict[int, object] | None = None,
        extensions: dict[str, object] | None = None,
    ) -> bytes:
        """Return the CBOR attestation object a device sends for ``client_data_hash``.

        The object is ``{"fmt", "attStmt": {"x5c": [credCert, intermediate], "receipt"},
        "authData"}``. The credential certificate is valid from ``now`` minus one day to
        ``now`` plus two days unless bounds are given, and its nonce extension holds
        SHA-256(authData || client_data_hash) unless ``nonce`` overrides it.
        ``leaf_public_key`` puts a different key into the certificate while authData keeps the
        device's key, ``x5c`` replaces the whole chain (no leaf is issued then), and
        ``extra_top_level`` adds keys to the top-level map. ``ios27_extensions`` is a
        shorthand for ``extensions=IOS27_EXTENSIONS``; the remaining keyword arguments are
        passed to ``auth_data``.
        """
        if ios27_extensions:
            if extensions is not None:
                raise ValueError("pass either ios27_extensions or extensions, not both")
            extensions = dict(IOS27_EXTENSIONS)
        auth_data = self.auth_data(
            rp_id=rp_id,
            flags=flags,
            sign_count=sign_count,
            aaguid=aaguid,
            credential_id=credential_id,
            cose_key=cose_key,
            extensions=extensions,
        )
        if x5c is None:
            leaf = self.ca.issue_leaf(
                public_key=(
                    self.private_key.public_key() if leaf_public_key is None else leaf_public_key
                ),
                nonce_extension_value=nonce_extension(
                    _sha256(auth_data + client_data_hash) if nonce is None else nonce
                ),
                not_before=now - timedelta(days=1) if leaf_not_before is None else leaf_not_before,
                not_after=now + timedelta(days=2) if leaf_not_after is None else leaf_not_after,
            )
            x5c = [leaf.public_bytes(serialization.Encoding.DER), self.ca.intermediate_der]
        obj: dict[str, object] = {
            "fmt": fmt,
            "attStmt": {"x5c": x5c, "receipt": receipt},
            "authData": auth_data,
        }
        if extra_top_level:
            obj.update(extra_top_level)
        return cbor2.dumps(obj, canonical=True)

    def assertion_object(
        self,
        client_data_hash: bytes,
        *,
        counter: int | None = None,
        rp_id: str | None = None,
        flags: int = 0x40,
        extensions: dict[str, object] | None = None,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        """Return the CBOR assertion object ``{"signature", "authenticatorData"}``.

        authenticatorData is SHA-256(rp_id or app_id) | flags (1) | counter (4, big-endian),
        followed by the CBOR ``extensions`` map when it is not None. The signature is DER
        ECDSA P-256 with SHA-256 over nonce = SHA-256(authenticatorData || client_data_hash),
        so the nonce is hashed again, as devices do. ``counter`` defaults to the device's last
        counter plus one; whichever counter is used becomes the device's ``counter``.
        ``signing_key`` signs with another key to forge a bad signature.
        """
        used = self.counter + 1 if counter is None else counter
        authenticator_data = self._rp_id_hash(rp_id) + struct.pack(">BI", flags, used)
        if extensions is not None:
            authenticator_data += cbor2.dumps(extensions, canonical=True)
        nonce = _sha256(authenticator_data + client_data_hash)
        key = self.private_key if signing_key is None else signing_key
        signature = key.sign(nonce, ec.ECDSA(hashes.SHA256()))
        self.counter = used
        return cbor2.dumps(
            {"signature": signature, "authenticatorData": authenticator_data}, canonical=True
        )

    def registration_body(self, challenge: str, *, now: datetime, **kwargs: Any) -> dict[str, str]:
        """Return the plugin's JSON registration body for ``challenge``.

        The token attests SHA-256 of the UTF-8 challenge; ``kwargs`` go to
        ``attestation_object``.
        """
        token = self.attestation_object(client_data_hash(challenge), now=now, **kwargs)
        return {
            "platform": PLUGIN_PLATFORM,
            "format": PLUGIN_FORMAT,
            "keyId": self.key_id_b64,
            "challenge": challenge,
            "token": base64.b64encode(token).decode("ascii"),
        }

    def assertion_body(self, payload: str, **kwargs: Any) -> dict[str, str]:
        """Return the plugin's JSON assertion body for ``payload``.

        The token asserts SHA-256 of the UTF-8 payload; ``kwargs`` go to ``assertion_object``.
        """
        token = self.assertion_object(client_data_hash(payload), **kwargs)
        return {
            "platform": PLUGIN_PLATFORM,
            "format": PLUGIN_FORMAT,
            "keyId": self.key_id_b64,
            "payload": payload,
            "token": base64.b64encode(token).decode("ascii"),
        }
