"""The key store on SQLite and real PostgreSQL: migrations, insert-once, counter compare-and-set."""

from __future__ import annotations

import threading
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import StatementError

from tests.conftest import NOW
from worker.store import bulk, keys
from worker.store.db import create_store_engine, session_factory, upgrade
from worker.store.models import Base, DeviceKey, ReverifyResult, ReverifyRun, Verdict


@pytest.fixture
def engine(store_url: str) -> Engine:
    engine = create_store_engine(store_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _insert(engine: Engine, key_id: str = "k" * 44) -> bool:
    with session_factory(engine)() as session, session.begin():
        return keys.insert_key(
            session,
            key_id=key_id,
            app_id="TEAMID1234.com.example.app",
            environment="production",
            public_key=b"\x04" + b"\x01" * 64,
            receipt=b"receipt",
            attestation=b"attestation",
            client_data_hash=b"\x05" * 32,
            verified_at=NOW,
            leaf_fingerprint=b"\x02" * 32,
            intermediate_fingerprint=b"\x03" * 32,
        )


def test_migrations_match_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent(engine: Engine) -> None:
    upgrade(engine)
    _insert(engine)
    upgrade(engine)
    with session_factory(engine)() as session:
        assert keys.key_exists(session, "k" * 44)


def test_round_trip_keeps_values_and_aware_time(engine: Engine) -> None:
    _insert(engine)
    with session_factory(engine)() as session:
        stored = keys.get_key(session, "k" * 44)
        assert stored is not None
        assert stored.counter == 0
        assert stored.public_key == b"\x04" + b"\x01" * 64
        assert stored.verified_at == NOW
        assert stored.verified_at.tzinfo is not None


def test_naive_time_is_refused(engine: Engine) -> None:
    with (
        pytest.raises(StatementError, match="naive"),
        session_factory(engine)() as session,
        session.begin(),
    ):
        keys.insert_key(
            session,
            key_id="n" * 44,
            app_id="TEAMID1234.com.example.app",
            environment="production",
            public_key=b"\x04",
            receipt=b"",
            attestation=b"",
            client_data_hash=b"",
            verified_at=datetime(2026, 1, 1),
            leaf_fingerprint=b"",
            intermediate_fingerprint=b"",
        )


def test_key_registers_once(engine: Engine) -> None:
    assert _insert(engine) is True
    assert _insert(engine) is False
    with session_factory(engine)() as session:
        assert keys.get_key(session, "k" * 44) is not None


def test_counter_only_moves_forward(engine: Engine) -> None:
    _insert(engine)
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        assert keys.advance_counter(session, "k" * 44, 5)
        assert not keys.advance_counter(session, "k" * 44, 5)
        assert not keys.advance_counter(session, "k" * 44, 3)
        assert keys.advance_counter(session, "k" * 44, 6)
        assert not keys.advance_counter(session, "unknown", 1)
    with sessions() as session:
        stored = keys.get_key(session, "k" * 44)
        assert stored is not None and stored.counter == 6


def test_parallel_compare_and_set_accepts_each_counter_once(engine: Engine) -> None:
    """Eight threads race to set the same counters 1..40; each value is accepted exactly once
    in all, and the stored counter ends at the maximum."""
    _insert(engine)
    sessions = session_factory(engine)
    accepted: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def racer() -> None:
        barrier.wait()
        for value in range(1, 41):
            with sessions() as session, session.begin():
                won = keys.advance_counter(session, "k" * 44, value)
            if won:
                with lock:
                    accepted.append(value)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(accepted) == len(set(accepted)), "a counter value was accepted twice"
    with sessions() as session:
        stored = keys.get_key(session, "k" * 44)
        assert stored is not None and stored.counter == 40 == max(accepted)


def test_batch_inserts_and_reads_keep_every_value(engine: Engine) -> None:
    """The set-at-a-time statements (one JSON document of rows on PostgreSQL, many parameter
    sets on SQLite) store bytes of every value, aware instants, NULLs and nested JSON exactly,
    insert once, and read back what deciding a job needs."""
    every_byte = bytes(range(256))
    rows = [
        {
            "key_id": key_id,
            "app_id": "TEAMID1234.com.example.app",
            "environment": "production",
            "public_key": b"\x04" + bytes([n]) * 64,
            "counter": 0,
            "receipt": every_byte,
            "attestation": b"\\x00'\"" + every_byte,
            "client_data_hash": None if n else b"\x05" * 32,
            "verified_at": NOW,
            "leaf_fingerprint": b"\x00" * 32,
            "intermediate_fingerprint": b"\xff" * 32,
        }
        for n, key_id in enumerate(["a" * 44, "b/+=" * 11])
    ]
    result = {
        "ok": False,
        "reason": "nonce_mismatch",
        "detail": 'quote " back\\slash é ✓',
        "n": [1, None],
    }
    verdicts = [
        {
            "job_id": job_id,
            "kind": "registration",
            "key_id": None,
            "app_id": None,
            "ok": False,
            "reason": "nonce_mismatch",
            "result": result,
            "decided_at": NOW,
        }
        for job_id in ["job-1", "job-2"]
    ]
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        assert bulk.insert_keys(session, rows) == {"a" * 44, "b/+=" * 11}
        assert bulk.record_verdicts(session, verdicts) == {"job-1", "job-2"}
    with sessions() as session, session.begin():
        assert bulk.insert_keys(session, rows[:1]) == set()
        assert bulk.record_verdicts(session, verdicts[1:]) == set()
    with sessions() as session:
        for row in rows:
            stored = session.get(DeviceKey, row["key_id"])
            assert stored is not None
            assert {name: getattr(stored, name) for name in row} == row
        found = bulk.get_keys(session, ["a" * 44, "b/+=" * 11, "unknown"])
        assert set(found) == {"a" * 44, "b/+=" * 11}
        key = found["a" * 44]
        assert (key.public_key, key.counter, key.revoked_at) == (rows[0]["public_key"], 0, None)
        assert bulk.get_verdicts(session, ["job-1", "job-3"]) == {"job-1": result}
        assert session.get(Verdict, "job-2").decided_at == NOW  # type: ignore[union-attr]


def test_tables_updated_per_job_leave_room_for_same_page_updates(pg_url: str) -> None:
    """PostgreSQL only (SQLite has no fillfactor): counters and challenges are updated per job,
    so their tables keep free space for same-page updates."""
    engine = create_store_engine(pg_url)
    upgrade(engine)
    with engine.connect() as conn:
        options = dict(
            conn.execute(
                text(
                    "SELECT relname, reloptions FROM pg_class "
                    "WHERE relname IN ('device_keys', 'challenges', 'verdicts')"
                )
            ).all()
        )
    assert options["device_keys"] == options["challenges"] == ["fillfactor=70"]
    engine.dispose()
    assert options["verdicts"] is None  # insert-only: full pages are right


def test_reverify_results_and_revocations_are_set_at_a_time_and_once(engine: Engine) -> None:
    """A batch's re-verification results are recorded only where still pending (a redelivered
    batch records nothing twice), and revocations and restorations touch exactly the keys
    named, on both backends."""
    for key_id in ("a" * 44, "b" * 44, "c" * 44):
        _insert(engine, key_id)
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        session.add(
            ReverifyRun(run_id="run-1", created_at=NOW, apply=True, policy={}, filters={}, total=3)
        )
        session.add_all(
            ReverifyResult(run_id="run-1", key_id=k, status="pending")
            for k in ("a" * 44, "b" * 44, "c" * 44)
        )
    outcomes = [
        {
            "key_id": "a" * 44,
            "ok": True,
            "reason": None,
            "detail": None,
            "app_id": "TEAMID1234.com.example.app",
            "environment": "production",
        },
        {
            "key_id": "b" * 44,
            "ok": False,
            "reason": "certificate_expired",
            "detail": 'leaf "expired" \\ before',
            "app_id": None,
            "environment": None,
        },
    ]
    with sessions() as session, session.begin():
        finished = bulk.finish_reverify_results(
            session, "run-1", outcomes, NOW, pending="pending", done="done"
        )
        assert finished == {"a" * 44, "b" * 44}
        bulk.revoke_keys(session, [("b" * 44, "certificate_expired")], "run-1", NOW)
    with sessions() as session, session.begin():
        again = bulk.finish_reverify_results(
            session, "run-1", outcomes, NOW, pending="pending", done="done"
        )
        assert again == set()
    with sessions() as session:
        results = {r.key_id: r for r in session.scalars(select(ReverifyResult))}
        assert results["b" * 44].status == "done" and results["b" * 44].ok is False
        assert results["b" * 44].detail == 'leaf "expired" \\ before'
        assert results["b" * 44].decided_at == NOW
        assert results["c" * 44].status == "pending"
        revoked = {k.key_id: k for k in session.scalars(select(DeviceKey))}
        assert revoked["b" * 44].revoked_at == NOW
        assert revoked["b" * 44].revoked_reason == "certificate_expired"
        assert revoked["b" * 44].revoked_by_run == "run-1"
        assert revoked["a" * 44].revoked_at is None and revoked["c" * 44].revoked_at is None
    with sessions() as session, session.begin():
        bulk.restore_keys(session, ["b" * 44, "c" * 44])
    with sessions() as session:
        restored = session.get(DeviceKey, "b" * 44)
        assert restored is not None
        assert (restored.revoked_at, restored.revoked_reason, restored.revoked_by_run) == (
            None,
            None,
            None,
        )
