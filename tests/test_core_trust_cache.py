"""Trust stores, policies and the intermediate cache of the core."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests import factory
from worker.core import (
    APPLE_APP_ATTEST_ROOT_SHA256,
    AppConfig,
    Environment,
    IntermediateCache,
    Policy,
    PolicyError,
    Reason,
    Rejected,
    TrustStore,
    TrustStoreError,
    VerifiedAttestation,
    client_data_hash,
    verify_attestation,
)
from worker.core import trust as trust_module

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CDH = client_data_hash("cache challenge")
APP_ID = factory.APP_ID


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.fixture(scope="module")
def ca() -> factory.TestCA:
    return factory.TestCA.create()


@pytest.fixture(scope="module")
def other_ca() -> factory.TestCA:
    return factory.TestCA.create()


def policy_for(ca: factory.TestCA) -> Policy:
    return Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )


@pytest.fixture(scope="module")
def policy(ca: factory.TestCA) -> Policy:
    return policy_for(ca)


def verify(
    obj: bytes,
    device: factory.Device,
    policy: Policy,
    cache: IntermediateCache | None,
    *,
    now: datetime = NOW,
) -> VerifiedAttestation:
    return verify_attestation(
        attestation_object=obj,
        key_id=device.key_id,
        client_data_hash=CDH,
        policy=policy,
        now=now,
        cache=cache,
    )


def attest(
    ca: factory.TestCA,
    policy: Policy,
    cache: IntermediateCache | None,
    *,
    now: datetime = NOW,
    **overrides: Any,
) -> VerifiedAttestation:
    """Attest a fresh device of ``ca``; ``overrides`` go to the generator."""
    device = factory.Device(ca=ca)
    return verify(
        device.attestation_object(CDH, now=now, **overrides), device, policy, cache, now=now
    )


def rejection(call: Callable[[], object]) -> Reason:
    with pytest.raises(Rejected) as info:
        call()
    return info.value.reason


# --- TrustStore -------------------------------------------------------------------------------


def test_apple_store_pins_the_app_attest_root() -> None:
    store = TrustStore.apple()
    assert store.is_apple
    assert len(store.roots) == 1
    root = store.roots[0]
    fingerprint = root.fingerprint(hashes.SHA256()).hex().upper()
    assert fingerprint == "1CB9823BA28BA6AD2D33A006941DE2AE4F513EF1D4E831B9F7E0FA7B6242C932"
    assert store.fingerprints == (APPLE_APP_ATTEST_ROOT_SHA256,)
    assert root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        "Apple App Attestation Root CA"
    )
    assert root.not_valid_before_utc.date().isoformat() == "2020-03-18"
    assert root.not_valid_after_utc.date().isoformat() == "2045-03-15"


def test_apple_store_refuses_a_root_that_does_not_match_the_pin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trust_module, "APPLE_APP_ATTEST_ROOT_SHA256", bytes(32))
    with pytest.raises(TrustStoreError):
        TrustStore.apple()


def test_replacing_store_trusts_only_the_given_root(ca: factory.TestCA) -> None:
    store = TrustStore.replacing_apple_root(ca.root_pem)
    assert not store.is_apple
    assert store.roots == (ca.root_cert,)
    assert store.fingerprints == (sha256(ca.root_cert.public_bytes(serialization.Encoding.DER)),)


def test_replacing_store_accepts_several_roots(
    ca: factory.TestCA, other_ca: factory.TestCA
) -> None:
    store = TrustStore.replacing_apple_root(ca.root_pem + other_ca.root_pem)
    assert store.roots == (ca.root_cert, other_ca.root_cert)
    policy = Policy(trust=store, apps=(AppConfig(APP_ID),))
    assert attest(ca, policy, None).app_id == APP_ID
    assert attest(other_ca, policy, None).app_id == APP_ID


def test_store_without_roots_is_refused() -> None:
    with pytest.raises(TrustStoreError):
        TrustStore(roots=(), fingerprints=(), is_apple=False)


def test_store_with_mismatched_fingerprint_is_refused(ca: factory.TestCA) -> None:
    with pytest.raises(TrustStoreError):
        TrustStore(
            roots=(ca.root_cert,), fingerprints=(APPLE_APP_ATTEST_ROOT_SHA256,), is_apple=True
        )
    apple_root = TrustStore.apple().roots[0]
    with pytest.raises(TrustStoreError):
        TrustStore(roots=(apple_root,), fingerprints=(bytes(32),), is_apple=True)


def test_store_needs_one_fingerprint_per_root(ca: factory.TestCA, other_ca: factory.TestCA) -> None:
    fingerprint = sha256(ca.root_cert.public_bytes(serialization.Encoding.DER))
    with pytest.raises(TrustStoreError):
        TrustStore(
            roots=(ca.root_cert, other_ca.root_cert), fingerprints=(fingerprint,), is_apple=False
        )
    with pytest.raises(TrustStoreError):
        TrustStore(roots=(ca.root_cert,), fingerprints=(fingerprint, fingerprint), is_apple=False)


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="garbage"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            id="garbage-in-pem-armour",
        ),
        pytest.param(
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            id="not-a-certificate-block",
        ),
    ],
)
def test_replacing_store_refuses_unreadable_pem(pem: bytes) -> None:
    with pytest.raises(TrustStoreError):
        TrustStore.replacing_apple_root(pem)


def test_replacing_store_refuses_der_instead_of_pem(ca: factory.TestCA) -> None:
    with pytest.raises(TrustStoreError):
        TrustStore.replacing_apple_root(ca.root_cert.public_bytes(serialization.Encoding.DER))


def test_trust_store_error_is_a_value_error() -> None:
    assert issubclass(TrustStoreError, ValueError)
    assert issubclass(PolicyError, ValueError)


# --- Policy -----------------------------------------------------------------------------------


def test_policy_without_apps_is_refused(policy: Policy) -> None:
    with pytest.raises(PolicyError):
        Policy(trust=policy.trust, apps=())
    with pytest.raises(PolicyError):
        Policy.build(trust=policy.trust)


def test_policy_without_trust_store_is_refused() -> None:
    with pytest.raises(PolicyError):
        Policy(trust=None, apps=(AppConfig(APP_ID),))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "app_id",
    [
        pytest.param("com.example.app", id="no-team-id"),
        pytest.param("teamid1234.com.example.app", id="lowercase-team-id"),
        pytest.param("TEAMID123.com.example.app", id="nine-char-team-id"),
        pytest.param("TEAMID12345.com.example.app", id="eleven-char-team-id"),
        pytest.param("TEAMID1234.", id="empty-bundle-id"),
        pytest.param("TEAMID1234", id="team-id-only"),
        pytest.param("TEAMID1234 com.example.app", id="space-instead-of-dot"),
        pytest.param("TEAMID1234.com example", id="space-in-bundle-id"),
        pytest.param("TEAMID1234.-app", id="bundle-starts-with-dash"),
        pytest.param("TEAMID1234.com.example.app\n", id="trailing-newline"),
        pytest.param("TEAMID1234.c\u00f6m.example", id="non-ascii"),
        pytest.param("", id="empty"),
        pytest.param("TEAMID1234." + "a" * 256, id="bundle-too-long"),
    ],
)
def test_bad_app_id_is_refused(app_id: str) -> None:
    with pytest.raises(PolicyError):
        AppConfig(app_id)


@pytest.mark.parametrize(
    "app_id",
    ["TEAMID1234.com.example.app", "ABCDE12345.com.apple.example_app-ios", "0123456789.x"],
)
def test_good_app_id_is_accepted(app_id: str) -> None:
    config = AppConfig(app_id)
    assert config.rp_id_hash == sha256(app_id.encode())


def test_same_app_twice_with_different_rules_is_refused(policy: Policy) -> None:
    with pytest.raises(PolicyError):
        Policy(trust=policy.trust, apps=(AppConfig(APP_ID), AppConfig(APP_ID, True)))


def test_same_app_twice_with_the_same_rules_is_allowed(policy: Policy) -> None:
    twice = Policy(trust=policy.trust, apps=(AppConfig(APP_ID), AppConfig(APP_ID)))
    assert twice.app(APP_ID) == AppConfig(APP_ID)


def test_app_config_allows() -> None:
    production_only = AppConfig(APP_ID)
    with_development = AppConfig(APP_ID, allow_development=True)
    assert production_only.allows(Environment.PRODUCTION)
    assert not production_only.allows(Environment.DEVELOPMENT)
    assert with_development.allows(Environment.PRODUCTION)
    assert with_development.allows(Environment.DEVELOPMENT)


def test_build_sorts_apps_into_environment_rules(policy: Policy) -> None:
    prod, dev, both = (
        "TEAMID1234.com.example.prod",
        "TEAMID1234.com.example.dev",
        "TEAMID1234.com.example.both",
    )
    built = Policy.build(
        trust=policy.trust,
        production_apps=iter([prod, both, prod]),
        development_apps=(dev, both, dev),
    )
    assert built.app(prod) == AppConfig(prod, allow_development=False)
    assert built.app(dev) == AppConfig(dev, allow_development=True)
    # An App ID in both lists gets the wider, explicitly requested development rule, once.
    assert built.app(both) == AppConfig(both, allow_development=True)
    assert sorted(a.app_id for a in built.apps) == sorted([prod, dev, both])
    assert built.app_for_rp_id_hash(sha256(dev.encode())) == AppConfig(dev, True)
    assert built.app("TEAMID1234.com.example.unknown") is None
    assert built.app_for_rp_id_hash(bytes(32)) is None


def test_build_refuses_a_bad_app_id(policy: Policy) -> None:
    with pytest.raises(PolicyError):
        Policy.build(trust=policy.trust, production_apps=["not an app id"])


def test_policy_is_frozen(policy: Policy) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.apps = ()  # type: ignore[misc]


# --- IntermediateCache: hits and misses -------------------------------------------------------


def test_second_attestation_under_the_same_intermediate_is_a_hit(
    ca: factory.TestCA, policy: Policy
) -> None:
    cache = IntermediateCache()
    first = attest(ca, policy, cache)
    assert (cache.hits, len(cache)) == (0, 1)
    misses = cache.misses
    second = attest(ca, policy, cache)
    assert (cache.hits, cache.misses, len(cache)) == (1, misses, 1)
    assert cache.stats() == {"hits": 1, "misses": misses, "size": 1}
    assert (
        first.intermediate_fingerprint
        == second.intermediate_fingerprint
        == sha256(ca.intermediate_der)
    )
    assert first.key_id != second.key_id


def test_first_lookup_on_an_empty_cache_counts_a_miss(ca: factory.TestCA, policy: Policy) -> None:
    cache = IntermediateCache()
    attest(ca, policy, cache)
    assert cache.stats() == {"hits": 0, "misses": 1, "size": 1}


def test_verification_without_cache_still_works(ca: factory.TestCA, policy: Policy) -> None:
    assert attest(ca, policy, None).app_id == APP_ID


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError):
        IntermediateCache(max_entries=0)


def test_failures_are_never_cached(
    ca: factory.TestCA, other_ca: factory.TestCA, policy: Policy
) -> None:
    cache = IntermediateCache()
    foreign = factory.Device(ca=other_ca)
    obj = foreign.attestation_object(CDH, now=NOW)
    for _ in range(2):
        assert rejection(lambda: verify(obj, foreign, policy, cache)) is (
            Reason.CERTIFICATE_CHAIN_INVALID
        )
    assert len(cache) == 0
    assert cache.hits == 0
    expired_leaf = {
        "leaf_not_before": NOW - timedelta(days=9),
        "leaf_not_after": NOW - timedelta(days=1),
    }
    assert rejection(lambda: attest(ca, policy, cache, **expired_leaf)) is (
        Reason.CERTIFICATE_EXPIRED
    )
    assert len(cache) == 0


def test_cache_is_bounded_and_least_recently_used_goes_first(policy: Policy) -> None:
    cas = [factory.TestCA.create() for _ in range(3)]
    policies = [policy_for(c) for c in cas]
    cache = IntermediateCache(max_entries=2)
    attest(cas[0], policies[0], cache)
    attest(cas[1], policies[1], cache)
    assert len(cache) == 2
    attest(cas[0], policies[0], cache)  # hit: cas[0] becomes the most recently used
    assert cache.hits == 1
    attest(cas[2], policies[2], cache)  # evicts cas[1], not cas[0]
    assert len(cache) == 2
    attest(cas[0], policies[0], cache)
    assert cache.hits == 2
    attest(cas[1], policies[1], cache)
    assert cache.hits == 2
    assert len(cache) == 2


def test_single_entry_cache(ca: factory.TestCA, other_ca: factory.TestCA, policy: Policy) -> None:
    cache = IntermediateCache(max_entries=1)
    other_policy = policy_for(other_ca)
    for _ in range(2):
        attest(ca, policy, cache)
        attest(other_ca, other_policy, cache)
    assert (cache.hits, len(cache)) == (0, 1)
    attest(other_ca, other_policy, cache)  # the one entry left is the latest
    assert (cache.hits, len(cache)) == (1, 1)


# --- IntermediateCache: validity window -------------------------------------------------------


def test_entry_is_not_used_after_the_intermediate_expires() -> None:
    end = NOW + timedelta(days=30)
    short = factory.TestCA.create(intermediate_not_after=end)
    policy = policy_for(short)
    cache = IntermediateCache()
    attest(short, policy, cache)
    assert len(cache) == 1
    attest(short, policy, cache, now=end)  # the last valid instant is still a hit
    assert cache.hits == 1
    misses = cache.misses
    after = end + timedelta(seconds=1)
    assert rejection(lambda: attest(short, policy, cache, now=after)) is (
        Reason.CERTIFICATE_EXPIRED
    )
    assert cache.hits == 1
    assert cache.misses == misses + 1


def test_entry_is_not_used_before_the_intermediate_is_valid() -> None:
    start = NOW - timedelta(days=1)
    late = factory.TestCA.create(intermediate_not_before=start)
    policy = policy_for(late)
    cache = IntermediateCache()
    attest(late, policy, cache)
    assert len(cache) == 1
    before = start - timedelta(seconds=1)
    assert rejection(lambda: attest(late, policy, cache, now=before)) is (
        Reason.CERTIFICATE_EXPIRED
    )
    assert cache.hits == 0
    attest(late, policy, cache, now=start)
    assert cache.hits == 1


def test_entry_is_not_used_after_the_root_expires() -> None:
    root_end = NOW + timedelta(days=10)
    ca = factory.TestCA.create(not_after=root_end, intermediate_not_after=NOW + timedelta(days=90))
    policy = policy_for(ca)
    cache = IntermediateCache()
    attest(ca, policy, cache)
    after = root_end + timedelta(seconds=1)
    assert rejection(lambda: attest(ca, policy, cache, now=after)) is Reason.CERTIFICATE_EXPIRED
    assert cache.hits == 0


# --- IntermediateCache: keyed per trust store --------------------------------------------------


def test_entry_from_one_trust_store_is_not_a_hit_for_another(
    ca: factory.TestCA, other_ca: factory.TestCA, policy: Policy
) -> None:
    cache = IntermediateCache()
    attest(ca, policy, cache)
    assert len(cache) == 1
    other_policy = policy_for(other_ca)
    assert rejection(lambda: attest(ca, other_policy, cache)) is (Reason.CERTIFICATE_CHAIN_INVALID)
    assert cache.hits == 0
    assert len(cache) == 1
    attest(ca, policy, cache)
    assert cache.hits == 1


def test_apple_store_does_not_use_an_entry_of_the_test_store(
    ca: factory.TestCA, policy: Policy
) -> None:
    cache = IntermediateCache()
    attest(ca, policy, cache)
    apple = Policy.build(trust=TrustStore.apple(), production_apps=[APP_ID])
    assert rejection(lambda: attest(ca, apple, cache)) is Reason.CERTIFICATE_CHAIN_INVALID
    assert cache.hits == 0


# --- IntermediateCache: the leaf is still verified on a hit ------------------------------------


@pytest.fixture
def warm(ca: factory.TestCA, policy: Policy) -> IntermediateCache:
    cache = IntermediateCache()
    attest(ca, policy, cache)
    attest(ca, policy, cache)
    assert cache.hits == 1
    return cache


def replace_leaf(obj: bytes, leaf_der: bytes) -> bytes:
    decoded = cbor2.loads(obj)
    decoded["attStmt"]["x5c"][0] = leaf_der
    return cbor2.dumps(decoded)


def test_leaf_with_bad_signature_is_rejected_on_a_hit(
    ca: factory.TestCA, policy: Policy, warm: IntermediateCache
) -> None:
    device = factory.Device(ca=ca)
    obj = device.attestation_object(CDH, now=NOW)
    leaf = bytearray(cbor2.loads(obj)["attStmt"]["x5c"][0])
    leaf[-3] ^= 0x01
    bad = replace_leaf(obj, bytes(leaf))
    assert rejection(lambda: verify(bad, device, policy, warm)) is (
        Reason.CERTIFICATE_CHAIN_INVALID
    )
    assert warm.hits == 2


def test_leaf_signed_by_another_intermediate_is_rejected_on_a_hit(
    ca: factory.TestCA, other_ca: factory.TestCA, policy: Policy, warm: IntermediateCache
) -> None:
    device = factory.Device(ca=ca)
    auth_data = device.auth_data()
    leaf = other_ca.issue_leaf(
        public_key=device.private_key.public_key(),
        nonce_extension_value=factory.nonce_extension(sha256(auth_data + CDH)),
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=1),
    )
    obj = device.attestation_object(CDH, now=NOW)
    forged = replace_leaf(obj, leaf.public_bytes(serialization.Encoding.DER))
    assert rejection(lambda: verify(forged, device, policy, warm)) is (
        Reason.CERTIFICATE_CHAIN_INVALID
    )
    assert warm.hits == 2


@pytest.mark.parametrize(
    "validity",
    [
        pytest.param(
            {"leaf_not_before": NOW - timedelta(days=9), "leaf_not_after": NOW - timedelta(days=1)},
            id="leaf-expired",
        ),
        pytest.param({"leaf_not_before": NOW + timedelta(seconds=1)}, id="leaf-not-yet-valid"),
    ],
)
def test_leaf_outside_its_validity_is_rejected_on_a_hit(
    ca: factory.TestCA,
    policy: Policy,
    warm: IntermediateCache,
    validity: dict[str, datetime],
) -> None:
    assert rejection(lambda: attest(ca, policy, warm, **validity)) is Reason.CERTIFICATE_EXPIRED
    assert warm.hits == 2


def test_leaf_with_unknown_critical_extension_is_rejected_on_a_hit(
    ca: factory.TestCA, policy: Policy, warm: IntermediateCache
) -> None:
    device = factory.Device(ca=ca)
    auth_data = device.auth_data()
    leaf = ca.issue_leaf(
        public_key=device.private_key.public_key(),
        nonce_extension_value=factory.nonce_extension(sha256(auth_data + CDH)),
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=1),
        extra_extensions=[
            (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5.6"), b"\x05\x00"), True)
        ],
    )
    obj = replace_leaf(
        device.attestation_object(CDH, now=NOW), leaf.public_bytes(serialization.Encoding.DER)
    )
    assert rejection(lambda: verify(obj, device, policy, warm)) is (
        Reason.CERTIFICATE_CHAIN_INVALID
    )
    assert warm.hits == 2
