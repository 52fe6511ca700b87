"""The key store on SQLite and real PostgreSQL: migrations, insert-once, counter compare-and-set,
challenge claims and re-verification runs, each through the statements production runs."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import OperationalError, StatementError

from tests.conftest import NOW
from tests.factory import TestCA
from worker.store import bulk, receipts
from worker.store import reverify as runs
from worker.store.challenges import (
    Purpose,
    challenge_digest,
    new_challenge,
    store_challenges,
)
from worker.store.db import create_store_engine, session_factory, upgrade
from worker.store.models import Base, DeviceKey, Verdict


@pytest.fixture
def engine(store_url: str) -> Engine:
    engine = create_store_engine(store_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _key_row(key_id: str, verified_at: datetime = NOW) -> dict[str, object]:
    return {
        "key_id": key_id,
        "app_id": "TEAMID1234.com.example.app",
        "environment": "production",
        "public_key": b"\x04" + b"\x01" * 64,
        "counter": 0,
        "receipt": b"receipt",
        "attestation": b"attestation",
        "client_data_hash": b"\x05" * 32,
        "verified_at": verified_at,
        "leaf_fingerprint": b"\x02" * 32,
        "intermediate_fingerprint": b"\x03" * 32,
    }


def _insert(engine: Engine, *key_ids: str) -> set[str]:
    with session_factory(engine)() as session, session.begin():
        return bulk.insert_keys(session, [_key_row(k) for k in key_ids or ("k" * 44,)])


def _counter(engine: Engine, key_id: str) -> int:
    with session_factory(engine)() as session:
        return bulk.get_keys(session, [key_id])[key_id].counter


def test_migrations_match_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent(engine: Engine) -> None:
    upgrade(engine)
    _insert(engine)
    upgrade(engine)
    with session_factory(engine)() as session:
        assert set(bulk.get_keys(session, ["k" * 44])) == {"k" * 44}


def test_round_trip_keeps_values_and_aware_time(engine: Engine) -> None:
    _insert(engine)
    with session_factory(engine)() as session:
        stored = bulk.get_keys(session, ["k" * 44])["k" * 44]
        registration = bulk.get_registrations(session, ["k" * 44])["k" * 44]
    assert stored.counter == 0
    assert stored.public_key == b"\x04" + b"\x01" * 64
    assert registration.attestation == b"attestation"
    assert registration.verified_at == NOW
    assert registration.verified_at.tzinfo is not None


def test_naive_time_is_refused(engine: Engine) -> None:
    """On both paths of ``insert_keys`` (SQLAlchemy's type on SQLite, the JSON document on
    PostgreSQL) a naive instant is refused rather than read in some server's zone."""
    with (
        pytest.raises((StatementError, ValueError), match="naive"),
        session_factory(engine)() as session,
        session.begin(),
    ):
        bulk.insert_keys(session, [_key_row("n" * 44, verified_at=datetime(2026, 1, 1))])
    with session_factory(engine)() as session:
        assert bulk.get_keys(session, ["n" * 44]) == {}


def test_key_registers_once(engine: Engine) -> None:
    assert _insert(engine) == {"k" * 44}
    assert _insert(engine) == set()
    with session_factory(engine)() as session:
        assert set(bulk.get_keys(session, ["k" * 44])) == {"k" * 44}


def test_counter_only_moves_forward(engine: Engine) -> None:
    _insert(engine, "k" * 44, "m" * 44)
    with session_factory(engine)() as session, session.begin():
        assert bulk.advance_counters(session, [("k" * 44, 5), ("m" * 44, 2)]) == {
            "k" * 44,
            "m" * 44,
        }
        assert bulk.advance_counters(session, [("k" * 44, 5), ("m" * 44, 3)]) == {"m" * 44}
        assert bulk.advance_counters(session, [("k" * 44, 3)]) == set()
        assert bulk.advance_counters(session, [("k" * 44, 6), ("unknown", 1)]) == {"k" * 44}
        assert bulk.advance_counters(session, []) == set()
    assert (_counter(engine, "k" * 44), _counter(engine, "m" * 44)) == (6, 3)


def test_parallel_counter_advances_accept_each_counter_once(engine: Engine) -> None:
    """Eight threads race to set the same counters 1..40 on three keys, each value as one
    batch of all three (the statement a worker runs for a batch of assertions); each value of
    each key is accepted exactly once in all, and every stored counter ends at the maximum."""
    key_ids = ["k" * 44, "m" * 44, "p" * 44]
    _insert(engine, *key_ids)
    sessions = session_factory(engine)
    accepted: list[tuple[str, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def racer() -> None:
        barrier.wait()
        for value in range(1, 41):
            with sessions() as session, session.begin():
                won = bulk.advance_counters(session, [(k, value) for k in key_ids])
            with lock:
                accepted.extend((k, value) for k in won)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(accepted) == len(set(accepted)), "a counter value was accepted twice"
    for key_id in key_ids:
        assert _counter(engine, key_id) == 40 == max(v for k, v in accepted if k == key_id)


def test_parallel_claims_consume_each_challenge_once(engine: Engine) -> None:
    """Eight threads race to consume the same twenty challenges, each as one batch of claims
    (the statement a worker runs); each challenge goes to exactly one job, and a challenge
    bound to another key, issued for another purpose or expired is never consumed."""
    sessions = session_factory(engine)
    five = timedelta(minutes=5)
    claimable = [
        new_challenge(purpose=Purpose.ASSERTION, key_id="k" * 44, ttl=five, now=NOW)
        for _ in range(20)
    ]
    other_key = new_challenge(purpose=Purpose.ASSERTION, key_id="m" * 44, ttl=five, now=NOW)
    registration = new_challenge(purpose=Purpose.REGISTRATION, key_id=None, ttl=five, now=NOW)
    expired = new_challenge(
        purpose=Purpose.ASSERTION, key_id=None, ttl=timedelta(seconds=1), now=NOW
    )
    with sessions() as session, session.begin():
        store_challenges(session, [*claimable, other_key, registration, expired])
    digests = [challenge_digest(c.challenge) for c in claimable]
    refused = [challenge_digest(c.challenge) for c in (other_key, registration, expired)]
    consumed: list[tuple[bytes, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def racer(number: int) -> None:
        claims = [
            bulk.Claim(d, Purpose.ASSERTION.value, "k" * 44, f"job-{number}")
            for d in digests + refused
        ]
        barrier.wait()
        with sessions() as session, session.begin():
            won = bulk.consume_challenges(session, claims, NOW + timedelta(seconds=2))
        with lock:
            consumed.extend((digest, number) for digest in won)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(d for d, _ in consumed) == sorted(digests)
    by_job = dict(consumed)
    with sessions() as session:
        stored = bulk.get_challenges(session, digests + refused)
    for digest in digests:
        assert stored[digest].used_at == NOW + timedelta(seconds=2)
    assert all(stored[d].used_at is None for d in refused)
    assert len(by_job) == 20


def _verdict_row(job_id: str, result: dict[str, object]) -> dict[str, object]:
    """A ``verdicts`` row of a refused registration whose result is ``result``."""
    return {
        "job_id": job_id,
        "kind": "registration",
        "key_id": None,
        "app_id": None,
        "ok": False,
        "reason": "nonce_mismatch",
        "result": result,
        "decided_at": NOW,
    }


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
    verdicts = [_verdict_row(job_id, result) for job_id in ["job-1", "job-2"]]
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


def test_the_batch_read_returns_what_each_reader_returns(engine: Engine) -> None:
    """``read_batch`` (one statement on PostgreSQL, its values as JSON) gives back exactly what
    the one-statement-per-table readers give: bytes of every value, aware instants in UTC
    whatever the server's zone, NULLs, revocations, risk metrics with and without a time,
    used and unused challenges, nested verdict JSON, and nothing for unknown ids."""
    every_byte = bytes(range(256))
    keys = ["a" * 44, "b/+=" * 11, "c" * 44]
    key_rows = [_key_row(k) for k in keys]
    key_rows[0]["public_key"] = b"\x04" + every_byte[:64]
    later = NOW + timedelta(microseconds=123457)
    result = {"ok": False, "reason": "nonce_mismatch", "detail": 'é " \\ ✓', "n": [1, None]}
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        if bulk.is_postgresql(session):
            # Instants must come back in UTC whatever zone the server writes JSON in.
            session.execute(text("SET LOCAL TIME ZONE 'Asia/Kathmandu'"))
        bulk.insert_keys(session, key_rows)
        session.execute(
            text(
                "UPDATE device_keys SET revoked_at = :at, revoked_reason = 'r', counter = 7 "
                "WHERE key_id = :key"
            ),
            {"at": later, "key": keys[1]},
        )
        receipts.insert_receipt_states(
            session,
            [
                {"key_id": keys[0], "receipt": b"r", "risk_metric": 12, "measured_at": later},
                {"key_id": keys[1], "receipt": b"r", "risk_metric": 3, "measured_at": None},
                {"key_id": keys[2], "receipt": b"r"},
            ],
        )
        bulk.record_verdicts(session, [_verdict_row("job-1", result)])
        issued = [
            new_challenge(
                purpose=Purpose.ASSERTION, key_id=key_id, ttl=timedelta(seconds=60 + n), now=NOW
            )
            for n, key_id in enumerate([None, keys[0]])
        ]
        store_challenges(session, issued)
    digests = [challenge_digest(i.challenge) for i in issued]
    with sessions() as session, session.begin():
        bulk.consume_challenges(
            session, [bulk.Claim(digests[1], "assertion", keys[0], "job-9")], later
        )
    wanted_jobs, wanted_digests = ["job-1", "job-2"], [*digests, b"\x00" * 32]
    wanted_keys = [*keys, "unknown"]
    with sessions() as session:
        if bulk.is_postgresql(session):
            session.execute(text("SET TIME ZONE 'America/St_Johns'"))
        read = bulk.read_batch(session, wanted_jobs, wanted_digests, wanted_keys)
        assert read.verdicts == bulk.get_verdicts(session, wanted_jobs) == {"job-1": result}
        assert read.challenges == bulk.get_challenges(session, wanted_digests)
        assert read.keys == bulk.get_keys(session, wanted_keys)
        assert read.risks == receipts.get_risk_metrics(session, wanted_keys)
    assert set(read.challenges) == set(digests)
    assert read.challenges[digests[1]].used_at == later
    assert read.challenges[digests[0]].used_at is None
    assert read.challenges[digests[0]].expires_at == NOW + timedelta(seconds=60)
    assert read.challenges[digests[0]].expires_at.utcoffset() == timedelta(0)
    assert read.keys[keys[0]].public_key == key_rows[0]["public_key"]
    assert (read.keys[keys[1]].revoked_at, read.keys[keys[1]].counter) == (later, 7)
    assert read.risks == {keys[0]: (12, later), keys[1]: (3, None)}
    with sessions() as session:
        assert bulk.read_batch(session, [], [], []) == bulk.BatchReads({}, {}, {}, {})


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
    _insert(engine, "a" * 44, "b" * 44, "c" * 44)
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        total = runs.create_run(
            session, run_id="run-1", apply=True, policy={}, filters=runs.RunFilters(), now=NOW
        )
        assert total == 3
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
            session, "run-1", outcomes, NOW, pending=runs.PENDING, done=runs.DONE
        )
        assert finished == {"a" * 44, "b" * 44}
        bulk.revoke_keys(session, [("b" * 44, "certificate_expired")], "run-1", NOW)
    with sessions() as session, session.begin():
        again = bulk.finish_reverify_results(
            session, "run-1", outcomes, NOW, pending=runs.PENDING, done=runs.DONE
        )
        assert again == set()
    with sessions() as session:
        results = {r.key_id: r for r in runs.decided_results(session, "run-1")}
        assert list(results) == ["a" * 44, "b" * 44]
        assert results["b" * 44].status == runs.DONE and results["b" * 44].ok is False
        assert results["b" * 44].detail == 'leaf "expired" \\ before'
        assert results["b" * 44].decided_at == NOW
        assert runs.pending_key_ids(session, "run-1", limit=10) == ["c" * 44]
        assert runs.pending_key_ids(session, "run-1", after="c" * 44, limit=10) == []
        assert runs.count_done(session, "run-1") == 2
        run = runs.get_run(session, "run-1")
        assert run is not None and (run.total, run.apply) == (3, True)
        assert runs.get_run(session, "run-2") is None
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


def test_a_run_covers_the_keys_its_filters_select(engine: Engine) -> None:
    """A run snapshots, as pending, exactly the stored keys of its apps, environment and
    window of first verification."""
    with session_factory(engine)() as session, session.begin():
        rows = [
            _key_row("a" * 44),
            {**_key_row("b" * 44), "environment": "development"},
            {**_key_row("c" * 44), "app_id": "TEAMID1234.com.example.other"},
            _key_row("d" * 44, verified_at=NOW + timedelta(days=2)),
        ]
        bulk.insert_keys(session, rows)
    cases = {
        "all": (runs.RunFilters(), ["a", "b", "c", "d"]),
        "dev": (runs.RunFilters(environment="development"), ["b"]),
        "app": (runs.RunFilters(app_ids=("TEAMID1234.com.example.other",)), ["c"]),
        "window": (runs.RunFilters(since=NOW, until=NOW + timedelta(days=1)), ["a", "b", "c"]),
    }
    for run_id, (filters, expected) in cases.items():
        with session_factory(engine)() as session, session.begin():
            total = runs.create_run(
                session, run_id=run_id, apply=False, policy={}, filters=filters, now=NOW
            )
        with session_factory(engine)() as session:
            pending = runs.pending_key_ids(session, run_id, limit=10)
            stored = runs.get_run(session, run_id)
        assert (total, pending) == (len(expected), [k * 44 for k in expected])
        assert stored is not None and stored.filters == filters.to_json()


def test_every_public_store_function_has_a_production_caller() -> None:
    """Dead code goes: every public function of ``worker/store`` is named by code that ships
    (``worker/`` or ``producer/``) outside the module that defines it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    store = root / "worker" / "store"
    sources = [*root.joinpath("worker").rglob("*.py"), *root.joinpath("producer").rglob("*.py")]
    # Migrations name the models' column types; they are not callers of repository functions.
    shipped = [p for p in sources if "versions" not in p.parts]
    names_in: dict[Path, set[str]] = {}
    for path in shipped:
        tree = ast.parse(path.read_text())
        names_in[path] = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
        }
        names_in[path] |= {
            alias.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for alias in n.names
        }
    unused = []
    for module in sorted(store.glob("*.py")):
        for node in ast.parse(module.read_text()).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            if not any(node.name in names for path, names in names_in.items() if path != module):
                unused.append(f"{module.name}:{node.name}")
    assert unused == []


def _terminate_backend(pg_url: str, pid: int) -> None:
    """End a server process of PostgreSQL, as a restart would, and wait until it is gone."""
    admin = create_store_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            deadline = time.monotonic() + 10
            while connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar_one():
                assert time.monotonic() < deadline, "the server process did not end"
                time.sleep(0.01)
    finally:
        admin.dispose()


def test_a_connection_idle_past_the_limit_is_tested_and_replaced(pg_url: str) -> None:
    """The workers' engine tests a pooled connection only after it sat idle: one the server
    dropped meanwhile is replaced unseen; one in steady use is not tested (no round trip),
    so its first statement after the server dropped it fails, for the batch to retry."""
    for idle_limit, replaced in ((0.0, True), (3600.0, False)):
        engine = create_store_engine(pg_url, ping_when_idle_for=idle_limit)
        try:
            with engine.connect() as connection:
                pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            _terminate_backend(pg_url, pid)
            with engine.connect() as connection:
                if replaced:
                    new_pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
                    assert new_pid != pid
                else:
                    with pytest.raises(OperationalError):
                        connection.execute(text("SELECT pg_backend_pid()"))
        finally:
            engine.dispose()


def test_workers_calling_google_or_apple_test_every_connection(pg_url: str, tmp_path: Path) -> None:
    """The Android and receipt services call Google or Apple between their reads and their
    writes: their sessions test each pooled connection before use, so one the server dropped
    during the call is replaced instead of failing the write (which would retry the batch and
    repeat the calls); the verification batches test theirs only after a while idle."""
    from worker.queue.app import create_celery_app
    from worker.queue.tasks import ProcessResources
    from worker.settings import Settings

    root = tmp_path / "root.pem"
    root.write_bytes(TestCA.create().root_pem)
    settings = Settings(app_ids=["ABCDE12345.com.example.app"], store_url=pg_url, root_ca=root)
    migrating = create_store_engine(pg_url)
    upgrade(migrating)
    migrating.dispose()
    resources = ProcessResources.build(create_celery_app(settings), settings)
    for sessions, replaced in (
        (resources._pinged_sessions(settings), True),
        (resources.service.sessions, False),
    ):
        with sessions() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        _terminate_backend(pg_url, pid)
        with sessions() as session:
            if replaced:
                assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
            else:
                with pytest.raises(OperationalError):
                    session.execute(text("SELECT 1"))
        sessions.kw["bind"].dispose()
