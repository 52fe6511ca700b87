"""The verification service in process: the bounded cache of loaded device keys, and how
long a batch holds its PostgreSQL transaction."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
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


@pytest.mark.parametrize(("jobs", "held"), [(1, True), (5, False)])
def test_only_a_small_batch_keeps_its_transaction_open_through_the_checks(
    ca: TestCA, pg_url: str, jobs: int, held: bool
) -> None:
    """On PostgreSQL a batch of a few jobs reads and writes in one transaction; a larger one,
    whose checks take longer, ends its read first, so that its connection never sits idle in
    a transaction while it checks signatures (holding back a migration's lock)."""
    engine = create_store_engine(pg_url)
    upgrade(engine)
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )
    service = VerificationService(policy=policy, sessions=session_factory(engine))
    seen: list[list[str]] = []
    check = VerificationService._check

    def observed(self: VerificationService, *args: object) -> None:
        if not seen:
            with engine.connect() as observer:
                seen.append(
                    list(
                        observer.execute(
                            text(
                                "SELECT state FROM pg_stat_activity WHERE datname = "
                                "current_database() AND pid <> pg_backend_pid() "
                                "AND backend_type = 'client backend'"
                            )
                        ).scalars()
                    )
                )
        check(self, *args)  # type: ignore[arg-type]

    now = datetime.now(UTC)
    items = [
        (f"job-{n}", parse_request(Device(ca=ca).registration_body(f"c{n}", now=now)))
        for n in range(jobs)
    ]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(VerificationService, "_check", observed)
            results = service.handle_batch(items, now=now)
        assert all(result.ok for result in results), results
        assert ("idle in transaction" in seen[0]) is held, seen
    finally:
        engine.dispose()
