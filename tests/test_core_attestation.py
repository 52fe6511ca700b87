"""verify_attestation: Apple's nine steps, one forged defect at a time, under a test CA."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests import factory
from worker.core import (
    AuthDataExtensions,
    Environment,
    IntermediateCache,
    Policy,
    Reason,
    Rejected,
    TrustStore,
    VerifiedAttestation,
    client_data_hash,
    verify_attestation,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CHALLENGE = "server-issued challenge \u00e9"
CDH = client_data_hash(CHALLENGE)
APP_ID = factory.APP_ID  # production keys only
DEV_APP_ID = "TEAMID1234.com.example.devapp"  # development keys allowed
UNCONFIGURED_APP_ID = "TEAMID9999.com.example.other"

# A second device key, generated once: its point goes where the attested device's should be.
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_POINT = factory.uncompressed_point(OTHER_KEY.public_key())


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.fixture(scope="module")
def ca() -> factory.TestCA:
    return factory.TestCA.create()


@pytest.fixture(scope="module")
def other_ca() -> factory.TestCA:
    """Same root and intermediate names as ``ca``, different keys."""
    return factory.TestCA.create()


@pytest.fixture(scope="module")
def trust(ca: factory.TestCA) -> TrustStore:
    return TrustStore.replacing_apple_root(ca.root_pem)


@pytest.fixture(scope="module")
def policy(trust: TrustStore) -> Policy:
    return Policy.build(trust=trust, production_apps=[APP_ID], development_apps=[DEV_APP_ID])


@pytest.fixture
def device(ca: factory.TestCA) -> factory.Device:
    return factory.Device(ca=ca)


def verify(
    obj: bytes,
    device: factory.Device,
    policy: Policy,
    *,
    key_id: bytes | None = None,
    cdh: bytes = CDH,
    now: datetime = NOW,
    cache: IntermediateCache | None = None,
) -> VerifiedAttestation:
    return verify_attestation(
        attestation_object=obj,
        key_id=device.key_id if key_id is None else key_id,
        client_data_hash=cdh,
        policy=policy,
        now=now,
        cache=cache,
    )


def rejection(call: Callable[[], object]) -> Reason:
    with pytest.raises(Rejected) as info:
        call()
    return info.value.reason


def mutate(obj: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    decoded = cbor2.loads(obj)
    change(decoded)
    return cbor2.dumps(decoded, canonical=True)


def x5c_of(obj: bytes) -> list[bytes]:
    x5c: list[bytes] = cbor2.loads(obj)["attStmt"]["x5c"]
    return x5c


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def assemble(auth_data: bytes, x5c: Sequence[bytes]) -> bytes:
    return cbor2.dumps(
        {
            "fmt": "apple-appattest",
            "attStmt": {"x5c": list(x5c), "receipt": factory.DEFAULT_RECEIPT},
            "authData": auth_data,
        },
        canonical=True,
    )


def make_leaf(
    *,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    nonce_value: bytes | None,
    aki: bool = True,
    extra: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """A credCert built by hand, for shapes the factory does not make."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "hand-made")]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if nonce_value is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(factory.NONCE_EXTENSION_OID, nonce_value), critical=False
        )
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def nonce_value_for(auth_data: bytes, cdh: bytes = CDH) -> bytes:
    return factory.nonce_extension(sha256(auth_data + cdh))


def self_signed_p256() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, factory.INTERMEDIATE_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


# --- accepted attestations --------------------------------------------------------------------


def test_valid_production_attestation(
    ca: factory.TestCA, device: factory.Device, policy: Policy
) -> None:
    obj = device.attestation_object(CDH, now=NOW)
    result = verify(obj, device, policy)
    leaf_der = x5c_of(obj)[0]
    assert result == VerifiedAttestation(
        key_id=device.key_id,
        public_key=device.public_point,
        app_id=APP_ID,
        environment=Environment.PRODUCTION,
        sign_count=0,
        receipt=factory.DEFAULT_RECEIPT,
        extensions=None,
        leaf_fingerprint=sha256(leaf_der),
        intermediate_fingerprint=sha256(ca.intermediate_der),
        leaf_not_after=NOW + timedelta(days=2),
    )
    assert len(result.public_key) == 65 and result.public_key[0] == 4
    assert sha256(result.public_key) == result.key_id
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.app_id = "X"  # type: ignore[misc]


def test_valid_development_attestation(ca: factory.TestCA, policy: Policy) -> None:
    device = factory.Device(ca=ca, app_id=DEV_APP_ID, environment="development")
    result = verify(device.attestation_object(CDH, now=NOW), device, policy)
    assert result.environment is Environment.DEVELOPMENT
    assert result.app_id == DEV_APP_ID
    assert result.key_id == device.key_id
    assert result.public_key == device.public_point


def test_production_key_under_development_app_is_accepted(
    ca: factory.TestCA, policy: Policy
) -> None:
    device = factory.Device(ca=ca, app_id=DEV_APP_ID, environment="production")
    result = verify(device.attestation_object(CDH, now=NOW), device, policy)
    assert result.environment is Environment.PRODUCTION
    assert result.app_id == DEV_APP_ID


def test_receipt_is_returned_as_sent(device: factory.Device, policy: Policy) -> None:
    receipt = bytes(range(256)) * 20
    result = verify(device.attestation_object(CDH, now=NOW, receipt=receipt), device, policy)
    assert result.receipt == receipt


def test_ios27_extensions_are_surfaced(device: factory.Device, policy: Policy) -> None:
    obj = device.attestation_object(CDH, now=NOW, ios27_extensions=True)
    result = verify(obj, device, policy)
    assert result.extensions == AuthDataExtensions(validation_category=1, bundle_version="1")


def test_unknown_extensions_are_surfaced(device: factory.Device, policy: Policy) -> None:
    extensions = {
        "apple_validation_category_01": (3).to_bytes(4, "little"),
        "apple_bundle_version_01": "28.1",
        "apple_new_thing_02": b"\x01\x02",
    }
    result = verify(device.attestation_object(CDH, now=NOW, extensions=extensions), device, policy)
    assert result.extensions is not None
    assert result.extensions.validation_category == 3
    assert result.extensions.bundle_version == "28.1"
    assert dict(result.extensions.other) == {"apple_new_thing_02": b"\x01\x02"}


def test_policy_with_several_apps_picks_the_app_by_rp_id_hash(
    ca: factory.TestCA, trust: TrustStore
) -> None:
    apps = ["TEAMID1234.com.example.one", "TEAMID1234.com.example.two", "ABCDE12345.org.x_y"]
    multi = Policy.build(trust=trust, production_apps=apps[:2], development_apps=apps[2:])
    for app_id in apps:
        device = factory.Device(ca=ca, app_id=app_id)
        assert verify(device.attestation_object(CDH, now=NOW), device, multi).app_id == app_id
    dev = factory.Device(ca=ca, app_id=apps[0], environment="development")
    obj = dev.attestation_object(CDH, now=NOW)
    assert rejection(lambda: verify(obj, dev, multi)) is Reason.ENVIRONMENT_MISMATCH


def test_apple_sample_style_client_data_hash_of_other_length(
    device: factory.Device, policy: Policy
) -> None:
    # Apple's documentation samples used the raw challenge bytes as clientDataHash.
    raw_challenge = b"test_server_challenge"
    obj = device.attestation_object(raw_challenge, now=NOW)
    assert verify(obj, device, policy, cdh=raw_challenge).key_id == device.key_id
    assert rejection(lambda: verify(obj, device, policy, cdh=sha256(raw_challenge))) is (
        Reason.NONCE_MISMATCH
    )


def test_now_in_another_timezone_is_the_same_instant(
    device: factory.Device, policy: Policy
) -> None:
    plus_five = timezone(timedelta(hours=5))
    obj = device.attestation_object(CDH, now=NOW, leaf_not_after=NOW + timedelta(minutes=1))
    assert verify(obj, device, policy, now=NOW.astimezone(plus_five)).key_id == device.key_id
    later = (NOW + timedelta(minutes=2)).astimezone(plus_five)
    assert rejection(lambda: verify(obj, device, policy, now=later)) is (Reason.CERTIFICATE_EXPIRED)


def test_leaf_validity_bounds_are_inclusive(device: factory.Device, policy: Policy) -> None:
    start, end = NOW - timedelta(hours=1), NOW + timedelta(hours=1)
    obj = device.attestation_object(CDH, now=NOW, leaf_not_before=start, leaf_not_after=end)
    verify(obj, device, policy, now=start)
    verify(obj, device, policy, now=end)
    for instant in (start - timedelta(seconds=1), end + timedelta(seconds=1)):
        assert rejection(lambda t=instant: verify(obj, device, policy, now=t)) is (
            Reason.CERTIFICATE_EXPIRED
        )


def test_leaf_without_authority_key_identifier_is_accepted(
    ca: factory.TestCA, device: factory.Device, policy: Policy
) -> None:
    # Old Apple credCerts carry no AKI; the leaf profile must not insist on one.
    auth_data = device.auth_data()
    leaf = make_leaf(
        public_key=device.private_key.public_key(),
        issuer=ca.intermediate_cert,
        issuer_key=ca.intermediate_key,
        nonce_value=nonce_value_for(auth_data),
        aki=False,
    )
    obj = assemble(auth_data, [der(leaf), ca.intermediate_der])
    assert verify(obj, device, policy).leaf_fingerprint == sha256(der(leaf))


def test_naive_now_is_a_programming_error(device: factory.Device, policy: Policy) -> None:
    obj = device.attestation_object(CDH, now=NOW)
    with pytest.raises(ValueError, match="timezone"):
        verify(obj, device, policy, now=NOW.replace(tzinfo=None))


@pytest.mark.parametrize("length", [0, 31, 33, 44])
def test_key_id_of_wrong_length_is_a_programming_error(
    device: factory.Device, policy: Policy, length: int
) -> None:
    obj = device.attestation_object(CDH, now=NOW)
    with pytest.raises(ValueError):
        verify(obj, device, policy, key_id=bytes(length))


# --- one defect at a time: overrides of the generator ----------------------------------------


LATER = NOW + timedelta(seconds=1)
EARLIER = NOW - timedelta(seconds=1)

OVERRIDES: list[Any] = [
    # unsupported_format
    pytest.param({"fmt": "packed"}, Reason.UNSUPPORTED_FORMAT, id="fmt-packed"),
    pytest.param({"fmt": "android-key"}, Reason.UNSUPPORTED_FORMAT, id="fmt-android-key"),
    pytest.param({"fmt": "none"}, Reason.UNSUPPORTED_FORMAT, id="fmt-none"),
    pytest.param({"fmt": "apple-app-attest"}, Reason.UNSUPPORTED_FORMAT, id="fmt-plugin-spelling"),
    pytest.param({"fmt": "Apple-AppAttest"}, Reason.UNSUPPORTED_FORMAT, id="fmt-case"),
    pytest.param({"fmt": ""}, Reason.UNSUPPORTED_FORMAT, id="fmt-empty"),
    # malformed_token
    pytest.param({"fmt": b"apple-appattest"}, Reason.MALFORMED_TOKEN, id="fmt-bytes"),
    pytest.param({"fmt": None}, Reason.MALFORMED_TOKEN, id="fmt-null"),
    pytest.param({"extra_top_level": {"extra": 1}}, Reason.MALFORMED_TOKEN, id="extra-key"),
    pytest.param({"receipt": "text"}, Reason.MALFORMED_TOKEN, id="receipt-text"),
    pytest.param({"receipt": bytes(40_000)}, Reason.MALFORMED_TOKEN, id="object-over-32KiB"),
    pytest.param({"x5c": "not-a-list"}, Reason.MALFORMED_TOKEN, id="x5c-text"),
    pytest.param({"x5c": [b"a", "b"]}, Reason.MALFORMED_TOKEN, id="x5c-mixed-types"),
    pytest.param({"extensions": {"apple_bundle_version_01": 1}}, Reason.MALFORMED_TOKEN,
                 id="extension-wrong-type"),
    # certificate_chain_invalid (structure)
    pytest.param({"x5c": []}, Reason.CERTIFICATE_CHAIN_INVALID, id="x5c-empty"),
    pytest.param({"leaf_public_key": ec.generate_private_key(ec.SECP384R1()).public_key()},
                 Reason.CERTIFICATE_CHAIN_INVALID, id="leaf-key-p384"),
    # certificate_expired
    pytest.param({"leaf_not_before": NOW - timedelta(days=30), "leaf_not_after": EARLIER},
                 Reason.CERTIFICATE_EXPIRED, id="leaf-expired"),
    pytest.param({"leaf_not_before": LATER}, Reason.CERTIFICATE_EXPIRED, id="leaf-not-yet-valid"),
    # nonce_mismatch
    pytest.param({"nonce": bytes(32)}, Reason.NONCE_MISMATCH, id="nonce-zero"),
    pytest.param({"nonce": sha256(CDH)}, Reason.NONCE_MISMATCH, id="nonce-without-auth-data"),
    # key_id_mismatch
    pytest.param({"leaf_public_key": OTHER_KEY.public_key()}, Reason.KEY_ID_MISMATCH,
                 id="leaf-key-of-other-device"),
    # app_id_mismatch
    pytest.param({"rp_id": UNCONFIGURED_APP_ID}, Reason.APP_ID_MISMATCH, id="rp-id-unconfigured"),
    pytest.param({"rp_id": "com.example.app"}, Reason.APP_ID_MISMATCH, id="rp-id-bundle-only"),
    pytest.param({"rp_id": APP_ID.lower()}, Reason.APP_ID_MISMATCH, id="rp-id-lowercase"),
    # counter_not_zero
    pytest.param({"sign_count": 1}, Reason.COUNTER_NOT_ZERO, id="sign-count-1"),
    pytest.param({"sign_count": 2**32 - 1}, Reason.COUNTER_NOT_ZERO, id="sign-count-max"),
    # environment_mismatch
    pytest.param({"aaguid": factory.AAGUID_DEVELOPMENT}, Reason.ENVIRONMENT_MISMATCH,
                 id="development-key-production-app"),
    pytest.param({"aaguid": b"appattestsandbox"}, Reason.ENVIRONMENT_MISMATCH,
                 id="aaguid-sandbox"),
    pytest.param({"aaguid": b"appattest" + b" " * 7}, Reason.ENVIRONMENT_MISMATCH,
                 id="aaguid-spaces"),
    pytest.param({"aaguid": b"appattest" + b"\x00" * 6 + b"\x01"}, Reason.ENVIRONMENT_MISMATCH,
                 id="aaguid-last-byte"),
    pytest.param({"aaguid": bytes(16)}, Reason.ENVIRONMENT_MISMATCH, id="aaguid-zero"),
    # credential_id_mismatch
    pytest.param({"credential_id": bytes(32)}, Reason.CREDENTIAL_ID_MISMATCH,
                 id="credential-id-zero"),
    pytest.param({"credential_id": sha256(OTHER_POINT)}, Reason.CREDENTIAL_ID_MISMATCH,
                 id="credential-id-of-other-device"),
    pytest.param({"credential_id": b""}, Reason.CREDENTIAL_ID_MISMATCH, id="credential-id-empty"),
    pytest.param({"cose_key": {1: 2, 3: -7, -1: 1, -2: OTHER_POINT[1:33], -3: OTHER_POINT[33:]}},
                 Reason.CREDENTIAL_ID_MISMATCH, id="cose-key-of-other-device"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "reason"), OVERRIDES)
def test_single_defect_is_rejected(
    device: factory.Device, policy: Policy, overrides: dict[str, Any], reason: Reason
) -> None:
    verify(device.attestation_object(CDH, now=NOW), device, policy)  # the baseline passes
    obj = device.attestation_object(CDH, now=NOW, **overrides)
    assert rejection(lambda: verify(obj, device, policy)) is reason


def test_credential_id_with_one_bit_flipped_is_rejected(
    device: factory.Device, policy: Policy
) -> None:
    flipped = bytearray(device.key_id)
    flipped[-1] ^= 0x01
    obj = device.attestation_object(CDH, now=NOW, credential_id=bytes(flipped))
    assert rejection(lambda: verify(obj, device, policy)) is Reason.CREDENTIAL_ID_MISMATCH


def test_cose_point_with_one_coordinate_changed_is_rejected(
    device: factory.Device, policy: Policy
) -> None:
    key = device.cose_key()
    key[-3] = OTHER_POINT[33:]  # device's x, other device's y
    obj = device.attestation_object(CDH, now=NOW, cose_key=key)
    assert rejection(lambda: verify(obj, device, policy)) is Reason.CREDENTIAL_ID_MISMATCH


# --- defects in the verification request -------------------------------------------------------


def test_wrong_client_data_hash_is_a_nonce_mismatch(device: factory.Device, policy: Policy) -> None:
    obj = device.attestation_object(CDH, now=NOW)
    other = client_data_hash(CHALLENGE + " ")
    assert rejection(lambda: verify(obj, device, policy, cdh=other)) is Reason.NONCE_MISMATCH
    raw = CHALLENGE.encode()  # the challenge itself instead of its hash
    assert rejection(lambda: verify(obj, device, policy, cdh=raw)) is Reason.NONCE_MISMATCH


def test_key_id_of_another_device_is_rejected(
    ca: factory.TestCA, device: factory.Device, policy: Policy
) -> None:
    obj = device.attestation_object(CDH, now=NOW)
    other = factory.Device(ca=ca)
    assert rejection(lambda: verify(obj, device, policy, key_id=other.key_id)) is (
        Reason.KEY_ID_MISMATCH
    )


def test_key_id_of_the_spki_instead_of_the_point_is_rejected(
    device: factory.Device, policy: Policy
) -> None:
    spki = device.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    obj = device.attestation_object(CDH, now=NOW)
    assert rejection(lambda: verify(obj, device, policy, key_id=sha256(spki))) is (
        Reason.KEY_ID_MISMATCH
    )


def test_auth_data_changed_after_the_nonce_was_fixed_is_a_nonce_mismatch(
    device: factory.Device, policy: Policy
) -> None:
    obj = device.attestation_object(CDH, now=NOW)

    def set_flags(decoded: dict[str, Any]) -> None:
        auth_data = bytearray(decoded["authData"])
        auth_data[32] = 0x41
        decoded["authData"] = bytes(auth_data)

    assert rejection(lambda: verify(mutate(obj, set_flags), device, policy)) is (
        Reason.NONCE_MISMATCH
    )


def test_missing_nonce_extension_is_a_nonce_mismatch(
    ca: factory.TestCA, device: factory.Device, policy: Policy
) -> None:
    leaf = make_leaf(
        public_key=device.private_key.public_key(),
        issuer=ca.intermediate_cert,
        issuer_key=ca.intermediate_key,
        nonce_value=None,
    )
    obj = assemble(device.auth_data(), [der(leaf), ca.intermediate_der])
    assert rejection(lambda: verify(obj, device, policy)) is Reason.NONCE_MISMATCH


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(lambda nonce: b"\x04\x20" + nonce, id="bare-octet-string"),
        pytest.param(lambda nonce: nonce, id="raw-nonce"),
        pytest.param(lambda nonce: bytes.fromhex("3024a2220420") + nonce, id="wrong-context-tag"),
        pytest.param(lambda nonce: factory.nonce_extension(nonce) + b"\x00", id="trailing-byte"),
        pytest.param(lambda nonce: b"", id="empty"),
    ],
)
def test_nonce_extension_of_another_shape_is_a_nonce_mismatch(
    ca: factory.TestCA,
    device: factory.Device,
    policy: Policy,
    shape: Callable[[bytes], bytes],
) -> None:
    auth_data = device.auth_data()
    leaf = ca.issue_leaf(
        public_key=device.private_key.public_key(),
        nonce_extension_value=shape(sha256(auth_data + CDH)),
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=1),
    )
    obj = assemble(auth_data, [der(leaf), ca.intermediate_der])
    assert rejection(lambda: verify(obj, device, policy)) is Reason.NONCE_MISMATCH


# --- certificate chain ----------------------------------------------------------------------


def test_chain_from_another_ca_with_the_same_names_is_rejected(
    ca: factory.TestCA, other_ca: factory.TestCA, policy: Policy
) -> None:
    assert other_ca.root_cert.subject == ca.root_cert.subject
    assert other_ca.intermediate_cert.subject == ca.intermediate_cert.subject
    device = factory.Device(ca=other_ca)
    cache = IntermediateCache()
    obj = device.attestation_object(CDH, now=NOW)
    assert rejection(lambda: verify(obj, device, policy, cache=cache)) is (
        Reason.CERTIFICATE_CHAIN_INVALID
    )
    assert len(cache) == 0


def test_own_leaf_with_intermediate_of_another_ca_is_rejected(
    other_ca: factory.TestCA, device: factory.Device, policy: Policy
) -> None:
    obj = device.attestation_object(CDH, now=NOW)
    swapped = mutate(
        obj, lambda d: d["attStmt"].update(x5c=[d["attStmt"]["x5c"][0], other_ca.intermediate_der])
    )
    assert rejection(lambda: verify(swapped, device, policy)) is Reason.CERTIFICATE_CHAIN_INVALID


def test_test_ca_chain_is_rejected_under_the_apple_root(device: factory.Device) -> None:
    apple = Policy.build(trust=TrustStore.apple(), production_apps=[APP_ID])
    obj = device.attestation_object(CDH, now=NOW)
    assert rejection(lambda: verify(obj, device, apple)) is Reason.CERTIFICATE_CHAIN_INVALID


def garbage_der() -> bytes:
    return b"\x30\x03\x02\x01\x00"


X5C_CHANGES: list[Any] = [
    pytest.param(lambda x5c, ca: [x5c[1], x5c[0]], id="swapped-order"),
    pytest.param(lambda x5c, ca: [x5c[0]], id="leaf-only"),
    pytest.param(lambda x5c, ca: [x5c[1]], id="intermediate-only"),
    pytest.param(lambda x5c, ca: [*x5c, der(ca.root_cert)], id="three-with-root"),
    pytest.param(lambda x5c, ca: [*x5c, x5c[1]], id="three-intermediate-twice"),
    pytest.param(lambda x5c, ca: [x5c[0], x5c[0]], id="leaf-twice"),
    pytest.param(lambda x5c, ca: [x5c[0], der(ca.root_cert)], id="root-as-intermediate"),
    pytest.param(lambda x5c, ca: [b"garbage", x5c[1]], id="garbage-leaf"),
    pytest.param(lambda x5c, ca: [x5c[0], b"garbage"], id="garbage-intermediate"),
    pytest.param(lambda x5c, ca: [garbage_der(), x5c[1]], id="der-but-not-a-certificate"),
    pytest.param(lambda x5c, ca: [x5c[0][:-10], x5c[1]], id="truncated-leaf"),
    pytest.param(lambda x5c, ca: [x5c[0], x5c[1][:-10]], id="truncated-intermediate"),
    pytest.param(lambda x5c, ca: [x5c[0], b""], id="empty-intermediate"),
]


@pytest.mark.parametrize("change", X5C_CHANGES)
def test_x5c_defect_is_rejected(
    ca: factory.TestCA,
    device: factory.Device,
    policy: Policy,
    change: Callable[[list[bytes], factory.TestCA], list[bytes]],
) -> None:
    obj = device.attestation_object(CDH, now=NOW)
    bad = mutate(obj, lambda d: d["attStmt"].update(x5c=change(d["attStmt"]["x5c"], ca)))
    cache = IntermediateCache()
    assert rejection(lambda: verify(bad, device, policy, cache=cache)) is (
        Reason.CERTIFICATE_CHAIN_INVALID
    )
    assert len(cache) == 0


def test_leaf_signature_bit_flip_is_rejected(device: factory.Device, policy: Policy) -> None:
    obj = device.attestation_object(CDH, now=NOW)
    leaf = bytearray(x5c_of(obj)[0])
    leaf[-3] ^= 0x01  # inside the signature value, so the DER still parses
    x509.load_der_x509_certificate(bytes(leaf))
    bad = mutate(obj, lambda d: d["attStmt"]["x5c"].__setitem__(0, bytes(leaf)))
    assert rejection(lambda: verify(bad, device, policy)) is Reason.CERTIFICATE_CHAIN_INVALID


def test_leaf_with_unknown_critical_extension_is_rejected(
    ca: factory.TestCA, device: factory.Device, policy: Policy
) -> None:
    auth_data = device.auth_data()
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5.6"), b"\x05\x00")
    leaf = ca.issue_leaf(
        public_key=device.private_key.public_key(),
        nonce_extension_value=nonce_value_for(auth_data),
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=1),
        extra_extensions=[(unknown, True)],
    )
    obj = assemble(auth_data, [der(leaf), ca.intermediate_der])
    assert rejection(lambda: verify(obj, device, policy)) is Reason.CERTIFICATE_CHAIN_INVALID


def test_leaf_with_critical_nonce_extension_is_rejected(
    ca: factory.TestCA, device: factory.Device, policy: Policy
) -> None:
    auth_data = device.auth_data()
    leaf = make_leaf(
        public_key=device.private_key.public_key(),
        issuer=ca.intermediate_cert,
        issuer_key=ca.intermediate_key,
        nonce_value=None,
        extra=[
            (
                x509.UnrecognizedExtension(factory.NONCE_EXTENSION_OID, nonce_value_for(auth_data)),
                True,
            )
        ],
    )
    obj = assemble(auth_data, [der(leaf), ca.intermediate_der])
    assert rejection(lambda: verify(obj, device, policy)) is Reason.CERTIFICATE_CHAIN_INVALID


def test_leaf_signed_by_an_issuer_with_the_intermediate_name_is_rejected(
    ca: factory.TestCA, other_ca: factory.TestCA, device: factory.Device, policy: Policy
) -> None:
    auth_data = device.auth_data()
    leaf = other_ca.issue_leaf(
        public_key=device.private_key.public_key(),
        nonce_extension_value=nonce_value_for(auth_data),
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=1),
    )
    obj = assemble(auth_data, [der(leaf), ca.intermediate_der])
    assert rejection(lambda: verify(obj, device, policy)) is Reason.CERTIFICATE_CHAIN_INVALID


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(lambda ca, other: ca.intermediate_der, id="own-intermediate"),
        pytest.param(lambda ca, other: other.intermediate_der, id="other-ca-intermediate"),
        pytest.param(lambda ca, other: der(self_signed_p256()), id="self-signed-p256"),
    ],
)
def test_leaf_signed_directly_by_the_root_is_rejected_and_not_cached(
    ca: factory.TestCA,
    other_ca: factory.TestCA,
    device: factory.Device,
    policy: Policy,
    second: Callable[[factory.TestCA, factory.TestCA], bytes],
) -> None:
    auth_data = device.auth_data()
    leaf = make_leaf(
        public_key=device.private_key.public_key(),
        issuer=ca.root_cert,
        issuer_key=ca.root_key,
        nonce_value=nonce_value_for(auth_data),
    )
    leaf.verify_directly_issued_by(ca.root_cert)
    obj = assemble(auth_data, [der(leaf), second(ca, other_ca)])
    cache = IntermediateCache()
    assert rejection(lambda: verify(obj, device, policy, cache=cache)) is (
        Reason.CERTIFICATE_CHAIN_INVALID
    )
    assert len(cache) == 0
    # The presented second certificate was not made trusted: a genuine attestation still misses.
    genuine = device.attestation_object(CDH, now=NOW)
    verify(genuine, device, policy, cache=cache)
    assert cache.hits == 0


@pytest.mark.parametrize(
    ("ca_kwargs", "reason"),
    [
        pytest.param(
            {"intermediate_not_after": NOW - timedelta(days=1)},
            Reason.CERTIFICATE_EXPIRED,
            id="intermediate-expired",
        ),
        pytest.param(
            {"intermediate_not_before": NOW + timedelta(days=1)},
            Reason.CERTIFICATE_EXPIRED,
            id="intermediate-not-yet-valid",
        ),
        pytest.param(
            {
                "not_after": NOW - timedelta(days=1),
                "intermediate_not_after": NOW + timedelta(days=9),
            },
            Reason.CERTIFICATE_EXPIRED,
            id="root-expired",
        ),
    ],
)
def test_ca_validity_at_now(ca_kwargs: dict[str, datetime], reason: Reason) -> None:
    short = factory.TestCA.create(**ca_kwargs)
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(short.root_pem), production_apps=[APP_ID]
    )
    device = factory.Device(ca=short)
    obj = device.attestation_object(CDH, now=NOW)
    cache = IntermediateCache()
    assert rejection(lambda: verify(obj, device, policy, cache=cache)) is reason
    assert len(cache) == 0
