"""Check that the test factory produces App Attest data shaped like real devices' data."""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from tests import factory

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CHALLENGE = "server-issued challenge \u00e9 \U0001f600"


@pytest.fixture(scope="module")
def ca() -> factory.TestCA:
    return factory.default_ca()


@pytest.fixture
def device(ca: factory.TestCA) -> factory.Device:
    return factory.Device(ca=ca)


@dataclass
class ParsedAuthData:
    rp_id_hash: bytes
    flags: int
    sign_count: int
    aaguid: bytes
    credential_id: bytes
    cose_key: dict[int, Any]
    extensions: dict[str, Any] | None


def parse_auth_data(data: bytes) -> ParsedAuthData:
    cred_len = int.from_bytes(data[53:55], "big")
    cred_end = 55 + cred_len
    stream = io.BytesIO(data[cred_end:])
    decoder = cbor2.CBORDecoder(stream)
    cose_key = decoder.decode()
    extensions = decoder.decode() if stream.tell() < len(data) - cred_end else None
    assert stream.tell() == len(data) - cred_end, "trailing bytes after authData"
    return ParsedAuthData(
        rp_id_hash=data[:32],
        flags=data[32],
        sign_count=int.from_bytes(data[33:37], "big"),
        aaguid=data[37:53],
        credential_id=data[55:cred_end],
        cose_key=cose_key,
        extensions=extensions,
    )


def decode_attestation(blob: bytes) -> tuple[dict[str, Any], x509.Certificate, x509.Certificate]:
    obj = cbor2.loads(blob)
    assert cbor2.dumps(obj) == blob, "attestation object has trailing bytes"
    leaf_der, intermediate_der = obj["attStmt"]["x5c"]
    return (
        obj,
        x509.load_der_x509_certificate(leaf_der),
        x509.load_der_x509_certificate(intermediate_der),
    )


def verify_chain(
    root: x509.Certificate, leaf: x509.Certificate, intermediate: x509.Certificate, at: datetime
) -> None:
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(at)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    verifier.verify(leaf, [intermediate])


def nonce_value(leaf: x509.Certificate) -> bytes:
    ext = leaf.extensions.get_extension_for_oid(factory.NONCE_EXTENSION_OID)
    assert not ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    return ext.value.value


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- CA -------------------------------------------------------------------------------------


def test_ca_certificates(ca: factory.TestCA) -> None:
    root, inter = ca.root_cert, ca.intermediate_cert
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Test App Attestation Root CA"
    )
    assert inter.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Test App Attestation CA 1"
    )
    assert inter.issuer == root.subject
    for cert in (root, inter):
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert isinstance(key.curve, ec.SECP384R1)
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
        assert cert.not_valid_before_utc == datetime(2020, 1, 1, tzinfo=UTC)
        assert cert.not_valid_after_utc == datetime(2049, 12, 31, tzinfo=UTC)
    inter.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert x509.load_pem_x509_certificate(ca.root_pem) == root
    assert x509.load_der_x509_certificate(ca.intermediate_der) == inter


def test_ca_custom_validity_and_name() -> None:
    start = datetime(2021, 1, 1, tzinfo=UTC)
    inter_end = datetime(2030, 3, 13, tzinfo=UTC)
    custom = factory.TestCA.create(
        not_before=start,
        intermediate_not_after=inter_end,
        root_name="Apple App Attestation Root CA",
    )
    assert custom.root_cert.not_valid_before_utc == start
    assert custom.intermediate_cert.not_valid_before_utc == start
    assert custom.intermediate_cert.not_valid_after_utc == inter_end
    assert custom.root_cert.not_valid_after_utc == datetime(2049, 12, 31, tzinfo=UTC)
    assert custom.root_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Apple App Attestation Root CA"
    )


def test_default_ca_is_cached() -> None:
    assert factory.default_ca() is factory.default_ca()


# --- attestation chain ----------------------------------------------------------------------


def test_chain_verifies_inside_leaf_validity_and_not_after(
    ca: factory.TestCA, device: factory.Device
) -> None:
    _, leaf, inter = decode_attestation(
        device.attestation_object(factory.client_data_hash(CHALLENGE), now=NOW)
    )
    assert leaf.not_valid_before_utc == NOW - timedelta(days=1)
    assert leaf.not_valid_after_utc == NOW + timedelta(days=2)
    verify_chain(ca.root_cert, leaf, inter, NOW)
    verify_chain(ca.root_cert, leaf, inter, leaf.not_valid_after_utc)
    with pytest.raises(VerificationError):
        verify_chain(ca.root_cert, leaf, inter, leaf.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(VerificationError):
        verify_chain(ca.root_cert, leaf, inter, leaf.not_valid_before_utc - timedelta(seconds=1))


def test_chain_rejected_under_other_root_with_same_name(device: factory.Device) -> None:
    _, leaf, inter = decode_attestation(
        device.attestation_object(factory.client_data_hash(CHALLENGE), now=NOW)
    )
    other = factory.TestCA.create()
    assert other.root_cert.subject == device.ca.root_cert.subject
    with pytest.raises(VerificationError):
        verify_chain(other.root_cert, leaf, inter, NOW)


def test_chain_rejected_after_intermediate_expiry() -> None:
    short = factory.TestCA.create(intermediate_not_after=NOW - timedelta(days=1))
    dev = factory.Device(ca=short)
    _, leaf, inter = decode_attestation(
        dev.attestation_object(factory.client_data_hash(CHALLENGE), now=NOW)
    )
    with pytest.raises(VerificationError):
        verify_chain(short.root_cert, leaf, inter, NOW)


def test_leaf_shape(ca: factory.TestCA, device: factory.Device) -> None:
    _, leaf, inter = decode_attestation(
        device.attestation_object(factory.client_data_hash(CHALLENGE), now=NOW)
    )
    assert inter.public_bytes(serialization.Encoding.DER) == ca.intermediate_der
    assert leaf.issuer == ca.intermediate_cert.subject
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    leaf.verify_directly_issued_by(inter)
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_issue_leaf_extra_extensions(ca: factory.TestCA, device: factory.Device) -> None:
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5"), b"\x05\x00")
    leaf = ca.issue_leaf(
        public_key=device.private_key.public_key(),
        nonce_extension_value=b"\x04\x00",
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=1),
        extra_extensions=[(unknown, True)],
    )
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.2.3.4.5"))
    assert ext.critical
    assert nonce_value(leaf) == b"\x04\x00"
    with pytest.raises(VerificationError):
        verify_chain(ca.root_cert, leaf, ca.intermediate_cert, NOW)


# --- attestation contents -------------------------------------------------------------------


def test_nonce_extension_encoding() -> None:
    nonce = bytes(range(32))
    assert factory.nonce_extension(nonce) == bytes.fromhex("3024a1220420") + nonce
    with pytest.raises(ValueError):
        factory.nonce_extension(b"\x00" * 31)


def test_client_data_hash_is_sha256_of_utf8() -> None:
    assert factory.client_data_hash(CHALLENGE) == sha256(CHALLENGE.encode("utf-8"))
    assert factory.client_data_hash("abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_attestation_object_structure_and_nonce(device: factory.Device) -> None:
    cdh = factory.client_data_hash(CHALLENGE)
    obj, leaf, _ = decode_attestation(device.attestation_object(cdh, now=NOW))
    assert set(obj) == {"fmt", "attStmt", "authData"}
    assert obj["fmt"] == "apple-appattest"
    assert set(obj["attStmt"]) == {"x5c", "receipt"}
    assert obj["attStmt"]["receipt"] == factory.DEFAULT_RECEIPT
    auth_data = obj["authData"]
    expected_nonce = sha256(auth_data + cdh)
    assert nonce_value(leaf) == factory.nonce_extension(expected_nonce)
    assert nonce_value(leaf)[:6] == b"\x30\x24\xa1\x22\x04\x20"
    assert nonce_value(leaf)[6:] == expected_nonce


def test_key_id_matches_leaf_and_auth_data(device: factory.Device) -> None:
    obj, leaf, _ = decode_attestation(
        device.attestation_object(factory.client_data_hash(CHALLENGE), now=NOW)
    )
    leaf_key = leaf.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    point = leaf_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert len(point) == 65 and point[0] == 4
    assert point == device.public_point
    assert device.key_id == sha256(point)
    assert len(device.key_id) == 32
    assert base64.b64decode(device.key_id_b64, validate=True) == device.key_id
    assert len(device.key_id_b64) == 44

    parsed = parse_auth_data(obj["authData"])
    assert parsed.credential_id == device.key_id
    assert parsed.rp_id_hash == sha256(factory.APP_ID.encode())
    assert parsed.flags == 0x40
    assert parsed.sign_count == 0
    assert parsed.cose_key == {1: 2, 3: -7, -1: 1, -2: point[1:33], -3: point[33:]}
    assert list(parsed.cose_key) == [1, 3, -1, -2, -3]
    assert parsed.extensions is None


@pytest.mark.parametrize(
    ("environment", "aaguid"),
    [
        ("production", b"appattest\x00\x00\x00\x00\x00\x00\x00"),
        ("development", b"appattestdevelop"),
    ],
)
def test_aaguid_per_environment(ca: factory.TestCA, environment: str, aaguid: bytes) -> None:
    dev = factory.Device(ca=ca, environment=environment)  # type: ignore[arg-type]
    obj, _, _ = decode_attestation(
        dev.attestation_object(factory.client_data_hash(CHALLENGE), now=NOW)
    )
    parsed = parse_auth_data(obj["authData"])
    assert parsed.aaguid == aaguid
    assert len(parsed.aaguid) == 16


def test_ios27_extensions_trail_the_cose_key(device: factory.Device) -> None:
    cdh = factory.client_data_hash(CHALLENGE)
    obj, leaf, _ = decode_attestation(
        device.attestation_object(cdh, now=NOW, ios27_extensions=True)
    )
    parsed = parse_auth_data(obj["authData"])
    assert parsed.flags == 0x40
    assert parsed.sign_count == 0
    assert parsed.extensions == {
        "apple_bundle_version_01": "1",
        "apple_validation_category_01": b"\x01\x00\x00\x00",
    }
    assert parsed.cose_key[-2] == device.public_point[1:33]
    assert nonce_value(leaf)[6:] == sha256(obj["authData"] + cdh)
    with pytest.raises(ValueError):
        device.attestation_object(cdh, now=NOW, ios27_extensions=True, extensions={"a": 1})


def test_auth_data_overrides(device: factory.Device) -> None:
    data = device.auth_data(
        rp_id="OTHER.app",
        flags=0x41,
        sign_count=7,
        aaguid=b"x" * 16,
        credential_id=b"\x01" * 20,
        cose_key={1: 2},
        extensions={"k": "v"},
    )
    parsed = parse_auth_data(data)
    assert parsed.rp_id_hash == sha256(b"OTHER.app")
    assert parsed.flags == 0x41
    assert parsed.sign_count == 7
    assert parsed.aaguid == b"x" * 16
    assert parsed.credential_id == b"\x01" * 20
    assert parsed.cose_key == {1: 2}
    assert parsed.extensions == {"k": "v"}


def test_attestation_forgery_knobs(ca: factory.TestCA, device: factory.Device) -> None:
    cdh = factory.client_data_hash(CHALLENGE)
    forged_nonce = b"\xaa" * 32
    obj, leaf, _ = decode_attestation(device.attestation_object(cdh, now=NOW, nonce=forged_nonce))
    assert nonce_value(leaf) == factory.nonce_extension(forged_nonce)
    assert nonce_value(leaf)[6:] != sha256(obj["authData"] + cdh)

    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    obj, leaf, _ = decode_attestation(
        device.attestation_object(cdh, now=NOW, leaf_public_key=other_key)
    )
    assert leaf.public_key() == other_key
    assert parse_auth_data(obj["authData"]).credential_id == device.key_id

    obj = cbor2.loads(
        device.attestation_object(
            cdh,
            now=NOW,
            x5c=[b"leaf", b"inter"],
            fmt="packed",
            receipt=b"r",
            extra_top_level={"extra": 1},
            sign_count=3,
        )
    )
    assert obj["attStmt"] == {"x5c": [b"leaf", b"inter"], "receipt": b"r"}
    assert obj["fmt"] == "packed"
    assert obj["extra"] == 1
    assert parse_auth_data(obj["authData"]).sign_count == 3

    start = NOW - timedelta(days=300)
    _, leaf, _ = decode_attestation(
        device.attestation_object(cdh, now=NOW, leaf_not_before=start, leaf_not_after=NOW)
    )
    assert leaf.not_valid_before_utc == start
    assert leaf.not_valid_after_utc == NOW


def test_devices_get_distinct_keys_but_share_the_ca(ca: factory.TestCA) -> None:
    devices = [factory.Device(ca=ca) for _ in range(5)]
    assert len({d.key_id for d in devices}) == 5
    cdh = factory.client_data_hash(CHALLENGE)
    inters = {cbor2.loads(d.attestation_object(cdh, now=NOW))["attStmt"]["x5c"][1] for d in devices}
    assert inters == {ca.intermediate_der}


# --- assertions -----------------------------------------------------------------------------


def test_assertion_signature_and_counters(device: factory.Device) -> None:
    public_key = device.private_key.public_key()
    counters = []
    for i in range(3):
        cdh = factory.client_data_hash(f"payload {i}")
        obj = cbor2.loads(device.assertion_object(cdh))
        assert set(obj) == {"signature", "authenticatorData"}
        auth = obj["authenticatorData"]
        assert len(auth) == 37
        assert auth[:32] == sha256(factory.APP_ID.encode())
        assert auth[32] == 0x40
        nonce = sha256(auth + cdh)
        public_key.verify(obj["signature"], nonce, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            public_key.verify(obj["signature"], nonce + b"x", ec.ECDSA(hashes.SHA256()))
        counters.append(int.from_bytes(auth[33:37], "big"))
    assert counters == [1, 2, 3]
    assert device.counter == 3


def test_assertion_overrides(device: factory.Device) -> None:
    cdh = factory.client_data_hash("p")
    obj = cbor2.loads(
        device.assertion_object(
            cdh, counter=10, rp_id="X.y", flags=0x41, extensions={"apple_bundle_version_01": "2"}
        )
    )
    auth = obj["authenticatorData"]
    assert auth[:32] == sha256(b"X.y")
    assert auth[32] == 0x41
    assert int.from_bytes(auth[33:37], "big") == 10
    assert cbor2.loads(auth[37:]) == {"apple_bundle_version_01": "2"}
    assert device.counter == 10
    nxt = cbor2.loads(device.assertion_object(cdh))["authenticatorData"]
    assert int.from_bytes(nxt[33:37], "big") == 11

    other = ec.generate_private_key(ec.SECP256R1())
    obj = cbor2.loads(device.assertion_object(cdh, signing_key=other))
    nonce = sha256(obj["authenticatorData"] + cdh)
    other.public_key().verify(obj["signature"], nonce, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        device.private_key.public_key().verify(obj["signature"], nonce, ec.ECDSA(hashes.SHA256()))


# --- plugin bodies --------------------------------------------------------------------------


def test_registration_body(ca: factory.TestCA, device: factory.Device) -> None:
    body = device.registration_body(CHALLENGE, now=NOW, ios27_extensions=True)
    assert set(body) == {"platform", "format", "keyId", "challenge", "token"}
    assert body["platform"] == "ios"
    assert body["format"] == "apple-app-attest"
    assert body["keyId"] == base64.b64encode(device.key_id).decode()
    assert body["challenge"] == CHALLENGE
    token = base64.b64decode(body["token"], validate=True)
    assert base64.b64encode(token).decode() == body["token"]
    obj, leaf, inter = decode_attestation(token)
    nonce = sha256(obj["authData"] + sha256(CHALLENGE.encode("utf-8")))
    assert nonce_value(leaf) == factory.nonce_extension(nonce)
    assert parse_auth_data(obj["authData"]).extensions is not None
    verify_chain(ca.root_cert, leaf, inter, NOW)


def test_assertion_body(device: factory.Device) -> None:
    payload = '{"nonce":"abc","action":"buy"}'
    body = device.assertion_body(payload, counter=5)
    assert set(body) == {"platform", "format", "keyId", "payload", "token"}
    assert body["platform"] == "ios"
    assert body["format"] == "apple-app-attest"
    assert body["keyId"] == device.key_id_b64
    assert body["payload"] == payload
    token = base64.b64decode(body["token"], validate=True)
    assert base64.b64encode(token).decode() == body["token"]
    obj = cbor2.loads(token)
    auth = obj["authenticatorData"]
    assert int.from_bytes(auth[33:37], "big") == 5
    nonce = sha256(auth + sha256(payload.encode("utf-8")))
    device.private_key.public_key().verify(obj["signature"], nonce, ec.ECDSA(hashes.SHA256()))
