"""The verification service in process: the bounded cache of loaded device keys."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.factory import APP_ID, Device, TestCA
from worker.contract import parse_request
from worker.core import Policy, TrustStore
from worker.service import VerificationService
from worker.store.db import create_store_engine, session_factory, upgrade


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.mark.parametrize("size", [0, 2])
def test_loaded_keys_stay_within_the_cache_bound(
    ca: TestCA, sessions: sessionmaker[Session], size: int
) -> None:
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )
    service = VerificationService(policy=policy, sessions=sessions, public_key_cache_size=size)
    devices = [Device(ca=ca) for _ in range(3)]
    now = datetime.now(UTC)
    for device in devices:
        assert service.handle(parse_request(device.registration_body("c", now=now))).ok
    for round_ in range(2):
        for device in devices:
            result = service.handle(parse_request(device.assertion_body(f"p{round_}")))
            assert result.ok and result.counter == round_ + 1, result
            assert len(service._public_keys) <= size
    assert len(service._public_keys) == size
    assert list(service._public_keys) == [d.public_point for d in devices][3 - size :]


def test_a_negative_cache_size_is_refused(ca: TestCA, sessions: sessionmaker[Session]) -> None:
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )
    with pytest.raises(ValueError, match="public_key_cache_size"):
        VerificationService(policy=policy, sessions=sessions, public_key_cache_size=-1)
