"""verify_assertion: signature over the doubly hashed nonce, App ID and counter, one defect at a
time."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from tests import factory
from worker.core import (
    AuthDataExtensions,
    Reason,
    Rejected,
    VerifiedAssertion,
    client_data_hash,
    verify_assertion,
)

PAYLOAD = '{"action":"transfer","amount":10,"nonce":"n-1"}'
CDH = client_data_hash(PAYLOAD)
APP_ID = factory.APP_ID
OTHER_APP_ID = "TEAMID1234.com.example.other"


@pytest.fixture(scope="module")
def ca() -> factory.TestCA:
    return factory.TestCA.create()


@pytest.fixture
def device(ca: factory.TestCA) -> factory.Device:
    return factory.Device(ca=ca)


def verify(
    obj: bytes,
    device: factory.Device,
    *,
    previous_counter: int = 0,
    cdh: bytes = CDH,
    app_id: str = APP_ID,
    public_key: bytes | ec.EllipticCurvePublicKey | None = None,
) -> VerifiedAssertion:
    return verify_assertion(
        assertion_object=obj,
        client_data_hash=cdh,
        public_key=device.public_point if public_key is None else public_key,
        app_id=app_id,
        previous_counter=previous_counter,
    )


def rejection(call: Callable[[], object]) -> Reason:
    with pytest.raises(Rejected) as info:
        call()
    return info.value.reason


def mutate(obj: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    decoded = cbor2.loads(obj)
    change(decoded)
    return cbor2.dumps(decoded, canonical=True)


def rp_id_hash(app_id: str) -> bytes:
    return hashlib.sha256(app_id.encode()).digest()


def signed(
    key: ec.EllipticCurvePrivateKey,
    authenticator_data: bytes,
    cdh: bytes = CDH,
    *,
    prehashed: bool = False,
) -> bytes:
    nonce = hashlib.sha256(authenticator_data + cdh).digest()
    algorithm = ec.ECDSA(Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256())
    signature = key.sign(nonce, algorithm)
    return cbor2.dumps(
        {"signature": signature, "authenticatorData": authenticator_data}, canonical=True
    )


# --- accepted assertions ----------------------------------------------------------------------


def test_first_assertion_counter_one_after_zero(device: factory.Device) -> None:
    result = verify(device.assertion_object(CDH, counter=1), device, previous_counter=0)
    assert result == VerifiedAssertion(counter=1, extensions=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.counter = 2  # type: ignore[misc]


def test_counter_may_jump_ahead(device: factory.Device) -> None:
    obj = device.assertion_object(CDH, counter=1000)
    assert verify(obj, device, previous_counter=5).counter == 1000


def test_highest_counter_after_its_predecessor(device: factory.Device) -> None:
    obj = device.assertion_object(CDH, counter=2**32 - 1)
    assert verify(obj, device, previous_counter=2**32 - 2).counter == 2**32 - 1


def test_sequence_of_assertions_advances_the_counter(device: factory.Device) -> None:
    stored = 0
    for i in range(3):
        payload = client_data_hash(f"payload {i}")
        obj = device.assertion_object(payload)
        stored = verify(obj, device, cdh=payload, previous_counter=stored).counter
    assert stored == 3


def test_public_key_may_be_a_loaded_key(device: factory.Device) -> None:
    obj = device.assertion_object(CDH, counter=1)
    assert verify(obj, device, public_key=device.private_key.public_key()).counter == 1


def test_ios27_extensions_are_accepted_and_surfaced(device: factory.Device) -> None:
    obj = device.assertion_object(CDH, counter=7, extensions=dict(factory.IOS27_EXTENSIONS))
    result = verify(obj, device, previous_counter=6)
    assert result.counter == 7
    assert result.extensions == AuthDataExtensions(validation_category=1, bundle_version="1")


def test_unknown_extensions_are_surfaced(device: factory.Device) -> None:
    extensions = {"apple_bundle_version_01": "4.2", "apple_new_02": 12}
    result = verify(device.assertion_object(CDH, counter=1, extensions=extensions), device)
    assert result.extensions is not None
    assert result.extensions.bundle_version == "4.2"
    assert result.extensions.validation_category is None
    assert dict(result.extensions.other) == {"apple_new_02": 12}


@pytest.mark.parametrize("flags", [0x40, 0x41, 0x00])
def test_flags_are_not_interpreted(device: factory.Device, flags: int) -> None:
    obj = device.assertion_object(CDH, counter=1, flags=flags)
    assert verify(obj, device).counter == 1


def test_empty_payload_hash_is_just_another_hash(device: factory.Device) -> None:
    cdh = client_data_hash("")
    assert verify(device.assertion_object(cdh, counter=1), device, cdh=cdh).counter == 1


# --- counter_replay ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counter", "stored"),
    [
        pytest.param(0, 0, id="zero-after-zero"),
        pytest.param(5, 5, id="equal"),
        pytest.param(4, 5, id="lower"),
        pytest.param(1, 2**32 - 1, id="wrapped-around"),
    ],
)
def test_stalled_or_falling_counter_is_a_replay(
    device: factory.Device, counter: int, stored: int
) -> None:
    obj = device.assertion_object(CDH, counter=counter)
    assert rejection(lambda: verify(obj, device, previous_counter=stored)) is (
        Reason.COUNTER_REPLAY
    )


def test_same_assertion_twice_is_a_replay(device: factory.Device) -> None:
    obj = device.assertion_object(CDH)
    stored = verify(obj, device, previous_counter=0).counter
    assert rejection(lambda: verify(obj, device, previous_counter=stored)) is (
        Reason.COUNTER_REPLAY
    )


@pytest.mark.parametrize("previous", [-1, 2**32])
def test_stored_counter_out_of_range_is_a_programming_error(
    device: factory.Device, previous: int
) -> None:
    obj = device.assertion_object(CDH, counter=1)
    with pytest.raises(ValueError):
        verify(obj, device, previous_counter=previous)


# --- app_id_mismatch --------------------------------------------------------------------------


def test_rp_id_hash_of_another_app_is_rejected(device: factory.Device) -> None:
    obj = device.assertion_object(CDH, counter=1, rp_id=OTHER_APP_ID)
    assert rejection(lambda: verify(obj, device)) is Reason.APP_ID_MISMATCH


def test_key_registered_for_another_app_is_rejected(device: factory.Device) -> None:
    obj = device.assertion_object(CDH, counter=1)
    assert rejection(lambda: verify(obj, device, app_id=OTHER_APP_ID)) is Reason.APP_ID_MISMATCH


def test_rp_id_hash_replaced_after_signing_is_rejected(device: factory.Device) -> None:
    obj = device.assertion_object(CDH, counter=1)

    def change(decoded: dict[str, Any]) -> None:
        decoded["authenticatorData"] = rp_id_hash(OTHER_APP_ID) + decoded["authenticatorData"][32:]

    assert rejection(lambda: verify(mutate(obj, change), device, app_id=OTHER_APP_ID)) is (
        Reason.SIGNATURE_INVALID
    )


# --- signature_invalid ------------------------------------------------------------------------


def test_signed_by_another_key_is_rejected(device: factory.Device) -> None:
    obj = device.assertion_object(
        CDH, counter=1, signing_key=ec.generate_private_key(ec.SECP256R1())
    )
    assert rejection(lambda: verify(obj, device)) is Reason.SIGNATURE_INVALID


def test_verified_with_another_devices_key_is_rejected(
    ca: factory.TestCA, device: factory.Device
) -> None:
    obj = device.assertion_object(CDH, counter=1)
    other = factory.Device(ca=ca)
    assert rejection(lambda: verify(obj, device, public_key=other.public_point)) is (
        Reason.SIGNATURE_INVALID
    )


@pytest.mark.parametrize(
    "cdh",
    [
        pytest.param(client_data_hash(PAYLOAD.replace("10", "1000")), id="other-payload"),
        pytest.param(client_data_hash(PAYLOAD + "\n"), id="payload-with-newline"),
        pytest.param(PAYLOAD.encode(), id="payload-not-hashed"),
        pytest.param(b"", id="empty"),
    ],
)
def test_payload_differs_is_rejected(device: factory.Device, cdh: bytes) -> None:
    obj = device.assertion_object(CDH, counter=1)
    assert rejection(lambda: verify(obj, device, cdh=cdh)) is Reason.SIGNATURE_INVALID


def flip_signature_byte(index: int) -> Callable[[dict[str, Any]], None]:
    def change(decoded: dict[str, Any]) -> None:
        signature = bytearray(decoded["signature"])
        signature[index] ^= 0x01
        decoded["signature"] = bytes(signature)

    return change


def set_signature(value: bytes) -> Callable[[dict[str, Any]], None]:
    def change(decoded: dict[str, Any]) -> None:
        decoded["signature"] = value

    return change


def change_auth_data(change: Callable[[bytes], bytes]) -> Callable[[dict[str, Any]], None]:
    def apply(decoded: dict[str, Any]) -> None:
        decoded["authenticatorData"] = change(decoded["authenticatorData"])

    return apply


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(flip_signature_byte(-1), id="bit-flip-last-byte"),
        pytest.param(flip_signature_byte(10), id="bit-flip-in-r"),
        pytest.param(flip_signature_byte(0), id="bit-flip-der-tag"),
        pytest.param(flip_signature_byte(1), id="bit-flip-der-length"),
        pytest.param(set_signature(b""), id="empty-signature"),
        pytest.param(set_signature(b"garbage signature bytes"), id="garbage-signature"),
        pytest.param(set_signature(bytes(64)), id="raw-64-zero-bytes"),
        pytest.param(set_signature(bytes.fromhex("3006020100020100")), id="r-and-s-zero"),
        pytest.param(
            change_auth_data(lambda ad: ad[:32] + b"\x41" + ad[33:]), id="flags-changed-after"
        ),
        pytest.param(
            change_auth_data(lambda ad: ad[:33] + struct.pack(">I", 9)), id="counter-raised-after"
        ),
        pytest.param(
            change_auth_data(
                lambda ad: ad + cbor2.dumps(dict(factory.IOS27_EXTENSIONS), canonical=True)
            ),
            id="extensions-added-after",
        ),
    ],
)
def test_tampered_signature_or_data_is_rejected(
    device: factory.Device, change: Callable[[dict[str, Any]], None]
) -> None:
    obj = device.assertion_object(CDH, counter=1)
    verify(obj, device)  # the baseline passes
    assert rejection(lambda: verify(mutate(obj, change), device)) is Reason.SIGNATURE_INVALID


def test_raw_ecdsa_signature_is_rejected(device: factory.Device) -> None:
    obj = device.assertion_object(CDH, counter=1)
    der_signature = cbor2.loads(obj)["signature"]
    r, s = decode_dss_signature(der_signature)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert rejection(lambda: verify(mutate(obj, set_signature(raw)), device)) is (
        Reason.SIGNATURE_INVALID
    )


def test_signature_over_the_nonce_without_the_second_hash_is_rejected(
    device: factory.Device,
) -> None:
    authenticator_data = rp_id_hash(APP_ID) + struct.pack(">BI", 0x40, 1)
    good = signed(device.private_key, authenticator_data)
    assert verify(good, device).counter == 1
    prehashed = signed(device.private_key, authenticator_data, prehashed=True)
    assert rejection(lambda: verify(prehashed, device)) is Reason.SIGNATURE_INVALID


# --- malformed_token --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d.pop("signature"), id="missing-signature"),
        pytest.param(lambda d: d.pop("authenticatorData"), id="missing-authenticator-data"),
        pytest.param(lambda d: d.update(extra=b""), id="extra-key"),
        pytest.param(lambda d: d.update(signature=d["signature"].hex()), id="signature-text"),
        pytest.param(lambda d: d.update(signature=None), id="signature-null"),
        pytest.param(
            lambda d: d.update(authenticatorData=list(d["authenticatorData"])),
            id="authenticator-data-array",
        ),
        pytest.param(
            lambda d: d.update(authenticatorData=d["authenticatorData"][:36]),
            id="authenticator-data-36-bytes",
        ),
        pytest.param(lambda d: d.update(authenticatorData=b""), id="authenticator-data-empty"),
        pytest.param(
            lambda d: d.update(authenticatorData=d["authenticatorData"] + b"\x00"),
            id="authenticator-data-trailing-int",
        ),
        pytest.param(
            lambda d: d.update(
                authenticatorData=d["authenticatorData"]
                + cbor2.dumps(dict(factory.IOS27_EXTENSIONS), canonical=True)
                + b"\x00"
            ),
            id="byte-after-extensions",
        ),
        pytest.param(
            lambda d: d.update(
                authenticatorData=d["authenticatorData"]
                + cbor2.dumps({"apple_validation_category_01": 1}, canonical=True)
            ),
            id="extension-wrong-type",
        ),
        pytest.param(lambda d: d.update(signature=b"\x00" * 40_000), id="object-over-32KiB"),
        pytest.param(lambda d: d.update(Signature=d.pop("signature")), id="key-case"),
    ],
)
def test_malformed_assertion_is_rejected(
    device: factory.Device, change: Callable[[dict[str, Any]], None]
) -> None:
    obj = device.assertion_object(CDH, counter=1)
    assert rejection(lambda: verify(mutate(obj, change), device)) is Reason.MALFORMED_TOKEN


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(b"", id="empty"),
        pytest.param(cbor2.dumps([], canonical=True), id="array"),
        pytest.param(cbor2.dumps({}, canonical=True), id="empty-map"),
        pytest.param(cbor2.dumps("signature", canonical=True), id="text"),
    ],
)
def test_non_assertion_cbor_is_rejected(device: factory.Device, obj: bytes) -> None:
    assert rejection(lambda: verify(obj, device)) is Reason.MALFORMED_TOKEN


def test_attestation_object_is_not_an_assertion(device: factory.Device) -> None:
    obj = device.attestation_object(CDH, now=datetime(2026, 6, 1, tzinfo=UTC))
    assert rejection(lambda: verify(obj, device)) is Reason.MALFORMED_TOKEN


def test_stored_public_key_that_is_not_a_p256_point_is_a_programming_error(
    device: factory.Device,
) -> None:
    obj = device.assertion_object(CDH, counter=1)
    with pytest.raises(ValueError):
        verify(obj, device, public_key=b"\x04" + bytes(64))
