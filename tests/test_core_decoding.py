"""Strict decoding in the core: base64 text, CBOR objects and authenticator data."""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Callable
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import cbor2
import pytest

from tests import factory
from tests.fuzzing import (
    append_bytes,
    delete_range,
    flip_bits,
    insert_bytes,
    set_byte,
    truncate,
)
from worker.core import (
    Policy,
    Reason,
    Rejected,
    TrustStore,
    b64decode_strict,
    verify_assertion,
    verify_attestation,
)
from worker.core.assertion import _read_canonical_layout
from worker.core.attestation import parse_attestation_object
from worker.core.authdata import (
    AuthDataExtensions,
    _read_cose_p256,
    parse_assertion_auth_data,
    parse_attested_auth_data,
)
from worker.core.decoding import (
    MAX_TOKEN_BYTES,
    MAX_TOKEN_CHARS,
    decode_cbor_exact,
    decode_cbor_prefix,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CDH = factory.client_data_hash("decoding challenge")


@pytest.fixture(scope="module")
def ca() -> factory.TestCA:
    return factory.TestCA.create()


@pytest.fixture(scope="module")
def policy(ca: factory.TestCA) -> Policy:
    return Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[factory.APP_ID]
    )


@pytest.fixture
def device(ca: factory.TestCA) -> factory.Device:
    return factory.Device(ca=ca)


def assert_malformed(call: Callable[[], object]) -> None:
    with pytest.raises(Rejected) as info:
        call()
    assert info.value.reason is Reason.MALFORMED_TOKEN


def head(major: int, length: int) -> bytes:
    """CBOR initial byte(s) for ``major`` with an explicit 8-byte length argument."""
    return bytes([(major << 5) | 27]) + length.to_bytes(8, "big")


# --- base64 ---------------------------------------------------------------------------------


def strict(text: str, max_chars: int = 100, reason: Reason = Reason.MALFORMED_TOKEN) -> bytes:
    return b64decode_strict(text, reason=reason, what="token", max_chars=max_chars)


@pytest.mark.parametrize(
    "raw", [b"", b"\x00", b"\x00\x01", b"\x00\x01\x02", b"\xfb\xff\xbf", bytes(range(256))]
)
def test_base64_round_trips_canonical_text(raw: bytes) -> None:
    assert strict(base64.b64encode(raw).decode("ascii"), max_chars=1000) == raw


def test_base64_key_id_with_plus_and_slash_decodes_to_32_bytes() -> None:
    key_id = bytes.fromhex("fbff" * 16)
    text = base64.b64encode(key_id).decode("ascii")
    assert len(text) == 44 and "+" in text and "/" in text and text.endswith("=")
    assert strict(text) == key_id


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("-_-_", id="base64url-chars"),
        pytest.param("AA-_", id="base64url-mixed"),
        pytest.param("AA EC", id="space-inside"),
        pytest.param(" AAEC", id="leading-space"),
        pytest.param("\tAAEC", id="tab"),
        pytest.param("AAEC\n", id="trailing-newline"),
        pytest.param("AA\nEC", id="newline-inside"),
        pytest.param("AAEC\r\n", id="crlf"),
        pytest.param("AAE", id="missing-one-pad"),
        pytest.param("AA", id="missing-two-pads"),
        pytest.param("A===", id="three-pads"),
        pytest.param("A=AA", id="pad-inside"),
        pytest.param("AA==AAAA", id="data-after-pad"),
        pytest.param("AB==", id="noncanonical-trailing-bits-one-byte"),
        pytest.param("AAF=", id="noncanonical-trailing-bits-two-bytes"),
        pytest.param("AAE\u00e9", id="non-ascii-letter"),
        pytest.param("\uff21AAA", id="fullwidth-letter"),
        pytest.param("AAE*", id="symbol"),
    ],
)
def test_base64_rejects_non_standard_text(text: str) -> None:
    assert_malformed(lambda: strict(text))


def test_base64_rejects_over_long_text_before_decoding() -> None:
    assert len(strict("AAAA" * 25, max_chars=100)) == 75
    assert_malformed(lambda: strict("AAAA" * 26, max_chars=100))


def test_base64_token_limit_admits_largest_token() -> None:
    text = base64.b64encode(bytes(MAX_TOKEN_BYTES)).decode("ascii")
    assert len(strict(text, max_chars=MAX_TOKEN_CHARS)) == MAX_TOKEN_BYTES
    too_long = base64.b64encode(bytes(MAX_TOKEN_BYTES + 3)).decode("ascii")
    assert_malformed(lambda: strict(too_long, max_chars=MAX_TOKEN_CHARS))


def test_base64_raises_with_the_reason_asked_for() -> None:
    with pytest.raises(Rejected) as info:
        strict("AA-_", reason=Reason.INVALID_REQUEST)
    assert info.value.reason is Reason.INVALID_REQUEST


# --- CBOR -----------------------------------------------------------------------------------


def test_cbor_exact_decodes_one_item() -> None:
    assert decode_cbor_exact(cbor2.dumps({"a": [1, b"x", "y"]}, canonical=True)) == {
        "a": [1, b"x", "y"]
    }


def test_cbor_prefix_reports_the_end_offset() -> None:
    data = b"\xff\xff" + cbor2.dumps({"a": 1}, canonical=True) + cbor2.dumps([2], canonical=True)
    item, end = decode_cbor_prefix(data, 2)
    assert item == {"a": 1}
    assert data[end:] == cbor2.dumps([2], canonical=True)


def test_cbor_realistic_nesting_is_accepted() -> None:
    nested: object = b"leaf"
    for _ in range(4):
        nested = [nested]
    assert decode_cbor_exact(cbor2.dumps({"a": nested}, canonical=True)) == {"a": nested}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(cbor2.dumps({"a": 1}, canonical=True) + b"\x00", id="trailing-byte"),
        pytest.param(
            cbor2.dumps({"a": 1}, canonical=True) + cbor2.dumps({"a": 1}, canonical=True),
            id="two-objects",
        ),
        pytest.param(bytes.fromhex("c11a514b67b0"), id="tag-1-epoch-date"),
        pytest.param(bytes.fromhex("c074323031332d30332d32315432303a30343a30305a"), id="tag-0"),
        pytest.param(bytes.fromhex("d9d9f7a0"), id="tag-55799-self-describe"),
        pytest.param(bytes.fromhex("c249010000000000000000"), id="tag-2-bignum"),
        pytest.param(bytes.fromhex("dbffffffffffffffff00"), id="tag-2**64-1"),
        pytest.param(cbor2.dumps({"a": cbor2.CBORTag(1, 5)}, canonical=True), id="tag-inside-map"),
        pytest.param(bytes.fromhex("5f42010243030405ff"), id="indefinite-bytes"),
        pytest.param(bytes.fromhex("7f6161ff"), id="indefinite-text"),
        pytest.param(bytes.fromhex("9f01ff"), id="indefinite-array"),
        pytest.param(bytes.fromhex("bf616101ff"), id="indefinite-map"),
        pytest.param(bytes.fromhex("a2616101616102"), id="duplicate-text-key"),
        pytest.param(bytes.fromhex("a201010102"), id="duplicate-int-key"),
        pytest.param(b"\x81" * 20 + b"\x00", id="nesting-20"),
        pytest.param(b"\x81" * 100_000 + b"\x00", id="nesting-100000"),
        pytest.param(b"\xa1\x00" * 50 + b"\x00", id="nested-maps-50"),
        pytest.param(cbor2.dumps({"a": b"xyz"}, canonical=True)[:-1], id="truncated-bytes"),
        pytest.param(cbor2.dumps({"a": "xyz"}, canonical=True)[:-2], id="truncated-text"),
        pytest.param(cbor2.dumps([1, 2, 3], canonical=True)[:-1], id="truncated-array"),
        pytest.param(b"\x19\x01", id="truncated-integer"),
        pytest.param(bytes.fromhex("5a7fffffff00"), id="bytes-declared-2**31"),
        pytest.param(head(2, 2**64 - 1) + b"\x00", id="bytes-declared-2**64"),
        pytest.param(head(3, 2**40) + b"a", id="text-declared-2**40"),
        pytest.param(head(4, 2**64 - 1) + b"\x00", id="array-declared-2**64"),
        pytest.param(head(5, 2**40) + b"\x00\x00", id="map-declared-2**40"),
        pytest.param(b"\xff", id="lone-break"),
        pytest.param(b"\x1c", id="reserved-additional-info"),
        pytest.param(b"\x62\xff\xfe", id="invalid-utf8-text"),
    ],
)
def test_cbor_rejects(data: bytes) -> None:
    assert_malformed(lambda: decode_cbor_exact(data))


def test_cbor_prefix_past_the_end_is_rejected() -> None:
    assert_malformed(lambda: decode_cbor_prefix(b"\x00", 1))


# --- CBOR defects in otherwise valid objects --------------------------------------------------


def self_describe(obj: bytes) -> bytes:
    return bytes.fromhex("d9d9f7") + obj


def indefinite_map(obj: bytes) -> bytes:
    items = cbor2.loads(obj)
    body = b"".join(
        cbor2.dumps(k, canonical=True) + cbor2.dumps(v, canonical=True) for k, v in items.items()
    )
    return b"\xbf" + body + b"\xff"


def duplicate_first_key(obj: bytes) -> bytes:
    items = cbor2.loads(obj)
    first = next(iter(items))
    body = b"".join(
        cbor2.dumps(k, canonical=True) + cbor2.dumps(v, canonical=True) for k, v in items.items()
    )
    header = cbor2.dumps({str(i): 0 for i in range(len(items) + 1)}, canonical=True)[:1]
    return (
        header
        + body
        + cbor2.dumps(first, canonical=True)
        + cbor2.dumps(items[first], canonical=True)
    )


def tagged_auth_data(key: str) -> Callable[[bytes], bytes]:
    def change(obj: bytes) -> bytes:
        items = cbor2.loads(obj)
        items[key] = cbor2.CBORTag(24, items[key])  # "embedded CBOR", still a tag
        return cbor2.dumps(items, canonical=True)

    return change


OBJECT_DEFECTS: list[Any] = [
    pytest.param(lambda obj: obj + b"\x00", id="trailing-byte"),
    pytest.param(lambda obj: obj + obj, id="object-twice"),
    pytest.param(lambda obj: obj[:-1], id="truncated-by-one"),
    pytest.param(lambda obj: obj[: len(obj) // 2], id="truncated-to-half"),
    pytest.param(lambda obj: obj[:1], id="truncated-to-header"),
    pytest.param(self_describe, id="tag-55799"),
    pytest.param(lambda obj: bytes.fromhex("c1") + obj, id="tag-1"),
    pytest.param(indefinite_map, id="indefinite-length-map"),
    pytest.param(duplicate_first_key, id="duplicate-key"),
    pytest.param(
        lambda obj: cbor2.dumps([cbor2.loads(obj)], canonical=True), id="wrapped-in-array"
    ),
    pytest.param(lambda obj: cbor2.dumps(obj, canonical=True), id="wrapped-in-bytes"),
]


@pytest.mark.parametrize("defect", OBJECT_DEFECTS)
def test_attestation_cbor_defects(
    device: factory.Device, policy: Policy, defect: Callable[[bytes], bytes]
) -> None:
    valid = device.attestation_object(CDH, now=NOW)
    verify_attestation(
        attestation_object=valid, key_id=device.key_id, client_data_hash=CDH, policy=policy, now=NOW
    )
    assert_malformed(
        lambda: verify_attestation(
            attestation_object=defect(valid),
            key_id=device.key_id,
            client_data_hash=CDH,
            policy=policy,
            now=NOW,
        )
    )


@pytest.mark.parametrize("defect", [*OBJECT_DEFECTS, tagged_auth_data("authenticatorData")])
def test_assertion_cbor_defects(device: factory.Device, defect: Callable[[bytes], bytes]) -> None:
    valid = device.assertion_object(CDH, counter=1)
    verify_assertion(
        assertion_object=valid,
        client_data_hash=CDH,
        public_key=device.public_point,
        app_id=factory.APP_ID,
        previous_counter=0,
    )
    assert_malformed(
        lambda: verify_assertion(
            assertion_object=defect(valid),
            client_data_hash=CDH,
            public_key=device.public_point,
            app_id=factory.APP_ID,
            previous_counter=0,
        )
    )


def test_attestation_with_tagged_auth_data_is_rejected(
    device: factory.Device, policy: Policy
) -> None:
    obj = tagged_auth_data("authData")(device.attestation_object(CDH, now=NOW))
    assert_malformed(
        lambda: verify_attestation(
            attestation_object=obj,
            key_id=device.key_id,
            client_data_hash=CDH,
            policy=policy,
            now=NOW,
        )
    )


# --- attestation authData ---------------------------------------------------------------------


def test_attested_auth_data_fields(device: factory.Device) -> None:
    parsed = parse_attested_auth_data(device.auth_data())
    assert parsed.rp_id_hash == hashlib.sha256(factory.APP_ID.encode()).digest()
    assert parsed.flags == 0x40
    assert parsed.sign_count == 0
    assert parsed.aaguid == factory.AAGUID_PRODUCTION
    assert parsed.credential_id == device.key_id
    assert parsed.public_point == device.public_point
    assert parsed.extensions is None


def test_sign_count_is_big_endian(device: factory.Device) -> None:
    assert parse_attested_auth_data(device.auth_data(sign_count=0x01020304)).sign_count == (
        0x01020304
    )


def test_ios27_extensions_are_parsed_while_flags_stay_0x40(device: factory.Device) -> None:
    parsed = parse_attested_auth_data(device.auth_data(extensions=dict(factory.IOS27_EXTENSIONS)))
    assert parsed.flags == 0x40
    assert parsed.public_point == device.public_point
    assert parsed.extensions == AuthDataExtensions(validation_category=1, bundle_version="1")
    assert dict(parsed.extensions.other) == {}


@pytest.mark.parametrize(
    ("raw", "category"),
    [
        pytest.param(b"\x01\x00\x00\x00", 1, id="one"),
        pytest.param(b"\x00\x00\x00\x01", 0x01000000, id="little-endian-high-byte"),
        pytest.param(b"\x02\x01\x00\x00", 0x0102, id="two-bytes-used"),
        pytest.param(b"\xff\xff\xff\xff", 2**32 - 1, id="max"),
    ],
)
def test_validation_category_is_four_bytes_little_endian(
    device: factory.Device, raw: bytes, category: int
) -> None:
    ext = {"apple_validation_category_01": raw, "apple_bundle_version_01": "27.0.1 (42)"}
    parsed = parse_attested_auth_data(device.auth_data(extensions=ext))
    assert parsed.extensions is not None
    assert parsed.extensions.validation_category == category
    assert parsed.extensions.bundle_version == "27.0.1 (42)"


def test_unknown_extension_keys_are_kept_in_other(device: factory.Device) -> None:
    ext = {
        "apple_bundle_version_01": "3",
        "apple_future_text_01": "x",
        "apple_future_int_01": -7,
        "apple_future_bytes_01": b"\x00\x01",
    }
    parsed = parse_attested_auth_data(device.auth_data(extensions=ext))
    assert parsed.extensions is not None
    assert parsed.extensions.validation_category is None
    assert parsed.extensions.bundle_version == "3"
    assert dict(parsed.extensions.other) == {
        "apple_future_text_01": "x",
        "apple_future_int_01": -7,
        "apple_future_bytes_01": b"\x00\x01",
    }
    assert isinstance(parsed.extensions.other, MappingProxyType)
    with pytest.raises(TypeError):
        parsed.extensions.other["injected"] = 1  # type: ignore[index]


def test_empty_extensions_map_is_surfaced_as_empty(device: factory.Device) -> None:
    parsed = parse_attested_auth_data(device.auth_data(extensions={}))
    assert parsed.extensions == AuthDataExtensions()


def test_extensions_map_entry_limit(device: factory.Device) -> None:
    at_limit = {f"k{i}": i for i in range(32)}
    parsed = parse_attested_auth_data(device.auth_data(extensions=at_limit))
    assert parsed.extensions is not None and len(parsed.extensions.other) == 32
    over = {f"k{i}": i for i in range(33)}
    assert_malformed(lambda: parse_attested_auth_data(device.auth_data(extensions=over)))


BAD_EXTENSIONS: list[Any] = [
    pytest.param({"apple_validation_category_01": 1}, id="category-int"),
    pytest.param({"apple_validation_category_01": b"\x01\x00\x00"}, id="category-3-bytes"),
    pytest.param({"apple_validation_category_01": b"\x01\x00\x00\x00\x00"}, id="category-5-bytes"),
    pytest.param({"apple_validation_category_01": "1"}, id="category-text"),
    pytest.param({"apple_bundle_version_01": b"1"}, id="bundle-version-bytes"),
    pytest.param({"apple_bundle_version_01": 1}, id="bundle-version-int"),
    pytest.param({"apple_bundle_version_01": None}, id="bundle-version-null"),
    pytest.param({"apple_future_01": [1]}, id="unknown-array-value"),
    pytest.param({"apple_future_01": {"a": 1}}, id="unknown-map-value"),
    pytest.param({"apple_future_01": 1.5}, id="unknown-float-value"),
    pytest.param({"apple_future_01": True}, id="unknown-bool-value"),
    pytest.param({"apple_future_01": None}, id="unknown-null-value"),
    pytest.param({1: "x"}, id="int-key"),
    pytest.param({b"apple_bundle_version_01": "1"}, id="bytes-key"),
]


@pytest.mark.parametrize("extensions", BAD_EXTENSIONS)
def test_attested_extensions_with_wrong_types_are_rejected(
    device: factory.Device, extensions: dict[Any, Any]
) -> None:
    assert_malformed(lambda: parse_attested_auth_data(device.auth_data(extensions=extensions)))


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(cbor2.dumps([1], canonical=True), id="array"),
        pytest.param(cbor2.dumps(1, canonical=True), id="int"),
        pytest.param(cbor2.dumps(b"apple", canonical=True), id="bytes"),
        pytest.param(cbor2.dumps("apple", canonical=True), id="text"),
        pytest.param(b"\x00", id="one-zero-byte"),
        pytest.param(b"\xff", id="break-byte"),
        pytest.param(cbor2.dumps({"a": 1}, canonical=True)[:-1], id="truncated-map"),
    ],
)
def test_attested_trailer_that_is_not_a_map_is_rejected(
    device: factory.Device, tail: bytes
) -> None:
    assert_malformed(lambda: parse_attested_auth_data(device.auth_data() + tail))


@pytest.mark.parametrize(
    "trailer",
    [
        pytest.param(b"\x00", id="one-byte"),
        pytest.param(cbor2.dumps({"a": 1}, canonical=True), id="second-map"),
        pytest.param(b"\xff\xff\xff", id="garbage"),
    ],
)
def test_bytes_after_the_extensions_map_are_rejected(
    device: factory.Device, trailer: bytes
) -> None:
    raw = device.auth_data(extensions=dict(factory.IOS27_EXTENSIONS)) + trailer
    assert_malformed(lambda: parse_attested_auth_data(raw))


@pytest.mark.parametrize(
    "length",
    [
        pytest.param(0, id="empty"),
        pytest.param(32, id="rp-id-hash-only"),
        pytest.param(36, id="header-minus-one"),
        pytest.param(37, id="header-only"),
        pytest.param(52, id="inside-aaguid"),
        pytest.param(54, id="inside-credential-id-length"),
        pytest.param(55, id="before-credential-id"),
        pytest.param(70, id="inside-credential-id"),
        pytest.param(87, id="before-cose-key"),
        pytest.param(100, id="inside-cose-key"),
        pytest.param(-1, id="cose-key-minus-one-byte"),
    ],
)
def test_truncated_attested_auth_data_is_rejected(device: factory.Device, length: int) -> None:
    raw = device.auth_data()
    assert len(raw) > 100
    assert_malformed(lambda: parse_attested_auth_data(raw[:length]))


@pytest.mark.parametrize(
    "declared",
    [
        pytest.param(33, id="one-more-than-present"),
        pytest.param(1024, id="over-1023"),
        pytest.param(0xFFFF, id="max"),
    ],
)
def test_credential_id_length_beyond_the_data_is_rejected(
    device: factory.Device, declared: int
) -> None:
    raw = bytearray(device.auth_data())
    raw[53:55] = declared.to_bytes(2, "big")
    assert_malformed(lambda: parse_attested_auth_data(bytes(raw)))


def cose(device: factory.Device, **changes: Any) -> dict[Any, Any]:
    key: dict[Any, Any] = device.cose_key()
    for label, value in changes.items():
        number = int(label.replace("m", "-"))
        if value is None:
            del key[number]
        else:
            key[number] = value
    return key


BAD_COSE: list[Any] = [
    pytest.param(lambda d: cose(d, m3=None), id="missing-y"),
    pytest.param(lambda d: cose(d, **{"3": None}), id="missing-alg"),
    pytest.param(lambda d: cose(d, **{"4": b"\x01"}), id="extra-label"),
    pytest.param(lambda d: {**cose(d, m2=None), "x": d.public_point[1:33]}, id="text-label"),
    pytest.param(lambda d: cose(d, **{"1": 3}), id="kty-rsa"),
    pytest.param(lambda d: cose(d, **{"1": 1}), id="kty-okp"),
    pytest.param(lambda d: cose(d, **{"3": -35}), id="alg-es384"),
    pytest.param(lambda d: cose(d, **{"3": -8}), id="alg-eddsa"),
    pytest.param(lambda d: cose(d, m1=2), id="curve-p384"),
    pytest.param(lambda d: cose(d, m1=8), id="curve-secp256k1"),
    pytest.param(lambda d: cose(d, m2=d.public_point[1:32]), id="x-31-bytes"),
    pytest.param(lambda d: cose(d, m3=d.public_point[33:] + b"\x00"), id="y-33-bytes"),
    pytest.param(lambda d: cose(d, m2=bytes(48), m3=bytes(48)), id="p384-sized-coordinates"),
    pytest.param(lambda d: cose(d, m2=d.public_point[1:33].hex()), id="x-as-text"),
    pytest.param(lambda d: cose(d, m3=int.from_bytes(d.public_point[33:])), id="y-as-int"),
    pytest.param(lambda d: list(d.cose_key().items()), id="array-not-map"),
    pytest.param(lambda d: d.public_point, id="raw-point-bytes"),
    pytest.param(lambda d: {}, id="empty-map"),
]


@pytest.mark.parametrize("make_key", BAD_COSE)
def test_wrong_cose_key_is_rejected(device: factory.Device, make_key: Callable[..., Any]) -> None:
    raw = device.auth_data(cose_key=make_key(device))
    assert_malformed(lambda: parse_attested_auth_data(raw))


# The COSE key must be exactly {1: 2, 3: -7, -1: 1, -2: x, -3: y} (APPLE.md). CBOR `true` and
# floats compare equal to 1 and 2 in Python, so a key written with them must be refused by type,
# as the extension values already are.
@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda d: cose(d, **{"1": 2.0}), id="kty-float"),
        pytest.param(lambda d: cose(d, m1=True), id="crv-true"),
        pytest.param(
            lambda d: {True if k == 1 else k: v for k, v in d.cose_key().items()},
            id="label-true",
        ),
    ],
)
def test_cose_key_with_lookalike_types_is_rejected(
    device: factory.Device, make_key: Callable[..., Any]
) -> None:
    raw = device.auth_data(cose_key=make_key(device))
    assert_malformed(lambda: parse_attested_auth_data(raw))


# --- assertion authenticatorData --------------------------------------------------------------


def assertion_auth_data(counter: int = 1, flags: int = 0x40) -> bytes:
    return hashlib.sha256(factory.APP_ID.encode()).digest() + bytes([flags]) + counter.to_bytes(4)


def test_assertion_auth_data_fields() -> None:
    parsed = parse_assertion_auth_data(assertion_auth_data(counter=0x01020304))
    assert parsed.rp_id_hash == hashlib.sha256(factory.APP_ID.encode()).digest()
    assert parsed.flags == 0x40
    assert parsed.counter == 0x01020304
    assert parsed.extensions is None


def test_assertion_auth_data_with_extensions() -> None:
    raw = assertion_auth_data() + cbor2.dumps(
        {
            "apple_validation_category_01": b"\x05\x00\x00\x00",
            "apple_bundle_version_01": "9",
            "apple_other_01": "z",
        },
        canonical=True,
    )
    parsed = parse_assertion_auth_data(raw)
    assert parsed.counter == 1
    assert parsed.extensions is not None
    assert parsed.extensions.validation_category == 5
    assert parsed.extensions.bundle_version == "9"
    assert dict(parsed.extensions.other) == {"apple_other_01": "z"}


@pytest.mark.parametrize("length", [0, 1, 32, 33, 36])
def test_truncated_assertion_auth_data_is_rejected(length: int) -> None:
    assert_malformed(lambda: parse_assertion_auth_data(assertion_auth_data()[:length]))


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(
            cbor2.dumps(dict(factory.IOS27_EXTENSIONS), canonical=True) + b"\x00",
            id="byte-after-map",
        ),
        pytest.param(cbor2.dumps([1], canonical=True), id="array"),
        pytest.param(b"\x00", id="int"),
        pytest.param(cbor2.dumps({"a": 1}, canonical=True)[:-1], id="truncated-map"),
    ],
)
def test_assertion_auth_data_bad_tail_is_rejected(tail: bytes) -> None:
    assert_malformed(lambda: parse_assertion_auth_data(assertion_auth_data() + tail))


@pytest.mark.parametrize("extensions", BAD_EXTENSIONS)
def test_assertion_extensions_with_wrong_types_are_rejected(extensions: dict[Any, Any]) -> None:
    raw = assertion_auth_data() + cbor2.dumps(extensions, canonical=True)
    assert_malformed(lambda: parse_assertion_auth_data(raw))


# Deterministic encoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x18\x01", id="int-not-shortest"),
        pytest.param(b"\x59\x00\x01a", id="bytes-length-not-shortest"),
        pytest.param(b"\xa2\x61b\x01\x61a\x02", id="map-keys-unsorted"),
        pytest.param(b"\xa2\x62aa\x01\x61b\x02", id="map-keys-longer-first"),
        pytest.param(b"\xfa\x3f\x80\x00\x00", id="float-not-shortest"),
    ],
)
def test_non_deterministic_cbor_is_rejected(data: bytes) -> None:
    with pytest.raises(Rejected) as info:
        decode_cbor_exact(data)
    assert info.value.reason is Reason.MALFORMED_TOKEN


def test_reordered_attestation_map_is_rejected(device: factory.Device) -> None:
    """The same attestation with its top-level keys in another order is refused, although no
    signature covers that framing: only one encoding of an object is accepted."""
    raw = device.attestation_object(b"\x00" * 32, now=datetime(2026, 1, 1, tzinfo=UTC))
    parse_attestation_object(raw)
    obj = cbor2.loads(raw)
    reordered = b"\xa3" + b"".join(
        cbor2.dumps(k, canonical=True) + cbor2.dumps(obj[k], canonical=True)
        for k in ("authData", "fmt", "attStmt")
    )
    assert cbor2.loads(reordered) == obj
    with pytest.raises(Rejected) as info:
        parse_attestation_object(reordered)
    assert info.value.reason is Reason.MALFORMED_TOKEN


def test_fixed_layout_readers_agree_with_the_decoder() -> None:
    """The in-place readers of the two fixed layouts (an assertion object, a COSE P-256 key)
    never accept what the strict decoder refuses, and read the same values when they accept:
    over thousands of seeded mutations of real-shaped objects, including every length edge."""
    rng = random.Random(20261128)
    device = factory.Device(ca=factory.default_ca())
    assertion = device.assertion_object(CDH)
    cose = cbor2.dumps(device.cose_key(), canonical=True)
    edges = [
        cbor2.dumps({"signature": b"s" * s, "authenticatorData": b"a" * a}, canonical=True)
        for s in (0, 23, 24, 255, 256)
        for a in (23, 24, 37, 255, 256)
    ]
    mutators = [flip_bits, set_byte, truncate, append_bytes, insert_bytes, delete_range]
    fast_reads = 0
    for n in range(4000):
        base = [assertion, *edges][n % (1 + len(edges))]
        data = base if n < 40 else rng.choice(mutators)(rng, base)
        fields = _read_canonical_layout(data)
        if fields is not None:
            fast_reads += 1
            item, end = decode_cbor_prefix(data)
            assert end == len(data)
            assert item == {"signature": fields[0], "authenticatorData": fields[1]}
        key = cose if n % 2 else rng.choice(mutators)(rng, cose)
        framed = b"\x00" * 3 + key + b"\x00"
        try:
            x, y, end = _read_cose_p256(framed, 3)
        except Rejected:
            continue
        item, library_end = decode_cbor_prefix(framed, 3)
        assert (item, end) == ({1: 2, 3: -7, -1: 1, -2: x, -3: y}, library_end)
    assert fast_reads > 40
