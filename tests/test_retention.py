"""Retention: the purge deletes exactly the rows past their cutoffs, on SQLite and PostgreSQL,
in bounded batches, by hand (``appattest purge``) and periodically in a running worker."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from appattest.cli import main as cli
from tests.factory import APP_ID, TestCA
from tests.stack import service_stack
from worker.queue.retention import cutoffs_for, run_purge
from worker.settings import Settings
from worker.store.db import create_store_engine, session_factory, upgrade
from worker.store.models import Challenge, DeviceKey, IdempotencyKey, Verdict
from worker.store.retention import Cutoffs, PurgeCounts, count_purgeable, purge

pytestmark = pytest.mark.timeout(240)

T = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
GRACE = timedelta(hours=1)
RETENTION = timedelta(days=30)
TTL = timedelta(days=1)


_ENGINES: list[Engine] = []


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    yield
    while _ENGINES:
        _ENGINES.pop().dispose()


def _sessions(store_url: str) -> sessionmaker[Session]:
    engine = create_store_engine(store_url)
    _ENGINES.append(engine)
    upgrade(engine)
    return session_factory(engine)


def _challenge(session: Session, name: str, expires_at: datetime, *, used: bool = False) -> None:
    session.add(
        Challenge(
            digest=hashlib.sha256(name.encode()).digest(),
            purpose="assertion",
            key_id=None,
            issued_at=expires_at - timedelta(minutes=5),
            expires_at=expires_at,
            used_at=expires_at - timedelta(minutes=1) if used else None,
            used_by_job=f"job-{name}" if used else None,
        )
    )


def _verdict(session: Session, job_id: str, decided_at: datetime) -> None:
    session.add(
        Verdict(
            job_id=job_id,
            kind="assertion",
            key_id="k",
            app_id=APP_ID,
            ok=True,
            reason=None,
            result={"ok": True},
            decided_at=decided_at,
        )
    )


def _key(session: Session, name: str, created_at: datetime, job_id: str) -> None:
    session.add(
        IdempotencyKey(
            owner="owner",
            key_hash=hashlib.sha256(name.encode()).digest(),
            request_hash=b"\0" * 32,
            job_id=job_id,
            created_at=created_at,
        )
    )


def _device(session: Session, key_id: str, verified_at: datetime) -> None:
    session.add(
        DeviceKey(
            key_id=key_id,
            app_id=APP_ID,
            environment="production",
            public_key=b"p",
            counter=0,
            receipt=b"r",
            attestation=b"a",
            client_data_hash=None,
            verified_at=verified_at,
            leaf_fingerprint=b"l",
            intermediate_fingerprint=b"i",
        )
    )


def _seed(sessions: sessionmaker[Session], now: datetime, margin: timedelta = SECOND) -> None:
    """Rows on both sides of every cutoff, ``margin`` away: names say whether the purge must
    take them."""
    with sessions() as session, session.begin():
        for n in range(5):
            _challenge(session, f"purge-expired-{n}", now - GRACE - margin * (n + 1))
        _challenge(session, "purge-used", now - GRACE - timedelta(days=3), used=True)
        _challenge(session, "keep-in-grace", now - GRACE + margin)
        _challenge(session, "keep-live", now + timedelta(minutes=5))
        _verdict(session, "purge-old", now - RETENTION - margin)
        _verdict(session, "keep-young", now - RETENTION + margin)
        _verdict(session, "keep-named-by-live-key", now - RETENTION - timedelta(days=5))
        _verdict(session, "purge-named-by-expired-key", now - RETENTION - timedelta(days=5))
        _key(session, "live", now - TTL + margin, "keep-named-by-live-key")
        _key(session, "expired", now - TTL - margin, "purge-named-by-expired-key")
        _device(session, "device-ancient", now - timedelta(days=3650))


def _remaining(sessions: sessionmaker[Session]) -> dict[str, set[str]]:
    names = {hashlib.sha256(n.encode()).digest(): n for n in _challenge_names()}
    with sessions() as session:
        return {
            "challenges": {names[d] for d in session.scalars(select(Challenge.digest))},
            "verdicts": set(session.scalars(select(Verdict.job_id))),
            "idempotency_keys": set(session.scalars(select(IdempotencyKey.job_id))),
            "device_keys": set(session.scalars(select(DeviceKey.key_id))),
        }


def _challenge_names() -> list[str]:
    return [f"purge-expired-{n}" for n in range(5)] + [
        "purge-used",
        "keep-in-grace",
        "keep-live",
    ]


def _cutoffs(now: datetime, retention: timedelta | None = RETENTION) -> Cutoffs:
    return Cutoffs.at(now, challenge_grace=GRACE, verdict_retention=retention, idempotency_ttl=TTL)


def test_purge_deletes_exactly_the_rows_past_their_cutoffs_in_bounded_batches(
    store_url: str,
) -> None:
    sessions = _sessions(store_url)
    _seed(sessions, T)
    with sessions() as session:
        planned = count_purgeable(session, _cutoffs(T))
    assert planned == PurgeCounts(challenges=6, verdicts=2, idempotency_keys=1)
    batches: list[tuple[str, int]] = []
    done = purge(sessions, _cutoffs(T), batch_size=2, on_batch=lambda t, n: batches.append((t, n)))
    assert done == planned
    # Six challenges in batches of at most two: three transactions, never more rows.
    assert [n for t, n in batches if t == "challenges"] == [2, 2, 2]
    assert all(n <= 2 for _, n in batches)
    left = _remaining(sessions)
    assert left["challenges"] == {"keep-in-grace", "keep-live"}
    assert left["verdicts"] == {"keep-young", "keep-named-by-live-key"}
    assert left["idempotency_keys"] == {"keep-named-by-live-key"}
    assert left["device_keys"] == {"device-ancient"}
    # Nothing is left to purge, and a second run deletes nothing.
    assert purge(sessions, _cutoffs(T), batch_size=2) == PurgeCounts()


def test_a_retention_of_zero_keeps_every_verdict(store_url: str) -> None:
    sessions = _sessions(store_url)
    _seed(sessions, T)
    done = purge(sessions, _cutoffs(T, retention=None), batch_size=100)
    assert done == PurgeCounts(challenges=6, verdicts=0, idempotency_keys=1)
    assert len(_remaining(sessions)["verdicts"]) == 4


def test_the_settings_give_the_cutoffs() -> None:
    settings = Settings(
        store_url="sqlite://",
        verdict_retention_days=7,
        challenge_purge_grace_seconds=60,
        idempotency_ttl_seconds=3600,
    )
    cutoffs = cutoffs_for(settings, T)
    assert cutoffs.verdicts_decided_before == T - timedelta(days=7)
    assert cutoffs.challenges_expired_before == T - timedelta(seconds=60)
    assert cutoffs.idempotency_created_before == T - timedelta(hours=1)
    kept = cutoffs_for(settings.model_copy(update={"verdict_retention_days": 0}), T)
    assert kept.verdicts_decided_before is None


def _settings_env(store_url: str) -> dict[str, str]:
    return {
        "APPATTEST_STORE_URL": store_url,
        "APPATTEST_CHALLENGE_PURGE_GRACE_SECONDS": str(int(GRACE.total_seconds())),
        "APPATTEST_VERDICT_RETENTION_DAYS": "30",
        "APPATTEST_IDEMPOTENCY_TTL_SECONDS": str(int(TTL.total_seconds())),
        "APPATTEST_PURGE_BATCH_SIZE": "2",
    }


def test_appattest_purge_dry_run_then_purge(store_url: str) -> None:
    sessions = _sessions(store_url)
    _seed(sessions, datetime.now(UTC), margin=timedelta(minutes=1))
    env = _settings_env(store_url)
    dry = CliRunner().invoke(cli, ["purge", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines() == [
        "would delete 6 challenges",
        "would delete 2 verdicts",
        "would delete 1 idempotency_keys",
    ]
    assert len(_remaining(sessions)["challenges"]) == 8  # a dry run deletes nothing
    real = CliRunner().invoke(cli, ["purge"], env=env)
    assert real.exit_code == 0, real.output
    assert "deleted 6 challenges" in real.output and "deleted 2 verdicts" in real.output
    left = _remaining(sessions)
    assert left["verdicts"] == {"keep-young", "keep-named-by-live-key"}
    assert left["device_keys"] == {"device-ancient"}


def test_one_purge_at_a_time_on_postgresql(pg_url: str) -> None:
    """A second purge while one holds the advisory lock does nothing and says so."""
    from worker.store.retention import purge_lock

    engine = create_store_engine(pg_url)
    upgrade(engine)
    other = create_store_engine(pg_url)
    settings = Settings(store_url=pg_url)
    try:
        with engine.connect() as holder, purge_lock(holder) as taken:
            assert taken
            assert run_purge(other, settings) is None
            result = CliRunner().invoke(cli, ["purge"], env={"APPATTEST_STORE_URL": pg_url})
            assert result.exit_code == 1 and "another purge is running" in result.output
        # Released with the block, though the connection stays in the pool: purges run
        # again, from either engine, many times.
        for _ in range(3):
            assert run_purge(other, settings) == PurgeCounts()
            assert run_purge(engine, settings) == PurgeCounts()
    finally:
        engine.dispose()
        other.dispose()


def test_a_running_worker_purges_periodically(
    store_url: str, ca: TestCA, redis_server: str, tmp_path: Path
) -> None:
    """The worker's main process runs the purge every APPATTEST_PURGE_INTERVAL_SECONDS, while
    it takes jobs; what is not yet purgeable stays."""
    env = {**_settings_env(store_url), "APPATTEST_PURGE_INTERVAL_SECONDS": "0.5"}
    with service_stack(
        store_url=store_url,
        root_pem=ca.root_pem,
        workdir=tmp_path,
        app_ids=APP_ID,
        extra_env=env,
    ) as stack:
        sessions = _sessions(store_url)
        _seed(sessions, datetime.now(UTC), margin=timedelta(minutes=10))
        port = _free_port()
        stack.start_worker(concurrency=1, args=[f"--metrics-port={port}"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with sessions() as session:
                # The purge takes challenges, then verdicts, then idempotency keys.
                if session.scalar(select(func.count()).select_from(IdempotencyKey)) == 1:
                    break
            time.sleep(0.2)
        left = _remaining(sessions)
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert left["challenges"] == {"keep-in-grace", "keep-live"}
    assert left["verdicts"] == {"keep-young", "keep-named-by-live-key"}
    assert left["idempotency_keys"] == {"keep-named-by-live-key"}
    assert left["device_keys"] == {"device-ancient"}
    purged = {
        s.labels["table"]: s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == "appattest_purged_rows_total"
    }
    assert purged == {"challenges": 6, "verdicts": 2, "idempotency_keys": 1}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
