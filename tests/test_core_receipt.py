"""Receipts: Apple's 20 real receipts at their own instants, and forged defects under a test CA."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, partial
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests import factory
from tests.vectors import Vector, b64, load_vectors, verify_at
from worker.core import Reason, Rejected, TrustStore, TrustStoreError
from worker.core.receipt import (
    APPLE_ROOT_CA_G3_SHA256,
    MAX_RECEIPT_BYTES,
    ReceiptTrustStore,
    parse_receipt,
    verify_receipt,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CREATED = datetime(2026, 6, 1, 11, 59, 58, 123000, tzinfo=UTC)
EXPIRES = CREATED + timedelta(days=90)
CLIENT_HASH = bytes(range(32))

_ALL = load_vectors()
_ATTESTATIONS = {v["keyId"]: v for v in _ALL if v.kind == "attestation"}
RECEIPTS = [v for v in _ALL if v.kind == "receipt"]
REFRESHED = [v for v in RECEIPTS if v["properties"]["type"] == "RECEIPT"]


def _ids(vectors: list[Vector]) -> list[str]:
    return [v.id for v in vectors]


def _instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


def _credential_certificate_of(vector: Vector) -> bytes:
    """The credCert of the attestation the receipt belongs to (same key id, same file)."""
    attestation = cbor2.loads(b64(_ATTESTATIONS[vector["keyId"]]["attestation"]))
    der: bytes = attestation["attStmt"]["x5c"][0]
    return der


def _reason(call: Callable[[], object]) -> Reason:
    with pytest.raises(Rejected) as info:
        call()
    return info.value.reason


@cache
def apple() -> ReceiptTrustStore:
    return ReceiptTrustStore.apple()


def test_all_twenty_real_receipts_are_present() -> None:
    assert len(RECEIPTS) == 20
    assert {v["properties"]["type"] for v in RECEIPTS} == {"ATTEST", "RECEIPT"}


# --- Real receipts ------------------------------------------------------------------------


@pytest.mark.parametrize("vector", RECEIPTS, ids=_ids(RECEIPTS))
def test_real_receipt_parses_to_its_decoded_fields(vector: Vector) -> None:
    receipt = parse_receipt(b64(vector["receipt"]))
    expected = vector["properties"]
    assert receipt.app_id == vector["appId"]
    assert receipt.receipt_type == expected["type"]
    assert receipt.environment == expected["environment"]
    assert receipt.token == expected["token"]
    assert base64.b64encode(receipt.client_hash).decode() == expected["clientHashBase64"]
    assert receipt.creation_time == _instant(expected["creationTime"])
    assert receipt.expiration_time == _instant(expected["expirationTime"])
    assert receipt.not_before == _instant(expected["notBefore"])
    assert receipt.risk_metric == expected["riskMetric"]
    # Field 3 is the credCert of the attested key, in ATTEST and RECEIPT receipts alike.
    cert = x509.load_der_x509_certificate(receipt.credential_certificate)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki.decode().strip() == vector["publicKeyPEM"].strip()
    assert receipt.credential_certificate == _credential_certificate_of(vector)
    assert receipt.signer.subject.rfc4514_string() == (
        "C=US,O=Apple Inc.,CN=Application Attestation Fraud Receipt Signing"
    )


@pytest.mark.parametrize("vector", RECEIPTS, ids=_ids(RECEIPTS))
def test_real_receipt_verifies_at_its_verify_at(vector: Vector) -> None:
    receipt = verify_receipt(
        receipt=b64(vector["receipt"]),
        trust=apple(),
        now=verify_at(vector),
        expected_app_id=vector["appId"],
        expected_credential_certificate=_credential_certificate_of(vector),
        expected_type=vector["properties"]["type"],
    )
    assert receipt.app_id == vector["appId"]


@pytest.mark.parametrize("vector", RECEIPTS, ids=_ids(RECEIPTS))
def test_real_receipt_is_rejected_once_its_signer_expired(vector: Vector) -> None:
    raw = b64(vector["receipt"])
    after = parse_receipt(raw).signer.not_valid_after_utc + timedelta(seconds=1)
    assert _reason(lambda: verify_receipt(receipt=raw, trust=apple(), now=after)) == (
        Reason.RECEIPT_INVALID
    )


@pytest.mark.parametrize("vector", RECEIPTS, ids=_ids(RECEIPTS))
def test_real_receipt_does_not_verify_under_the_app_attest_root(vector: Vector) -> None:
    # The trap: receipts are signed under Apple Root CA - G3, not the App Attestation root.
    app_attest_root = TrustStore.apple().roots[0].public_bytes(serialization.Encoding.PEM)
    wrong = ReceiptTrustStore.replacing_apple_root(app_attest_root)
    call = lambda: verify_receipt(  # noqa: E731
        receipt=b64(vector["receipt"]), trust=wrong, now=verify_at(vector)
    )
    assert _reason(call) == Reason.RECEIPT_INVALID


@pytest.mark.parametrize("vector", REFRESHED, ids=_ids(REFRESHED))
def test_refreshed_receipts_carry_a_mangled_client_hash(vector: Vector) -> None:
    # Apple's server decodes the 32-byte client hash as UTF-8 with replacement characters and
    # re-encodes it, so field 4 of a RECEIPT receipt is not the hash: never compare it.
    refreshed = parse_receipt(b64(vector["receipt"]))
    (attest,) = [
        parse_receipt(b64(v["receipt"]))
        for v in RECEIPTS
        if v["keyId"] == vector["keyId"] and v["properties"]["type"] == "ATTEST"
    ]
    assert len(attest.client_hash) == 32
    assert refreshed.client_hash != attest.client_hash
    assert refreshed.client_hash == attest.client_hash.decode("utf-8", "replace").encode()
    assert refreshed.token == attest.token
    assert refreshed.credential_certificate == attest.credential_certificate


def test_real_receipt_with_wrong_expectations_is_rejected() -> None:
    vector = RECEIPTS[0]
    raw, now = b64(vector["receipt"]), verify_at(vector)
    for expectations in (
        {"expected_app_id": "6MURL8TA57.de.vincent-haupert.other"},
        {"expected_credential_certificate": _credential_certificate_of(RECEIPTS[5])},
        {"expected_type": "RECEIPT"},
    ):
        call = partial(verify_receipt, receipt=raw, trust=apple(), now=now, **expectations)
        assert _reason(call) == Reason.RECEIPT_INVALID


@pytest.mark.parametrize("vector", [RECEIPTS[0], REFRESHED[0]], ids=["BER attest", "DER refreshed"])
def test_every_bit_flip_in_a_real_receipt_is_rejected(vector: Vector) -> None:
    # Every byte of a receipt is checked, including the copy of the root Apple includes and the
    # unused-bits octets of the certificate signatures, which pyca/cryptography itself ignores.
    raw, now = b64(vector["receipt"]), verify_at(vector)
    verify_receipt(receipt=raw, trust=apple(), now=now)
    for position in range(len(raw)):
        mutated = bytearray(raw)
        mutated[position] ^= 0x01
        with pytest.raises(Rejected) as info:
            verify_receipt(receipt=bytes(mutated), trust=apple(), now=now)
        assert info.value.reason == Reason.RECEIPT_INVALID, position


def test_every_truncation_of_a_real_receipt_is_invalid() -> None:
    raw = b64(RECEIPTS[0]["receipt"])
    for length in range(len(raw)):
        assert _reason(partial(parse_receipt, raw[:length])) == Reason.RECEIPT_INVALID


# --- Trust store --------------------------------------------------------------------------


def test_apple_receipt_root_is_pinned() -> None:
    store = apple()
    assert store.is_apple
    assert store.fingerprint == APPLE_ROOT_CA_G3_SHA256
    assert store.root.subject.rfc4514_string() == (
        "C=US,O=Apple Inc.,OU=Apple Certification Authority,CN=Apple Root CA - G3"
    )


def test_receipt_root_with_a_wrong_fingerprint_is_a_construction_error(
    receipt_ca: factory.ReceiptCA,
) -> None:
    with pytest.raises(TrustStoreError):
        ReceiptTrustStore(
            root=receipt_ca.root_cert, fingerprint=APPLE_ROOT_CA_G3_SHA256, is_apple=True
        )


@pytest.mark.parametrize(
    "pem", [b"", b"not a pem", b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"]
)
def test_replacing_the_root_needs_a_readable_certificate(pem: bytes) -> None:
    with pytest.raises(TrustStoreError):
        ReceiptTrustStore.replacing_apple_root(pem)


def test_replacing_the_root_takes_exactly_one_certificate(receipt_ca: factory.ReceiptCA) -> None:
    with pytest.raises(TrustStoreError):
        ReceiptTrustStore.replacing_apple_root(receipt_ca.root_pem + receipt_ca.root_pem)


# --- Generated receipts -------------------------------------------------------------------


@pytest.fixture(scope="module")
def receipt_ca() -> factory.ReceiptCA:
    return factory.ReceiptCA.create()


@pytest.fixture(scope="module")
def trust(receipt_ca: factory.ReceiptCA) -> ReceiptTrustStore:
    return ReceiptTrustStore.replacing_apple_root(receipt_ca.root_pem)


@pytest.fixture(scope="module")
def cred_cert() -> bytes:
    device = factory.Device(ca=factory.default_ca())
    der: bytes = cbor2.loads(device.attestation_object(CLIENT_HASH, now=NOW))["attStmt"]["x5c"][0]
    return der


@pytest.fixture(scope="module")
def receipt(receipt_ca: factory.ReceiptCA, cred_cert: bytes) -> bytes:
    return make(receipt_ca, cred_cert)


def make(ca: factory.ReceiptCA, cred_cert: bytes, **overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "ca": ca,
        "app_id": factory.APP_ID,
        "credential_certificate_der": cred_cert,
        "client_hash": CLIENT_HASH,
        "creation_time": CREATED,
        "expiration_time": EXPIRES,
    }
    arguments.update(overrides)
    return factory.make_receipt(**arguments)


@pytest.mark.parametrize("der", [False, True], ids=["BER", "DER"])
def test_generated_attest_receipt_verifies(
    receipt_ca: factory.ReceiptCA, trust: ReceiptTrustStore, cred_cert: bytes, der: bool
) -> None:
    raw = make(receipt_ca, cred_cert, der=der)
    result = verify_receipt(
        receipt=raw,
        trust=trust,
        now=NOW,
        expected_app_id=factory.APP_ID,
        expected_credential_certificate=cred_cert,
        expected_type="ATTEST",
    )
    assert result.app_id == factory.APP_ID
    assert result.credential_certificate == cred_cert
    assert result.client_hash == CLIENT_HASH
    assert result.receipt_type == "ATTEST"
    assert result.environment == "production"
    assert result.creation_time == CREATED
    assert result.expiration_time == EXPIRES
    assert result.risk_metric is None
    assert result.not_before is None
    assert result.signer == receipt_ca.signer_cert
    assert result.certificates == receipt_ca.certificates


def test_generated_ber_receipt_is_shaped_like_apples(
    receipt_ca: factory.ReceiptCA, cred_cert: bytes
) -> None:
    # Indefinite lengths outside, the content in a constructed OCTET STRING of 1000-byte
    # segments, the certificates in an indefinite [0]: as in every real ATTEST receipt.
    raw = make(receipt_ca, cred_cert, app_id="TEAMID1234." + "a" * 600)
    assert raw.startswith(bytes.fromhex("308006092a864886f70d010702a0803080"))
    assert raw.endswith(b"\x00\x00" * 3)
    assert bytes.fromhex("a0802480048203e8") in raw
    assert parse_receipt(raw).app_id == "TEAMID1234." + "a" * 600


def test_generated_refreshed_receipt_verifies(
    receipt_ca: factory.ReceiptCA, trust: ReceiptTrustStore, cred_cert: bytes
) -> None:
    raw = make(
        receipt_ca,
        cred_cert,
        receipt_type="RECEIPT",
        environment="sandbox",
        risk_metric=12,
        not_before=CREATED + timedelta(days=1),
        der=True,
    )
    result = verify_receipt(receipt=raw, trust=trust, now=NOW, expected_type="RECEIPT")
    assert result.receipt_type == "RECEIPT"
    assert result.environment == "sandbox"
    assert result.risk_metric == 12
    assert result.not_before == CREATED + timedelta(days=1)


def test_receipt_without_environment_parses(
    receipt_ca: factory.ReceiptCA, cred_cert: bytes
) -> None:
    assert parse_receipt(make(receipt_ca, cred_cert, environment=None)).environment is None


def test_verification_arguments_are_checked(receipt: bytes, trust: ReceiptTrustStore) -> None:
    # Programming errors, not rejections: they must surface as internal errors.
    with pytest.raises(ValueError):
        verify_receipt(receipt=receipt, trust=trust, now=NOW.replace(tzinfo=None))
    with pytest.raises(ValueError):
        verify_receipt(receipt=receipt, trust=trust, now=NOW, expected_type="attest")


# Each mutation takes the test CA and credCert and returns the receipt bytes and the
# verification's keyword arguments; every one must be rejected with receipt_invalid.
Mutation = Callable[[factory.ReceiptCA, bytes], tuple[bytes, dict[str, Any]]]


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Mutation


def _flip(raw: bytes, position: int) -> bytes:
    mutated = bytearray(raw)
    mutated[position] ^= 0x01
    return bytes(mutated)


def _flipped_content(ca: factory.ReceiptCA, cred: bytes) -> tuple[bytes, dict[str, Any]]:
    raw = make(ca, cred)
    return _flip(raw, raw.index(factory.APP_ID.encode()) + 3), {}


def _flipped_signature(ca: factory.ReceiptCA, cred: bytes) -> tuple[bytes, dict[str, Any]]:
    raw = make(ca, cred)
    signature = parse_receipt(raw).signature
    return _flip(raw, raw.index(signature) + len(signature) // 2), {}


def _fields(ca: factory.ReceiptCA, fields: list[tuple[int, bytes]]) -> bytes:
    return factory.sign_receipt_content(factory.receipt_content(fields), ca=ca)


def _standard_fields(cred: bytes) -> list[tuple[int, bytes]]:
    return [
        (2, factory.APP_ID.encode()),
        (3, cred),
        (4, CLIENT_HASH),
        (5, b"dG9rZW4="),
        (6, b"ATTEST"),
        (7, b"production"),
        (12, b"2026-06-01T11:59:58.123Z"),
        (21, b"2026-08-30T11:59:58.123Z"),
    ]


def _replaced(cred: bytes, kind: int, value: bytes) -> list[tuple[int, bytes]]:
    return [(k, value if k == kind else v) for k, v in _standard_fields(cred)]


def _signed(ca: factory.ReceiptCA, fields: list[tuple[int, bytes]]) -> Mutation:
    return lambda _ca, _cred: (_fields(ca, fields), {})


MUTATIONS = [
    Case("flipped content byte", _flipped_content),
    Case("flipped signature byte", _flipped_signature),
    Case(
        "signed by another key",
        lambda ca, cred: (
            make(dataclasses.replace(ca, signer_key=ec.generate_private_key(ec.SECP256R1())), cred),
            {},
        ),
    ),
    Case(
        "chain from another CA with the same names",
        lambda ca, cred: (make(factory.ReceiptCA.create(), cred), {}),
    ),
    Case(
        "wrong app id expected",
        lambda ca, cred: (make(ca, cred), {"expected_app_id": "TEAMID1234.com.example.other"}),
    ),
    Case(
        "wrong credCert expected",
        lambda ca, cred: (
            make(ca, cred),
            {"expected_credential_certificate": cred[:-1] + bytes([cred[-1] ^ 1])},
        ),
    ),
    Case("wrong type expected", lambda ca, cred: (make(ca, cred), {"expected_type": "RECEIPT"})),
    Case(
        "signer expired",
        lambda ca, cred: (make(ca.with_signer(not_after=NOW - timedelta(seconds=1)), cred), {}),
    ),
    Case(
        "signer not yet valid",
        lambda ca, cred: (make(ca.with_signer(not_before=NOW + timedelta(seconds=1)), cred), {}),
    ),
    Case(
        "signer without Apple's marker",
        lambda ca, cred: (make(ca.with_signer(marker=False), cred), {}),
    ),
    Case(
        "signer with an unknown critical extension",
        lambda ca, cred: (
            make(
                ca.with_signer(
                    extra_extensions=[
                        (
                            x509.UnrecognizedExtension(
                                x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"
                            ),
                            True,
                        )
                    ]
                ),
                cred,
            ),
            {},
        ),
    ),
    Case(
        "signer without digitalSignature",
        lambda ca, cred: (
            make(
                ca.with_signer(
                    key_usage=x509.KeyUsage(
                        digital_signature=False,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=True,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    )
                ),
                cred,
            ),
            {},
        ),
    ),
    Case(
        "signer issued by the root directly",
        lambda ca, cred: (make(ca.with_signer(issued_by_root=True), cred), {}),
    ),
    Case(
        "signer certificate not included",
        lambda ca, cred: (
            factory.sign_receipt_content(
                factory.receipt_content(_standard_fields(cred)),
                ca=ca,
                certificates=[ca.intermediate_cert, ca.root_cert],
            ),
            {},
        ),
    ),
    Case(
        "intermediate not included",
        lambda ca, cred: (
            factory.sign_receipt_content(
                factory.receipt_content(_standard_fields(cred)),
                ca=ca,
                certificates=[ca.signer_cert, ca.root_cert],
            ),
            {},
        ),
    ),
    Case(
        "expiration time missing",
        lambda ca, cred: (_fields(ca, [f for f in _standard_fields(cred) if f[0] != 21]), {}),
    ),
    Case(
        "credCert missing",
        lambda ca, cred: (_fields(ca, [f for f in _standard_fields(cred) if f[0] != 3]), {}),
    ),
    Case(
        "field twice",
        lambda ca, cred: (_fields(ca, [*_standard_fields(cred), (2, b"TEAMID1234.x")]), {}),
    ),
    Case("unknown type", lambda ca, cred: (_fields(ca, _replaced(cred, 6, b"REFRESH")), {})),
    Case(
        "time not RFC 3339",
        lambda ca, cred: (_fields(ca, _replaced(cred, 12, b"2026-06-01 11:59:58")), {}),
    ),
    Case(
        "impossible date",
        lambda ca, cred: (_fields(ca, _replaced(cred, 21, b"2026-02-30T00:00:00.000Z")), {}),
    ),
    Case(
        "risk metric not a count",
        lambda ca, cred: (_fields(ca, [*_standard_fields(cred), (17, b"-1")]), {}),
    ),
    Case(
        "app id not UTF-8",
        lambda ca, cred: (_fields(ca, _replaced(cred, 2, b"TEAMID\xff.app")), {}),
    ),
    Case("empty credCert", lambda ca, cred: (_fields(ca, _replaced(cred, 3, b"")), {})),
    Case(
        "content not a SET",
        lambda ca, cred: (factory.sign_receipt_content(b"\x30\x00", ca=ca), {}),
    ),
    Case(
        "content with trailing bytes",
        lambda ca, cred: (
            factory.sign_receipt_content(
                factory.receipt_content(_standard_fields(cred)) + b"\x00", ca=ca
            ),
            {},
        ),
    ),
]


@pytest.mark.parametrize("case", MUTATIONS, ids=[c.name for c in MUTATIONS])
def test_forged_receipt_is_rejected(
    case: Case, receipt_ca: factory.ReceiptCA, trust: ReceiptTrustStore, cred_cert: bytes
) -> None:
    raw, expectations = case.mutate(receipt_ca, cred_cert)
    call = lambda: verify_receipt(receipt=raw, trust=trust, now=NOW, **expectations)  # noqa: E731
    assert _reason(call) == Reason.RECEIPT_INVALID


def test_intermediate_without_apples_marker_is_rejected(cred_cert: bytes) -> None:
    # A chain that verifies under its own root, but whose intermediate is not in the role.
    ca = factory.ReceiptCA.create(intermediate_marker=False)
    trust = ReceiptTrustStore.replacing_apple_root(ca.root_pem)
    raw = make(ca, cred_cert)
    assert _reason(lambda: verify_receipt(receipt=raw, trust=trust, now=NOW)) == (
        Reason.RECEIPT_INVALID
    )
    assert parse_receipt(raw).signer == ca.signer_cert


@pytest.mark.parametrize("cut", [1, 2, 100, 1000])
def test_truncated_receipt_is_rejected(receipt: bytes, trust: ReceiptTrustStore, cut: int) -> None:
    raw = receipt[:-cut]
    assert _reason(lambda: verify_receipt(receipt=raw, trust=trust, now=NOW)) == (
        Reason.RECEIPT_INVALID
    )


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00", b"\x30\x00", b"trailing"])
def test_receipt_with_trailing_bytes_is_rejected(
    receipt: bytes, trust: ReceiptTrustStore, tail: bytes
) -> None:
    raw = receipt + tail
    assert _reason(lambda: verify_receipt(receipt=raw, trust=trust, now=NOW)) == (
        Reason.RECEIPT_INVALID
    )


GARBAGE = {
    "empty": b"",
    "text": b"garbage",
    "factory placeholder": factory.DEFAULT_RECEIPT,
    "CBOR": cbor2.dumps({"receipt": b"x"}),
    "lone end-of-contents": b"\x00\x00",
    "empty sequence": b"\x30\x00",
    "unterminated indefinite": b"\x30\x80",
    "indefinite primitive": b"\x04\x80\x00\x00",
    "five-octet length": b"\x30\x85\x00\x00\x00\x00\x01\x00",
    "high tag number": b"\x1f\x81\x00\x00",
    "nesting bomb": b"\x30\x80" * 20_000,
    "oversized": b"\x30" * (MAX_RECEIPT_BYTES + 1),
}


@pytest.mark.parametrize("raw", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_rejected(raw: bytes, trust: ReceiptTrustStore) -> None:
    assert _reason(lambda: verify_receipt(receipt=raw, trust=trust, now=NOW)) == (
        Reason.RECEIPT_INVALID
    )


def test_oversized_valid_receipt_is_rejected_before_parsing(
    receipt: bytes, trust: ReceiptTrustStore
) -> None:
    padded = receipt + b"\x00" * (MAX_RECEIPT_BYTES + 1 - len(receipt))
    assert _reason(lambda: parse_receipt(padded)) == Reason.RECEIPT_INVALID
