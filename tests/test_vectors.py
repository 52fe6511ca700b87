"""Every real Apple attestation and assertion vector, verified at its own instant."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
    load_pem_public_key,
)

from tests.vectors import (
    VECTORS_DIR,
    Vector,
    b64,
    client_data_hash_by_rule,
    load_vectors,
    verify_at,
)
from worker.core import (
    Environment,
    Policy,
    Reason,
    Rejected,
    TrustStore,
    verify_assertion,
    verify_attestation,
)
from worker.core.assertion import parse_assertion_object
from worker.core.attestation import (
    _check_app_id,
    _check_counter_zero,
    _check_credential_id,
    _check_environment,
    _check_key_id,
    _uncompressed_point,
    parse_attestation_object,
)
from worker.core.chain import parse_chain, verify_chain

VECTORS = load_vectors()
ATTESTATIONS = {v.id: v for v in VECTORS if v.kind == "attestation"}
VERIFIABLE = [v for v in VECTORS if v.kind in ("attestation", "assertion")]
APPLE = TrustStore.apple()


def _point_from_pem(pem: str) -> bytes:
    key = load_pem_public_key(pem.encode())
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _published_point(vector: Vector) -> bytes:
    """The credCert key the source published, as PEM or (Apple's sample) as SPKI base64."""
    if vector.get("publicKeyPEM"):
        return _point_from_pem(vector["publicKeyPEM"])
    spki = b64(vector["expectedDetails"]["public_key_spki_b64"])
    key = load_der_public_key(spki)
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _policy_for(vector: Vector) -> Policy:
    # A production key must pass a production-only policy; a development key needs the
    # development rule, which is what the vector's own app would be configured with.
    if vector["environment"] == "production":
        return Policy.build(trust=APPLE, production_apps=[vector["appId"]])
    return Policy.build(trust=APPLE, development_apps=[vector["appId"]])


def _check_attestation(vector: Vector) -> None:
    cdh = client_data_hash_by_rule(vector)
    policy = _policy_for(vector)
    key_id = b64(vector["keyId"])
    raw = b64(vector["attestation"])
    now = verify_at(vector)
    if cdh is None:
        # The challenge was never published, so the nonce cannot match anything we pass; every
        # other step is checked one by one below.
        assert vector["expected"].startswith("valid chain/keyId/appId/counter/aaguid")
        with pytest.raises(Rejected) as info:
            verify_attestation(
                attestation_object=raw,
                key_id=key_id,
                client_data_hash=b"\x00" * 32,
                policy=policy,
                now=now,
            )
        assert info.value.reason is Reason.NONCE_MISMATCH
        parsed = parse_attestation_object(raw)
        leaf, intermediate = parse_chain(parsed.x5c)
        verify_chain(leaf=leaf, intermediate=intermediate, trust=APPLE, now=now, cache=None)
        point = _uncompressed_point(leaf)
        _check_key_id(point, key_id)
        app = _check_app_id(parsed.auth_data, policy)
        _check_counter_zero(parsed.auth_data)
        assert _check_environment(parsed.auth_data, app) == vector["environment"]
        _check_credential_id(parsed.auth_data, key_id, point)
        assert point == _published_point(vector)
        return
    assert vector["expected"] == "valid"
    assert cdh == b64(vector["clientDataHash"]), "the rule must reproduce the published hash"
    result = verify_attestation(
        attestation_object=raw, key_id=key_id, client_data_hash=cdh, policy=policy, now=now
    )
    assert result.app_id == vector["appId"]
    assert result.environment == Environment(vector["environment"])
    assert result.key_id == key_id
    assert result.public_key == _published_point(vector)
    assert result.sign_count == 0
    assert result.receipt == parse_attestation_object(raw).receipt
    if vector.id == "att-apple-guide-2026":
        assert result.extensions is not None
        assert result.extensions.validation_category == 1
        assert result.extensions.bundle_version == "1"
    if vector["environment"] == "development":
        # Production-only deployments must refuse development keys.
        strict = Policy.build(trust=APPLE, production_apps=[vector["appId"]])
        with pytest.raises(Rejected) as info:
            verify_attestation(
                attestation_object=raw, key_id=key_id, client_data_hash=cdh, policy=strict, now=now
            )
        assert info.value.reason is Reason.ENVIRONMENT_MISMATCH


def _check_assertion(vector: Vector) -> None:
    cdh = client_data_hash_by_rule(vector)
    raw = b64(vector["assertion"])
    if cdh is None:
        # Neither key nor client data was published: the object must still parse, carry the
        # published counter and refuse a key that did not sign it.
        assert vector["expected"].startswith("signature not reproducible")
        parsed = parse_assertion_object(raw)
        assert parsed.auth_data.counter == vector["expectedCounter"]
        assert parsed.auth_data.rp_id_hash.hex() == vector["rpIdHash_hex"]
        with pytest.raises(Rejected) as info:
            verify_assertion(
                assertion_object=raw,
                client_data_hash=b"\x00" * 32,
                public_key=_published_point(ATTESTATIONS["att-apple-guide-2026"]),
                app_id=vector["appId"],
                previous_counter=vector["previousCounter"],
            )
        assert info.value.reason is Reason.SIGNATURE_INVALID
        return
    assert vector["expected"] == "valid"
    assert cdh == b64(vector["clientDataHash"])
    signer = (
        vector if vector.get("publicKeyPEM") else ATTESTATIONS[vector["publicKeyFromAttestation"]]
    )
    point = _published_point(signer)
    result = verify_assertion(
        assertion_object=raw,
        client_data_hash=cdh,
        public_key=point,
        app_id=vector["appId"],
        previous_counter=vector["previousCounter"],
    )
    assert result.counter == vector["expectedCounter"]
    with pytest.raises(Rejected) as info:  # the same assertion again is a replay
        verify_assertion(
            assertion_object=raw,
            client_data_hash=cdh,
            public_key=point,
            app_id=vector["appId"],
            previous_counter=result.counter,
        )
    assert info.value.reason is Reason.COUNTER_REPLAY


@pytest.mark.parametrize("vector", VERIFIABLE, ids=[v.id for v in VERIFIABLE])
def test_real_vector(vector: Vector) -> None:
    if vector.kind == "attestation":
        _check_attestation(vector)
    else:
        _check_assertion(vector)


def test_vector_counts() -> None:
    """The shared folder holds what its index promises: 55+ attestations and 34 assertions."""
    kinds = [v.kind for v in VERIFIABLE]
    assert kinds.count("attestation") >= 55
    assert kinds.count("assertion") >= 34
    assert VECTORS_DIR.is_dir() or not os.environ.get("CI")


CHECKABLE = [
    v for v in VERIFIABLE if v.kind == "attestation" and client_data_hash_by_rule(v) is not None
]


@pytest.mark.parametrize("vector", CHECKABLE, ids=[v.id for v in CHECKABLE])
def test_real_attestation_outside_leaf_validity(vector: Vector) -> None:
    """Every leaf in the vectors has expired by 2045; and none was valid in 2019."""
    cdh = client_data_hash_by_rule(vector)
    assert cdh is not None
    for now in (datetime(2045, 1, 1, tzinfo=UTC), datetime(2019, 1, 1, tzinfo=UTC)):
        with pytest.raises(Rejected) as info:
            verify_attestation(
                attestation_object=b64(vector["attestation"]),
                key_id=b64(vector["keyId"]),
                client_data_hash=cdh,
                policy=_policy_for(vector),
                now=now,
            )
        assert info.value.reason is Reason.CERTIFICATE_EXPIRED
