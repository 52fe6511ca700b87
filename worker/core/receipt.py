"""App Attest receipts: Apple's signed statement about an attested key, parsed and verified.

A receipt (``attStmt.receipt`` of an attestation, or the body Apple's fraud-metric server
returns) is a PKCS#7 / CMS SignedData. Devices send it in BER with indefinite lengths and the
content split into a constructed OCTET STRING; Apple's server returns it in DER. It has no
signed attributes, so its ECDSA-SHA256 signature covers the content octets themselves. The
content is a SET of SEQUENCE {type INTEGER, version INTEGER, value OCTET STRING}.

The small BER reader here accepts exactly the shape Apple produces and nothing else; the
certificates inside are handed to pyca/cryptography as DER. Every failure, whether of parsing,
signature, chain or expectations, is ``Rejected(receipt_invalid)`` with a precise detail, so
the attestation reason codes keep their meaning.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from worker.core.reasons import Reason, Rejected
from worker.core.trust import TrustStoreError, certificate_fingerprint

__all__ = [
    "APPLE_ROOT_CA_G3_SHA256",
    "MAX_RECEIPT_BYTES",
    "Receipt",
    "ReceiptTrustStore",
    "ReceiptType",
    "parse_receipt",
    "verify_receipt",
]

# Real receipts are about 3.7 KiB; the bound is enforced before a single byte is parsed.
MAX_RECEIPT_BYTES: Final = 64 * 1024

# SHA-256 of the DER of "Apple Root CA - G3" (valid 2014-04-30 to 2039-04-30).
APPLE_ROOT_CA_G3_SHA256: Final = bytes.fromhex(
    "63343ABFB89A6A03EBB57E9B3F5FA7BE7C4F5C756F3017B3A8C488C3653E9179"
)
_APPLE_ROOT_RESOURCE: Final = "apple-root-ca-g3.pem"

# Apple Root CA - G3 anchors many Apple PKIs, some with leaf keys that developers hold (Apple
# Pay payment processing certificates, for one). A chain to that root alone therefore proves
# nothing about who signed a receipt. The role is bound by the marker extensions on the fraud
# receipt signing leaf and on its "Apple Application Integration" intermediate, the way Apple
# tells Apple Pay verifiers to bind roles under this same root. Apple does not document these
# two OIDs for receipts; every real receipt we hold carries both.
RECEIPT_SIGNER_MARKER_OID: Final = x509.ObjectIdentifier("1.2.840.113635.100.12.15")
RECEIPT_INTERMEDIATE_MARKER_OID: Final = x509.ObjectIdentifier("1.2.840.113635.100.6.2.3")

ReceiptType = Literal["ATTEST", "RECEIPT"]

# BER identifier octets used by receipts (universal class unless noted).
_INTEGER: Final = 0x02
_BIT_STRING: Final = 0x03
_OCTET_STRING: Final = 0x04
_OCTET_STRING_CONSTRUCTED: Final = 0x24
_NULL: Final = 0x05
_OID: Final = 0x06
_SEQUENCE: Final = 0x30
_SET: Final = 0x31
_CONTEXT_0_CONSTRUCTED: Final = 0xA0
_CONTEXT_1_CONSTRUCTED: Final = 0xA1
_CONSTRUCTED_BIT: Final = 0x20

# Only indefinite-length elements are scanned for their end; Apple nests six of them.
_MAX_NESTING: Final = 16
_MAX_CERTIFICATES: Final = 8
# The verified path is leaf -> "Apple Application Integration CA 5 - G1" -> root.
_CHAIN_LENGTH: Final = 3

_RFC3339_UTC = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z", re.ASCII
)
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,17}", re.ASCII)

# Receipt field types, as Apple numbers them.
_APP_ID: Final = 2
_CREDENTIAL_CERTIFICATE: Final = 3
_CLIENT_HASH: Final = 4
_TOKEN: Final = 5
_RECEIPT_TYPE: Final = 6
_ENVIRONMENT: Final = 7
_CREATION_TIME: Final = 12
_RISK_METRIC: Final = 17
_NOT_BEFORE: Final = 19
_EXPIRATION_TIME: Final = 21
_REQUIRED_FIELDS: Final = frozenset(
    {_APP_ID, _CREDENTIAL_CERTIFICATE, _CLIENT_HASH, _TOKEN, _RECEIPT_TYPE}
    | {_CREATION_TIME, _EXPIRATION_TIME}
)


def _encode_oid(dotted: str) -> bytes:
    """The DER content octets of an OBJECT IDENTIFIER, to compare against parsed ones."""
    arcs = [int(arc) for arc in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


_OID_SIGNED_DATA: Final = _encode_oid("1.2.840.113549.1.7.2")
_OID_DATA: Final = _encode_oid("1.2.840.113549.1.7.1")
_OID_SHA256: Final = _encode_oid("2.16.840.1.101.3.4.2.1")
_OID_ECDSA_WITH_SHA256: Final = _encode_oid("1.2.840.10045.4.3.2")


def _invalid(detail: str) -> Rejected:
    return Rejected(Reason.RECEIPT_INVALID, detail)


@dataclass(frozen=True)
class Receipt:
    """A receipt decoded into typed fields; by itself, nothing in it is verified.

    ``credential_certificate`` is field 3 (Apple calls it the attested public key): the DER of
    the credCert the receipt was issued for. ``client_hash`` is field 4; in refreshed
    (``RECEIPT``) receipts Apple returns it mangled, so it must not be compared there.
    ``environment`` is field 7 when present (``sandbox`` in every real receipt we hold, all
    from the development environment). ``risk_metric`` (17) and ``not_before`` (19) appear in
    refreshed receipts only. ``signer`` is the certificate that signed the content and
    ``certificates`` every certificate the receipt carried (Apple includes the signer, its
    intermediate and the root); none of them is trusted by parsing.
    """

    app_id: str
    credential_certificate: bytes = field(repr=False)
    client_hash: bytes
    token: str
    receipt_type: ReceiptType
    environment: str | None
    creation_time: datetime
    risk_metric: int | None
    not_before: datetime | None
    expiration_time: datetime
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...] = field(repr=False)
    signature: bytes = field(repr=False)
    content: bytes = field(repr=False)


@dataclass(frozen=True)
class ReceiptTrustStore:
    """The root a receipt's signing chain must end in.

    Build it with ``ReceiptTrustStore.apple()`` in production (Apple Root CA - G3, pinned).
    ``ReceiptTrustStore.replacing_apple_root`` is the explicit opt-in for tests; there is no
    way to get a store that trusts both, or nothing. A root whose SHA-256 is not ``fingerprint``
    is a construction error (``TrustStoreError``).
    """

    root: x509.Certificate
    fingerprint: bytes
    is_apple: bool
    store: Store = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not hmac.compare_digest(certificate_fingerprint(self.root), self.fingerprint):
            raise TrustStoreError(
                f"root {self.root.subject.rfc4514_string()} does not match its pinned fingerprint"
            )
        object.__setattr__(self, "store", Store([self.root]))

    @classmethod
    def apple(cls) -> ReceiptTrustStore:
        """Apple Root CA - G3, embedded in this package and pinned by fingerprint.

        Raises ``TrustStoreError`` if the embedded file was altered.
        """
        pem = resources.files("worker.core.data").joinpath(_APPLE_ROOT_RESOURCE).read_bytes()
        return cls(root=_load_single_pem(pem), fingerprint=APPLE_ROOT_CA_G3_SHA256, is_apple=True)

    @classmethod
    def replacing_apple_root(cls, pem: bytes) -> ReceiptTrustStore:
        """Trust the single root certificate in ``pem`` *instead of* Apple Root CA - G3.

        A deliberate choice for tests: real receipts no longer verify. Raises
        ``TrustStoreError`` for an empty or unreadable PEM or more than one certificate.
        """
        root = _load_single_pem(pem)
        return cls(root=root, fingerprint=certificate_fingerprint(root), is_apple=False)


def _load_single_pem(pem: bytes) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TrustStoreError(f"no readable PEM certificate: {exc}") from exc
    if len(certs) != 1:
        raise TrustStoreError("a receipt trust store holds exactly one root certificate")
    return certs[0]


# --- A strict BER reader ------------------------------------------------------------------


@dataclass(frozen=True)
class _Element:
    """One BER element of the receipt: its identifier octet and where its parts lie."""

    tag: int
    start: int
    content_start: int
    content_end: int
    end: int


class _Ber:
    """Reads BER elements of one buffer on demand.

    Only the low tag-number form is accepted; lengths have at most four octets; indefinite
    lengths only on constructed elements, nested at most ``_MAX_NESTING`` deep. A definite
    element is never looked into unless the schema asks for its children, so the DER
    certificates inside are skipped by length. Each element is read once (memoised by offset),
    so reading is linear in the input.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._read: dict[int, _Element] = {}

    def element(self, pos: int, limit: int, depth: int = 0) -> _Element:
        """The element starting at ``pos``, which must end no later than ``limit``."""
        known = self._read.get(pos)
        if known is not None:
            if known.end > limit:
                raise _invalid("BER element overruns its parent")
            return known
        data = self._data
        if pos + 2 > limit:
            raise _invalid("truncated BER element")
        tag = data[pos]
        if tag == 0:
            raise _invalid("unexpected BER end-of-contents marker")
        if tag & 0x1F == 0x1F:
            raise _invalid("BER high tag numbers do not occur in receipts")
        first = data[pos + 1]
        content_start = pos + 2
        if first == 0x80:
            if not tag & _CONSTRUCTED_BIT:
                raise _invalid("indefinite length on a primitive BER element")
            if depth >= _MAX_NESTING:
                raise _invalid("BER indefinite lengths nest too deeply")
            content_end = self._find_end_of_contents(content_start, limit, depth + 1)
            end = content_end + 2
        else:
            if first < 0x80:
                length = first
            else:
                count = first & 0x7F
                if count > 4:
                    raise _invalid("BER length does not fit in four octets")
                if content_start + count > limit:
                    raise _invalid("truncated BER length")
                length = int.from_bytes(data[content_start : content_start + count], "big")
                content_start += count
            content_end = end = content_start + length
            if end > limit:
                raise _invalid("truncated BER element")
        element = _Element(tag, pos, content_start, content_end, end)
        self._read[pos] = element
        return element

    def _find_end_of_contents(self, pos: int, limit: int, depth: int) -> int:
        data = self._data
        while True:
            if pos + 2 > limit:
                raise _invalid("BER end-of-contents marker missing")
            if data[pos] == 0:
                if data[pos + 1] != 0:
                    raise _invalid("malformed BER end-of-contents marker")
                return pos
            pos = self.element(pos, limit, depth).end

    def children(self, parent: _Element) -> list[_Element]:
        """The elements that exactly fill ``parent``'s contents."""
        if not parent.tag & _CONSTRUCTED_BIT:
            raise _invalid("expected a constructed BER element")
        found = []
        pos = parent.content_start
        while pos < parent.content_end:
            child = self.element(pos, parent.content_end)
            found.append(child)
            pos = child.end
        return found

    def content(self, element: _Element) -> bytes:
        """The content octets of a primitive element."""
        return self._data[element.content_start : element.content_end]

    def encoding(self, element: _Element) -> bytes:
        """The whole encoding (header and contents) of an element."""
        return self._data[element.start : element.end]

    def expect(self, element: _Element, tag: int, what: str) -> _Element:
        """Return ``element`` if its identifier is ``tag``; reject the receipt otherwise."""
        if element.tag != tag:
            raise _invalid(f"{what}: expected BER tag 0x{tag:02x}, found 0x{element.tag:02x}")
        return element

    def sequence(self, element: _Element, tag: int, what: str, count: int) -> list[_Element]:
        """The children of a constructed element with ``tag``, which must number ``count``."""
        children = self.children(self.expect(element, tag, what))
        if len(children) != count:
            raise _invalid(f"{what}: expected {count} elements, found {len(children)}")
        return children

    def integer(self, element: _Element, what: str) -> int:
        """A minimally encoded INTEGER (X.690 8.3.2 applies to BER as well)."""
        body = self.content(self.expect(element, _INTEGER, what))
        if not body:
            raise _invalid(f"{what}: empty INTEGER")
        if len(body) > 1 and (
            (body[0] == 0 and body[1] < 0x80) or (body[0] == 0xFF and body[1] >= 0x80)
        ):
            raise _invalid(f"{what}: INTEGER is not minimally encoded")
        return int.from_bytes(body, "big", signed=True)

    def octets(self, element: _Element, what: str, depth: int = 0) -> bytes:
        """The value of an OCTET STRING, joining the segments of a constructed one."""
        if element.tag == _OCTET_STRING:
            return self.content(element)
        if element.tag != _OCTET_STRING_CONSTRUCTED:
            raise _invalid(f"{what}: expected an OCTET STRING, found 0x{element.tag:02x}")
        if depth >= _MAX_NESTING:
            raise _invalid(f"{what}: OCTET STRING segments nest too deeply")
        return b"".join(self.octets(part, what, depth + 1) for part in self.children(element))

    def oid(self, element: _Element, expected: bytes, what: str) -> None:
        """Require an OBJECT IDENTIFIER equal to ``expected`` (DER content octets)."""
        if self.content(self.expect(element, _OID, what)) != expected:
            raise _invalid(f"{what}: unexpected object identifier")

    def algorithm(self, element: _Element, oid: bytes, what: str, *, null_ok: bool) -> None:
        """Require AlgorithmIdentifier ``oid``; parameters absent, or NULL when allowed."""
        parts = self.children(self.expect(element, _SEQUENCE, what))
        if not parts:
            raise _invalid(f"{what}: empty AlgorithmIdentifier")
        self.oid(parts[0], oid, what)
        params = parts[1:]
        if not params:
            return
        if (
            null_ok
            and len(params) == 1
            and params[0].tag == _NULL
            and params[0].content_start == params[0].content_end
        ):
            return
        raise _invalid(f"{what}: unexpected algorithm parameters")


# --- Parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SignedData:
    content: bytes
    certificates: tuple[x509.Certificate, ...]
    signer: x509.Certificate
    signature: bytes


def _parse_signed_data(raw: bytes) -> _SignedData:
    ber = _Ber(raw)
    top = ber.element(0, len(raw))
    if top.end != len(raw):
        raise _invalid(f"{len(raw) - top.end} bytes follow the receipt")
    # ContentInfo ::= SEQUENCE { contentType signedData, content [0] EXPLICIT SignedData }
    content_type, explicit = ber.sequence(top, _SEQUENCE, "ContentInfo", 2)
    ber.oid(content_type, _OID_SIGNED_DATA, "ContentInfo.contentType")
    (signed_data,) = ber.sequence(explicit, _CONTEXT_0_CONSTRUCTED, "ContentInfo.content", 1)
    # SignedData ::= SEQUENCE { version 1, digestAlgorithms {sha256}, encapContentInfo,
    #   certificates [0] IMPLICIT, signerInfos } -- no crls in receipts.
    parts = ber.sequence(signed_data, _SEQUENCE, "SignedData", 5)
    version, digests, encap, certificates, signer_infos = parts
    if ber.integer(version, "SignedData.version") != 1:
        raise _invalid("SignedData.version is not 1")
    (digest,) = ber.sequence(digests, _SET, "SignedData.digestAlgorithms", 1)
    ber.algorithm(digest, _OID_SHA256, "SignedData.digestAlgorithms", null_ok=True)
    content = _parse_encapsulated_content(ber, encap)
    included = _parse_certificates(ber, certificates)
    signer, signature = _parse_signer_info(ber, signer_infos, included)
    return _SignedData(
        content=content,
        certificates=tuple(entry.certificate for entry in included),
        signer=signer,
        signature=signature,
    )


def _parse_encapsulated_content(ber: _Ber, encap: _Element) -> bytes:
    # EncapsulatedContentInfo ::= SEQUENCE { eContentType data, eContent [0] EXPLICIT OCTETS }
    content_type, explicit = ber.sequence(encap, _SEQUENCE, "encapContentInfo", 2)
    ber.oid(content_type, _OID_DATA, "encapContentInfo.eContentType")
    (octets,) = ber.sequence(explicit, _CONTEXT_0_CONSTRUCTED, "encapContentInfo.eContent", 1)
    return ber.octets(octets, "encapContentInfo.eContent")


@dataclass(frozen=True)
class _Included:
    """A certificate carried in the receipt, with the issuer and serial that identify it."""

    certificate: x509.Certificate
    issuer_der: bytes
    serial_number: int


def _load_certificate(ber: _Ber, entry: _Element) -> _Included:
    # Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
    #   signature, issuer, ... }, signatureAlgorithm, signatureValue BIT STRING }.
    # The serial and issuer are read here, from the bytes as sent, to find the signer.
    # pyca/cryptography only warns about a serial number that is not positive (RFC 5280
    # forbids it, and the warning would be an error under a strict test run); such a
    # certificate is refused here instead.
    tbs_element, _, signature = ber.sequence(entry, _SEQUENCE, "certificate", 3)
    # pyca/cryptography ignores the unused-bits octet of a signature BIT STRING, which would let
    # a certificate change encoding and still verify; a signature is whole octets.
    body = ber.content(ber.expect(signature, _BIT_STRING, "certificate signature"))
    if not body or body[0] != 0:
        raise _invalid("certificate signature is not a whole number of octets")
    tbs = ber.children(ber.expect(tbs_element, _SEQUENCE, "tbsCertificate"))
    at = 1 if tbs and tbs[0].tag == _CONTEXT_0_CONSTRUCTED else 0
    if len(tbs) < at + 3:
        raise _invalid("tbsCertificate: too few elements")
    serial_number = ber.integer(tbs[at], "certificate serial number")
    if serial_number <= 0:
        raise _invalid("certificate serial number is not positive")
    issuer_der = ber.encoding(ber.expect(tbs[at + 2], _SEQUENCE, "certificate issuer"))
    try:
        cert = x509.load_der_x509_certificate(ber.encoding(entry))
        # Names, key and extensions are decoded lazily; decode them now, so that a malformed
        # certificate is a malformed receipt here rather than a library error later on.
        _ = (cert.subject, cert.issuer, cert.public_key(), cert.extensions)
    except (
        ValueError,
        UnsupportedAlgorithm,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        # cryptography 48 raises KeyError for a name attribute of an unknown ASN.1 string type.
        KeyError,
    ) as exc:
        raise _invalid("SignedData.certificates holds a malformed certificate") from exc
    return _Included(certificate=cert, issuer_der=issuer_der, serial_number=serial_number)


def _parse_certificates(ber: _Ber, element: _Element) -> tuple[_Included, ...]:
    entries = ber.children(ber.expect(element, _CONTEXT_0_CONSTRUCTED, "SignedData.certificates"))
    if not 1 <= len(entries) <= _MAX_CERTIFICATES:
        raise _invalid(f"SignedData.certificates holds {len(entries)} certificates")
    return tuple(_load_certificate(ber, entry) for entry in entries)


def _parse_signer_info(
    ber: _Ber, element: _Element, certs: tuple[_Included, ...]
) -> tuple[x509.Certificate, bytes]:
    (info,) = ber.sequence(element, _SET, "SignedData.signerInfos", 1)
    # SignerInfo ::= SEQUENCE { version 1, sid IssuerAndSerialNumber, digestAlgorithm sha256,
    #   signatureAlgorithm ecdsa-with-SHA256, signature } -- no signed or unsigned attributes,
    #   so the signature covers the content octets directly.
    children = ber.children(ber.expect(info, _SEQUENCE, "SignerInfo"))
    if any(child.tag in (_CONTEXT_0_CONSTRUCTED, _CONTEXT_1_CONSTRUCTED) for child in children):
        raise _invalid("SignerInfo carries attributes, which receipts never do")
    if len(children) != 5:
        raise _invalid(f"SignerInfo: expected 5 elements, found {len(children)}")
    version, sid, digest, algorithm, signature = children
    if ber.integer(version, "SignerInfo.version") != 1:
        raise _invalid("SignerInfo.version is not 1 (issuer and serial number)")
    issuer, serial = ber.sequence(sid, _SEQUENCE, "SignerInfo.sid", 2)
    issuer_der = ber.encoding(ber.expect(issuer, _SEQUENCE, "SignerInfo.sid.issuer"))
    serial_number = ber.integer(serial, "SignerInfo.sid.serialNumber")
    ber.algorithm(digest, _OID_SHA256, "SignerInfo.digestAlgorithm", null_ok=True)
    ber.algorithm(algorithm, _OID_ECDSA_WITH_SHA256, "SignerInfo.signatureAlgorithm", null_ok=False)
    signature_value = ber.octets(signature, "SignerInfo.signature")
    matches = [
        included.certificate
        for included in certs
        if included.serial_number == serial_number and included.issuer_der == issuer_der
    ]
    if len(matches) != 1:
        raise _invalid(f"{len(matches)} certificates match the signer's issuer and serial")
    return matches[0], signature_value


def _parse_fields(content: bytes) -> dict[int, bytes]:
    ber = _Ber(content)
    top = ber.element(0, len(content))
    if top.end != len(content):
        raise _invalid("trailing bytes after the receipt's field set")
    fields: dict[int, bytes] = {}
    for entry in ber.children(ber.expect(top, _SET, "receipt fields")):
        kind, version, value = ber.sequence(entry, _SEQUENCE, "receipt field", 3)
        field_type = ber.integer(kind, "receipt field type")
        # Every field Apple has sent so far is version 1; the value's meaning is by type alone.
        ber.integer(version, "receipt field version")
        if field_type in fields:
            raise _invalid(f"receipt field {field_type} appears twice")
        fields[field_type] = ber.octets(value, f"receipt field {field_type}")
    missing = sorted(_REQUIRED_FIELDS - fields.keys())
    if missing:
        raise _invalid(f"receipt lacks fields {missing}")
    return fields


def _text(fields: dict[int, bytes], field_type: int) -> str:
    try:
        text = fields[field_type].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"receipt field {field_type} is not UTF-8 text") from exc
    if not text:
        raise _invalid(f"receipt field {field_type} is empty")
    return text


def _time(fields: dict[int, bytes], field_type: int) -> datetime:
    # Apple writes RFC 3339 UTC instants with milliseconds, e.g. 2020-11-21T22:13:02.796Z.
    match = _RFC3339_UTC.fullmatch(_text(fields, field_type))
    if match is None:
        raise _invalid(f"receipt field {field_type} is not an RFC 3339 UTC time")
    year, month, day, hour, minute, second, fraction = match.groups()
    micros = int((fraction or "0").ljust(6, "0")[:6])
    try:
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, UTC
        )
    except ValueError as exc:
        raise _invalid(f"receipt field {field_type} is not a valid date") from exc


def _risk_metric(fields: dict[int, bytes]) -> int | None:
    if _RISK_METRIC not in fields:
        return None
    # Apple writes the count of recent attestations as decimal ASCII.
    text = _text(fields, _RISK_METRIC)
    if _DECIMAL.fullmatch(text) is None:
        raise _invalid("receipt field 17 (risk metric) is not a decimal count")
    return int(text)


def _receipt_type(fields: dict[int, bytes]) -> ReceiptType:
    text = _text(fields, _RECEIPT_TYPE)
    if text == "ATTEST":
        return "ATTEST"
    if text == "RECEIPT":
        return "RECEIPT"
    raise _invalid("receipt field 6 is neither ATTEST nor RECEIPT")


def parse_receipt(raw: bytes) -> Receipt:
    """Parse a receipt's PKCS#7 envelope and fields without verifying anything.

    Takes the receipt bytes (BER or DER, at most ``MAX_RECEIPT_BYTES``); returns a ``Receipt``.
    Raises ``Rejected(receipt_invalid)`` for oversized, empty, truncated or trailing input and
    for anything that is not the SignedData shape Apple produces: one ECDSA-SHA256 signer
    without attributes, found among the included certificates by issuer and serial number, and
    a content of typed fields with app id, credCert, client hash, token, type, creation and
    expiration time present. Field types this module does not know are skipped, since Apple
    may add some; no type may appear twice.
    """
    if len(raw) > MAX_RECEIPT_BYTES:
        raise _invalid(f"receipt is larger than {MAX_RECEIPT_BYTES} bytes")
    if not raw:
        raise _invalid("receipt is empty")
    signed = _parse_signed_data(raw)
    fields = _parse_fields(signed.content)
    if not fields[_CREDENTIAL_CERTIFICATE]:
        raise _invalid("receipt field 3 (credCert) is empty")
    return Receipt(
        app_id=_text(fields, _APP_ID),
        credential_certificate=fields[_CREDENTIAL_CERTIFICATE],
        client_hash=fields[_CLIENT_HASH],
        token=_text(fields, _TOKEN),
        receipt_type=_receipt_type(fields),
        environment=_text(fields, _ENVIRONMENT) if _ENVIRONMENT in fields else None,
        creation_time=_time(fields, _CREATION_TIME),
        risk_metric=_risk_metric(fields),
        not_before=_time(fields, _NOT_BEFORE) if _NOT_BEFORE in fields else None,
        expiration_time=_time(fields, _EXPIRATION_TIME),
        signer=signed.signer,
        certificates=signed.certificates,
        signature=signed.signature,
        content=signed.content,
    )


# --- Verification ---------------------------------------------------------------------------


def _check_signature(receipt: Receipt) -> None:
    # CMS without signed attributes: ECDSA-SHA256 over the content octets themselves.
    key = receipt.signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _invalid("receipt signer key is not an elliptic-curve key")
    try:
        key.verify(receipt.signature, receipt.content, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise _invalid("receipt signature does not verify with the signer certificate") from exc


def _signer_key_usage(_policy: Policy, _cert: x509.Certificate, usage: x509.KeyUsage) -> None:
    if not usage.digital_signature:
        raise ValueError("the receipt signer's key usage lacks digitalSignature")


def _signer_not_a_ca(
    _policy: Policy, _cert: x509.Certificate, constraints: x509.BasicConstraints | None
) -> None:
    if constraints is not None and constraints.ca:
        raise ValueError("the receipt signer is a CA certificate")


# Which profile accepts Apple's real chain and still rejects what it must: the web-PKI
# defaults reject the real signing leaf outright (it has no subjectAltName, being no TLS
# certificate), so the leaf gets the permissive profile, narrowed to what a signing leaf must
# be: a keyUsage with digitalSignature and not a CA. The permissive profile still refuses
# unknown critical extensions, and validity at the verification time is checked for every
# certificate regardless of profile. Apple's intermediate and root satisfy the strict web-PKI
# CA profile, so CA certificates get it in full. Fake roots with Apple's names fail on the
# signatures, since only the pinned root is in the store. What the leaf is *for* is bound
# afterwards by Apple's marker extensions, which no extension policy can express.
_CA_POLICY: Final = ExtensionPolicy.webpki_defaults_ca()
_SIGNER_POLICY: Final = (
    ExtensionPolicy.permit_all()
    .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _signer_key_usage)
    .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _signer_not_a_ca)
)


def _verifier(trust: ReceiptTrustStore, now: datetime) -> ClientVerifier:
    return (
        PolicyBuilder()
        .store(trust.store)
        .time(now)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_SIGNER_POLICY)
        .build_client_verifier()
    )


def _expired_detail(certs: tuple[x509.Certificate, ...], now: datetime) -> str | None:
    for cert in certs:
        name = cert.subject.rfc4514_string()
        if now < cert.not_valid_before_utc:
            return f"receipt certificate {name} is not valid before {now.isoformat()}"
        if now > cert.not_valid_after_utc:
            return f"receipt certificate {name} expired before {now.isoformat()}"
    return None


def _check_chain(receipt: Receipt, trust: ReceiptTrustStore, now: datetime) -> None:
    # The signer chains through an included intermediate to the pinned root at ``now``.
    others = [cert for cert in receipt.certificates if cert is not receipt.signer]
    try:
        verified = _verifier(trust, now).verify(receipt.signer, others)
    except VerificationError as exc:
        detail = _expired_detail((*receipt.certificates, trust.root), now) or (
            f"receipt signer does not chain to the trusted root: {exc}"
        )
        raise _invalid(detail) from exc
    chain: list[x509.Certificate] = verified.chain
    if len(chain) != _CHAIN_LENGTH:
        raise _invalid(f"receipt chain has {len(chain)} certificates, expected {_CHAIN_LENGTH}")
    # Apple includes exactly its chain (signer, intermediate, root). Anything else would be
    # bytes nobody checks, so the receipt would no longer be all verified.
    if any(cert not in chain for cert in receipt.certificates):
        raise _invalid("receipt carries a certificate outside its signing chain")
    # Bind the role: only Apple's receipt signer and its intermediate carry these markers.
    for cert, marker, role in (
        (chain[0], RECEIPT_SIGNER_MARKER_OID, "signer"),
        (chain[1], RECEIPT_INTERMEDIATE_MARKER_OID, "intermediate"),
    ):
        try:
            cert.extensions.get_extension_for_oid(marker)
        except x509.ExtensionNotFound as exc:
            raise _invalid(f"receipt {role} lacks Apple's marker {marker.dotted_string}") from exc


def _check_app_id(receipt: Receipt, expected: str) -> None:
    # The receipt is for this App ID (TEAMID.bundle.id).
    if not hmac.compare_digest(receipt.app_id.encode(), expected.encode()):
        raise _invalid("receipt app id is not the expected app id")


def _check_credential_certificate(receipt: Receipt, expected: bytes) -> None:
    # An ATTEST receipt names the credCert of the attestation it came with.
    if not hmac.compare_digest(receipt.credential_certificate, expected):
        raise _invalid("receipt credCert is not the attestation's credCert")


def _check_type(receipt: Receipt, expected: str) -> None:
    # ATTEST with an attestation, RECEIPT from Apple's fraud-metric server.
    if receipt.receipt_type != expected:
        raise _invalid(f"receipt type is {receipt.receipt_type}, expected {expected}")


def verify_receipt(
    *,
    receipt: bytes,
    trust: ReceiptTrustStore,
    now: datetime,
    expected_app_id: str | None = None,
    expected_credential_certificate: bytes | None = None,
    expected_type: str | None = None,
) -> Receipt:
    """Parse a receipt and verify its signature, signing chain and the given expectations.

    Takes the receipt bytes, the trust store (``ReceiptTrustStore.apple()`` in production), the
    verification instant and optional expectations: the App ID, the credCert DER (for ATTEST
    receipts; refreshed ones name the same credCert) and the type (``ATTEST`` or ``RECEIPT``).
    Returns the parsed ``Receipt``. Raises ``Rejected(receipt_invalid)`` for every failure,
    including certificates outside their validity at ``now``. The receipt's own creation,
    not-before and expiration times are returned, not judged: what an old receipt is still good
    for is the caller's policy.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if expected_type is not None and expected_type not in ("ATTEST", "RECEIPT"):
        raise ValueError("expected_type must be ATTEST or RECEIPT")
    parsed = parse_receipt(receipt)
    _check_signature(parsed)
    _check_chain(parsed, trust, now)
    if expected_app_id is not None:
        _check_app_id(parsed, expected_app_id)
    if expected_credential_certificate is not None:
        _check_credential_certificate(parsed, expected_credential_certificate)
    if expected_type is not None:
        _check_type(parsed, expected_type)
    return parsed
