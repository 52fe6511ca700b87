"""Distrust lists in the policy: a distrusted credCert, intermediate or keyId no longer verifies."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import NOW
from tests.factory import APP_ID, Device, TestCA, client_data_hash
from worker.core import Policy, PolicyError, Reason, Rejected, TrustStore, verify_attestation
from worker.core.attestation import parse_attestation_object

CDH = client_data_hash("challenge")


def _policy(ca: TestCA, **distrust: object) -> Policy:
    return Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem),
        production_apps=[APP_ID],
        **distrust,  # type: ignore[arg-type]
    )


def _verify(device: Device, raw: bytes, policy: Policy) -> None:
    verify_attestation(
        attestation_object=raw, key_id=device.key_id, client_data_hash=CDH, policy=policy, now=NOW
    )


def test_distrusted_intermediate(ca: TestCA) -> None:
    device = Device(ca=ca)
    raw = device.attestation_object(CDH, now=NOW)
    _verify(device, raw, _policy(ca))
    fingerprint = hashlib.sha256(ca.intermediate_der).digest()
    with pytest.raises(Rejected) as info:
        _verify(device, raw, _policy(ca, distrusted_certificates=[fingerprint]))
    assert info.value.reason is Reason.CERTIFICATE_CHAIN_INVALID


def test_distrusted_leaf_only_hits_that_key(ca: TestCA) -> None:
    device, other = Device(ca=ca), Device(ca=ca)
    raw, other_raw = device.attestation_object(CDH, now=NOW), other.attestation_object(CDH, now=NOW)
    leaf_fp = hashlib.sha256(parse_attestation_object(raw).x5c[0]).digest()
    policy = _policy(ca, distrusted_certificates=[leaf_fp])
    with pytest.raises(Rejected) as info:
        _verify(device, raw, policy)
    assert info.value.reason is Reason.CERTIFICATE_CHAIN_INVALID
    _verify(other, other_raw, policy)


def test_distrusted_key_id(ca: TestCA) -> None:
    device = Device(ca=ca)
    raw = device.attestation_object(CDH, now=NOW)
    with pytest.raises(Rejected) as info:
        _verify(device, raw, _policy(ca, distrusted_key_ids=[device.key_id]))
    assert info.value.reason is Reason.KEY_REVOKED


def test_distrust_entries_must_be_sha256(ca: TestCA) -> None:
    with pytest.raises(PolicyError):
        _policy(ca, distrusted_key_ids=[b"short"])
