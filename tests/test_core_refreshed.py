"""Refreshed receipts: Apple's real RECEIPT vectors pass under the pinned root; others do not."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.test_core_receipt import (
    RECEIPTS,
    REFRESHED,
    _credential_certificate_of,
    _ids,
    apple,
)
from tests.vectors import Vector, b64
from worker.core.receipt import parse_receipt
from worker.core.refreshed import RefreshRejected, RefreshRejection, verify_refreshed_receipt

ATTEST = [v for v in RECEIPTS if v["properties"]["type"] == "ATTEST"]


def _check(vector: Vector, **changes: object) -> object:
    raw = b64(vector["receipt"])
    parsed = parse_receipt(raw)
    # As of a minute after Apple created it: a receipt just returned.
    arguments: dict[str, object] = {
        "receipt": raw,
        "trust": apple(),
        "now": parsed.creation_time + timedelta(minutes=1),
        "app_ids": frozenset({vector["appId"]}),
        "credential_certificate": _credential_certificate_of(vector),
    }
    arguments.update(changes)
    return verify_refreshed_receipt(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("vector", REFRESHED, ids=_ids(REFRESHED))
def test_a_real_refreshed_receipt_passes_with_its_risk_metric(vector: Vector) -> None:
    receipt = _check(vector)
    assert receipt.risk_metric is not None  # type: ignore[attr-defined]
    assert receipt.not_before is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize("vector", ATTEST, ids=_ids(ATTEST))
def test_an_attest_receipt_is_not_a_refreshed_one(vector: Vector) -> None:
    with pytest.raises(RefreshRejected) as info:
        _check(vector)
    assert info.value.reason is RefreshRejection.WRONG_TYPE


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {"app_ids": frozenset({"TEAM.other"})},
            RefreshRejection.APP_ID_MISMATCH,
        ),
        ({"credential_certificate": b"\x30\x00"}, RefreshRejection.KEY_MISMATCH),
    ],
)
def test_a_real_refreshed_receipt_for_another_key_or_app(
    changes: dict[str, object], reason: RefreshRejection
) -> None:
    with pytest.raises(RefreshRejected) as info:
        _check(REFRESHED[0], **changes)
    assert info.value.reason is reason


def test_an_old_real_receipt_is_not_fresh() -> None:
    vector = REFRESHED[0]
    created = parse_receipt(b64(vector["receipt"])).creation_time
    with pytest.raises(RefreshRejected) as info:
        _check(vector, now=created + timedelta(hours=1))
    assert info.value.reason is RefreshRejection.NOT_FRESH
