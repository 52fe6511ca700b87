"""The test suite's App Attest data: the package's device generator, plus Apple-shaped receipts.

Devices and the throwaway App Attest CA come from ``worker.simulator.devices``, the one
generator, which lives in the package so that ``appattest simulate`` can mint devices too; they
are re-exported here for the tests and benchmarks. Receipts (the PKCS#7 in ``attStmt.receipt``)
are only ever verified by tests, so their generator stays here.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from worker.simulator.devices import (
    AAGUID_DEVELOPMENT,
    AAGUID_PRODUCTION,
    APP_ID,
    DEFAULT_NOT_AFTER,
    DEFAULT_NOT_BEFORE,
    DEFAULT_RECEIPT,
    INTERMEDIATE_NAME,
    IOS27_EXTENSIONS,
    LEAF_KEY_USAGE,
    NONCE_EXTENSION_OID,
    PLUGIN_FORMAT,
    PLUGIN_PLATFORM,
    ROOT_NAME,
    Device,
    TestCA,
    ca_key_usage,
    client_data_hash,
    default_ca,
    nonce_extension,
    subject_name,
    uncompressed_point,
)

__all__ = [
    "AAGUID_DEVELOPMENT",
    "AAGUID_PRODUCTION",
    "APP_ID",
    "DEFAULT_RECEIPT",
    "INTERMEDIATE_NAME",
    "IOS27_EXTENSIONS",
    "NONCE_EXTENSION_OID",
    "PLUGIN_FORMAT",
    "PLUGIN_PLATFORM",
    "RECEIPT_INTERMEDIATE_MARKER_OID",
    "RECEIPT_INTERMEDIATE_NAME",
    "RECEIPT_ROOT_NAME",
    "RECEIPT_SIGNER_MARKER_OID",
    "RECEIPT_SIGNER_NAME",
    "ROOT_NAME",
    "Device",
    "ReceiptCA",
    "TestCA",
    "client_data_hash",
    "default_ca",
    "make_receipt",
    "nonce_extension",
    "receipt_content",
    "sign_receipt_content",
    "uncompressed_point",
]


# --- App Attest receipts ------------------------------------------------------------------
#
# A receipt is a PKCS#7 SignedData signed by "Application Attestation Fraud Receipt Signing",
# issued by "Apple Application Integration CA 5 - G1" under "Apple Root CA - G3". ``ReceiptCA``
# mirrors that chain (names prefixed with "Test", same key types and marker extensions) and
# ``make_receipt`` encodes receipts the way Apple does: BER with indefinite lengths and the
# content in 1000-byte segments, as in attestations, or DER, as Apple's fraud-metric server
# returns them. The encoder below is written independently of the verifier's reader.

RECEIPT_ROOT_NAME = "Test Apple Root CA - G3"
RECEIPT_INTERMEDIATE_NAME = "Test Apple Application Integration CA 5 - G1"
RECEIPT_SIGNER_NAME = "Test Application Attestation Fraud Receipt Signing"
RECEIPT_SIGNER_MARKER_OID = x509.ObjectIdentifier("1.2.840.113635.100.12.15")
RECEIPT_INTERMEDIATE_MARKER_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.2.3")
_DER_NULL = b"\x05\x00"  # Apple's marker extensions hold an ASN.1 NULL.

# DER encodings of the object identifiers a receipt uses, written out by hand.
_DER_OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # 1.2.840.113549.1.7.2
_DER_OID_DATA = bytes.fromhex("06092a864886f70d010701")  # 1.2.840.113549.1.7.1
_DER_OID_SHA256 = bytes.fromhex("0609608648016503040201")  # 2.16.840.1.101.3.4.2.1
_DER_OID_ECDSA_SHA256 = bytes.fromhex("06082a8648ce3d040302")  # 1.2.840.10045.4.3.2
_RECEIPT_SEGMENT = 1000  # Apple splits the BER content into segments of this size.


def _marker(oid: x509.ObjectIdentifier) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(oid, _DER_NULL)


def _der(tag: int, content: bytes) -> bytes:
    """One DER element: identifier, definite length, content."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _ber_indefinite(tag: int, *parts: bytes) -> bytes:
    """One constructed BER element with indefinite length, closed by end-of-contents."""
    return bytes([tag, 0x80]) + b"".join(parts) + b"\x00\x00"


def _der_integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("only non-negative integers occur in receipts")
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _receipt_time(instant: datetime) -> bytes:
    """Apple's format: RFC 3339 in UTC with milliseconds, e.g. 2020-11-21T22:13:02.796Z."""
    utc = instant.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z".encode("ascii")


def _issue_receipt_signer(
    *,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    marker: bool = True,
    key_usage: x509.KeyUsage = LEAF_KEY_USAGE,
    extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue a P-256 receipt signing leaf, signed with ecdsa-with-SHA256 by ``issuer_key``.

    It carries a critical basicConstraints CA:false, an authorityKeyIdentifier, a
    subjectKeyIdentifier, a critical ``key_usage`` (digitalSignature), the signer marker unless
    ``marker`` is False, and ``extra_extensions`` with their criticality.
    """
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    signer_key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name(RECEIPT_SIGNER_NAME))
        .issuer_name(issuer_cert.subject)
        .public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False
        )
        .add_extension(key_usage, critical=True)
    )
    if marker:
        builder = builder.add_extension(_marker(RECEIPT_SIGNER_MARKER_OID), critical=False)
    for extension, critical in extra_extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256()), signer_key


@dataclass(frozen=True)
class ReceiptCA:
    """A throwaway receipt-signing chain shaped like Apple's.

    The root is P-384 and signs the P-256 intermediate with ecdsa-with-SHA384; the intermediate
    signs the P-256 signing leaf with ecdsa-with-SHA256. The intermediate and leaf carry Apple's
    marker extensions (1.2.840.113635.100.6.2.3 and 1.2.840.113635.100.12.15) unless told
    otherwise. Two ``ReceiptCA.create()`` calls give chains with identical names and different
    keys.
    """

    root_cert: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate_cert: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    signer_cert: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        *,
        not_before: datetime = DEFAULT_NOT_BEFORE,
        not_after: datetime = DEFAULT_NOT_AFTER,
        intermediate_marker: bool = True,
    ) -> ReceiptCA:
        """Generate a root, an intermediate and a signing leaf, all valid from ``not_before``
        to ``not_after``. ``intermediate_marker=False`` leaves out the intermediate's marker."""
        root_key = ec.generate_private_key(ec.SECP384R1())
        root_subject = subject_name(RECEIPT_ROOT_NAME)
        root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
        root_cert = (
            x509.CertificateBuilder()
            .subject_name(root_subject)
            .issuer_name(root_subject)
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(root_ski, critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ca_key_usage(), critical=True)
            .sign(root_key, hashes.SHA384())
        )
        intermediate_key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject_name(RECEIPT_INTERMEDIATE_NAME))
            .issuer_name(root_subject)
            .public_key(intermediate_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(intermediate_key.public_key()),
                critical=False,
            )
            .add_extension(ca_key_usage(), critical=True)
        )
        if intermediate_marker:
            builder = builder.add_extension(
                _marker(RECEIPT_INTERMEDIATE_MARKER_OID), critical=False
            )
        intermediate_cert = builder.sign(root_key, hashes.SHA384())
        signer_cert, signer_key = _issue_receipt_signer(
            issuer_cert=intermediate_cert,
            issuer_key=intermediate_key,
            not_before=not_before,
            not_after=not_after,
        )
        return cls(
            root_cert=root_cert,
            root_key=root_key,
            intermediate_cert=intermediate_cert,
            intermediate_key=intermediate_key,
            signer_cert=signer_cert,
            signer_key=signer_key,
        )

    def with_signer(
        self,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        marker: bool = True,
        key_usage: x509.KeyUsage = LEAF_KEY_USAGE,
        issued_by_root: bool = False,
        extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> ReceiptCA:
        """Return a copy of this CA with a freshly issued signing leaf and key.

        The leaf is valid from ``not_before`` to ``not_after`` (the intermediate's validity by
        default); ``marker``, ``key_usage`` and ``extra_extensions`` are as for
        ``_issue_receipt_signer``. ``issued_by_root`` has the root sign it directly, skipping
        the intermediate.
        """
        issuer_cert, issuer_key = (
            (self.root_cert, self.root_key)
            if issued_by_root
            else (self.intermediate_cert, self.intermediate_key)
        )
        signer_cert, signer_key = _issue_receipt_signer(
            issuer_cert=issuer_cert,
            issuer_key=issuer_key,
            not_before=(
                self.intermediate_cert.not_valid_before_utc if not_before is None else not_before
            ),
            not_after=(
                self.intermediate_cert.not_valid_after_utc if not_after is None else not_after
            ),
            marker=marker,
            key_usage=key_usage,
            extra_extensions=extra_extensions,
        )
        return dataclasses.replace(self, signer_cert=signer_cert, signer_key=signer_key)

    @cached_property
    def root_pem(self) -> bytes:
        """The root certificate in PEM form, as a receipt verifier would pin it."""
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        """The certificates Apple includes in a receipt: signer, intermediate and root."""
        return (self.signer_cert, self.intermediate_cert, self.root_cert)


def receipt_content(fields: Sequence[tuple[int, bytes]], *, der: bool = False) -> bytes:
    """Encode receipt fields as Apple does: SET OF SEQUENCE {type, version 1, OCTET STRING}.

    The fields keep their order, as in attestation receipts, unless ``der`` sorts them by
    encoding, as DER requires and Apple's server does.
    """
    entries = [
        _der(0x30, _der_integer(kind) + _der_integer(1) + _der(0x04, value))
        for kind, value in fields
    ]
    if der:
        entries.sort()
    return _der(0x31, b"".join(entries))


def sign_receipt_content(
    content: bytes,
    *,
    ca: ReceiptCA,
    der: bool = False,
    certificates: Sequence[x509.Certificate] | None = None,
) -> bytes:
    """Wrap ``content`` in a PKCS#7 SignedData signed by ``ca``'s signing leaf.

    There are no signed attributes, so the ECDSA-SHA256 signature covers ``content`` itself.
    ``certificates`` replaces the included certificates (signer, intermediate, root by
    default). BER with indefinite lengths and 1000-byte content segments unless ``der``.
    """
    signature = ca.signer_key.sign(content, ec.ECDSA(hashes.SHA256()))
    sha256 = _der(0x30, _DER_OID_SHA256 + _DER_NULL)
    signer_info = _der(
        0x30,
        _der_integer(1)
        + _der(
            0x30,
            ca.signer_cert.issuer.public_bytes() + _der_integer(ca.signer_cert.serial_number),
        )
        + sha256
        + _der(0x30, _DER_OID_ECDSA_SHA256)
        + _der(0x04, signature),
    )
    certs = b"".join(
        cert.public_bytes(serialization.Encoding.DER)
        for cert in (ca.certificates if certificates is None else certificates)
    )
    if der:
        encap = _der(0x30, _DER_OID_DATA + _der(0xA0, _der(0x04, content)))
        signed_data = _der(
            0x30,
            _der_integer(1)
            + _der(0x31, sha256)
            + encap
            + _der(0xA0, certs)
            + _der(0x31, signer_info),
        )
        return _der(0x30, _DER_OID_SIGNED_DATA + _der(0xA0, signed_data))
    segments = [
        _der(0x04, content[i : i + _RECEIPT_SEGMENT])
        for i in range(0, len(content), _RECEIPT_SEGMENT)
    ]
    encap = _ber_indefinite(
        0x30, _DER_OID_DATA, _ber_indefinite(0xA0, _ber_indefinite(0x24, *segments))
    )
    signed_data = _ber_indefinite(
        0x30,
        _der_integer(1),
        _der(0x31, sha256),
        encap,
        _ber_indefinite(0xA0, certs),
        _der(0x31, signer_info),
    )
    return _ber_indefinite(0x30, _DER_OID_SIGNED_DATA, _ber_indefinite(0xA0, signed_data))


def make_receipt(
    *,
    ca: ReceiptCA,
    app_id: str,
    credential_certificate_der: bytes,
    client_hash: bytes,
    receipt_type: str = "ATTEST",
    environment: str | None = "production",
    creation_time: datetime,
    not_before: datetime | None = None,
    expiration_time: datetime,
    risk_metric: int | None = None,
    token: str | None = None,
    der: bool = False,
) -> bytes:
    """Return a receipt signed by ``ca``, shaped like Apple's.

    Fields: 2 app id, 3 credCert DER, 4 client hash, 5 token (base64 text; derived from the
    credCert and client hash unless given), 6 type, 7 environment (left out when None), 12
    creation time, 17 risk metric and 19 not-before (when given), 21 expiration time. Times are
    written with millisecond precision. BER as in attestations, or DER as Apple's server returns
    refreshed receipts when ``der`` is True.
    """
    if token is None:
        token = base64.b64encode(
            hashlib.sha512(credential_certificate_der + client_hash).digest()
        ).decode("ascii")
    fields: list[tuple[int, bytes]] = [
        (2, app_id.encode("utf-8")),
        (3, credential_certificate_der),
        (4, client_hash),
        (5, token.encode("ascii")),
        (6, receipt_type.encode("ascii")),
    ]
    if environment is not None:
        fields.append((7, environment.encode("ascii")))
    fields.append((12, _receipt_time(creation_time)))
    if risk_metric is not None:
        fields.append((17, str(risk_metric).encode("ascii")))
    if not_before is not None:
        fields.append((19, _receipt_time(not_before)))
    fields.append((21, _receipt_time(expiration_time)))
    return sign_receipt_content(receipt_content(fields, der=der), ca=ca, der=der)
