"""Receipt refresh with real workers: ``appattest receipts refresh`` against the local fake of
Apple's fraud-metric service, on Redis and PostgreSQL, with two worker processes serving the
receipts queue (one started by ``appattest worker`` without options beside its verification
pool, one with ``--queues receipts``)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from tests.factory import Device, ReceiptCA, TestCA, client_data_hash, make_receipt
from tests.fake_apple import KEY_ID, TEAM_ID, FakeApple, running
from tests.stack import Stack, fresh_database, service_stack
from worker.core.attestation import parse_attestation_object
from worker.queue.app import create_celery_app
from worker.queue.messaging import RECEIPTS_QUEUE
from worker.store.db import create_store_engine, session_factory
from worker.store.models import DeviceKey, ReceiptState, RefreshResult, RiskMetricReading

# The Apple rate limit the fake enforces, and the one the workers share (below it, with its
# burst): the workers must never be answered 429.
APPLE_LIMIT = 150
WORKER_RATE = 110


@dataclass
class Store:
    """A key store and the CAs its keys and receipts are minted under."""

    sessions: sessionmaker[Session]
    receipt_ca: ReceiptCA
    ca: TestCA


@dataclass
class Env(Store):
    stack: Stack
    fake: FakeApple
    workdir: Path


@pytest.fixture(scope="module")
def env(ca: TestCA, pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("receipt-workers")
    receipt_ca = ReceiptCA.create()
    p8 = ec.generate_private_key(ec.SECP256R1())
    p8_path = workdir / "AuthKey.p8"
    p8_path.write_bytes(
        p8.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    receipt_root = workdir / "receipt-root.pem"
    receipt_root.write_bytes(receipt_ca.root_pem)
    fake = FakeApple(ca=receipt_ca, public_key=p8.public_key(), rate_limit=APPLE_LIMIT)
    with (
        running(fake),
        fresh_database(pg_server_url, "appattest_receipts") as store_url,
        service_stack(
            store_url=store_url,
            root_pem=ca.root_pem,
            workdir=workdir,
            app_ids="TEAMID1234.com.example.app",
            extra_env={
                "APPATTEST_APPLE_TEAM_ID": TEAM_ID,
                "APPATTEST_APPLE_KEY_ID": KEY_ID,
                "APPATTEST_APPLE_PRIVATE_KEY_FILE": str(p8_path),
                "APPATTEST_APPLE_DATA_URL": fake.url("production"),
                "APPATTEST_APPLE_DATA_DEVELOPMENT_URL": fake.url("development"),
                "APPATTEST_RECEIPT_ROOT_CA": str(receipt_root),
                "APPATTEST_APPLE_RATE_LIMIT_PER_SECOND": str(WORKER_RATE),
                "APPATTEST_APPLE_RATE_LIMIT_BURST": "10",
                "APPATTEST_RECEIPT_REFRESH_THREADS": "8",
                "APPATTEST_APPLE_TIMEOUT_SECONDS": "5",
                "APPATTEST_RECEIPT_REFRESH_RETRIES": "10",
            },
        ) as stack,
    ):
        # One worker without options: its verification pool and, beside it, the receipts
        # pool; one serving the receipts queue only.
        stack.start_worker(name="both")
        stack.start_worker(name="receipts", args=["--queues=receipts"])
        _wait_for_nodes(stack, ("both0-receipts@", "receipts1@"))
        engine = create_store_engine(store_url)
        try:
            yield Env(session_factory(engine), receipt_ca, ca, stack, fake, workdir)
        finally:
            engine.dispose()


def _wait_for_nodes(stack: Stack, prefixes: tuple[str, ...]) -> None:
    app = create_celery_app(stack.settings)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = {next(iter(r)) for r in app.control.ping(timeout=0.5) or []}
            if all(any(n.startswith(p) for n in names) for p in prefixes):
                return
        raise AssertionError(f"workers {prefixes} did not answer; saw {names}")
    finally:
        app.close()


@pytest.fixture
def reset(env: Env) -> Iterator[FakeApple]:
    fake = env.fake
    yield fake
    fake.force_always = None
    fake.forced.clear()
    fake.latency = 0.0
    fake.rate_limit = APPLE_LIMIT


def _store_keys(
    env: Store, app_id: str, count: int, *, due_at: datetime | None = None
) -> list[str]:
    """Store ``count`` registered keys of ``app_id`` (one attestation shared by all: what a
    refresh checks is the receipt against the key's stored credential certificate)."""
    now = datetime.now(UTC)
    device = Device(ca=env.ca)
    challenge = f"c-{uuid.uuid4()}"
    attestation = device.attestation_object(client_data_hash(challenge), now=now)
    credential = parse_attestation_object(attestation).x5c[0]
    receipt = make_receipt(
        ca=env.receipt_ca,
        app_id=app_id,
        credential_certificate_der=credential,
        client_hash=client_data_hash(challenge),
        creation_time=now - timedelta(minutes=1),
        expiration_time=now + timedelta(days=90),
    )
    key_ids = [base64.b64encode(os.urandom(32)).decode() for _ in range(count)]
    with env.sessions() as session, session.begin():
        session.execute(
            insert(DeviceKey),
            [
                {
                    "key_id": k,
                    "app_id": app_id,
                    "environment": "production",
                    "public_key": b"p",
                    "counter": 0,
                    "receipt": receipt,
                    "attestation": attestation,
                    "client_data_hash": client_data_hash(challenge),
                    "verified_at": now,
                    "leaf_fingerprint": b"l",
                    "intermediate_fingerprint": b"i",
                    "registered_by": "tenant-a",
                }
                for k in key_ids
            ],
        )
        session.execute(
            insert(ReceiptState),
            [
                {
                    "key_id": k,
                    "receipt": receipt,
                    "receipt_type": "ATTEST",
                    "created_at": now - timedelta(minutes=1),
                    "expires_at": now + timedelta(days=90),
                    "next_refresh_at": due_at,
                }
                for k in key_ids
            ],
        )
    return key_ids


def _refresh(env: Env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    if "--report-dir" not in args:
        args = (*args, "--report-dir", str(env.workdir / f"report-{uuid.uuid4().hex[:8]}"))
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.commands", "receipts", "refresh", *args],
        env=env.stack.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _metrics(env: Store, key_ids: list[str]) -> dict[str, int | None]:
    with env.sessions() as session:
        rows = session.execute(
            select(ReceiptState.key_id, ReceiptState.risk_metric).where(
                ReceiptState.key_id.in_(key_ids)
            )
        ).all()
    return {k: m for k, m in rows}


def _readings_per_key(env: Env, key_ids: list[str]) -> dict[str, int]:
    with env.sessions() as session:
        rows = session.execute(
            select(RiskMetricReading.key_id, func.count())
            .where(RiskMetricReading.key_id.in_(key_ids))
            .group_by(RiskMetricReading.key_id)
        ).all()
    return {k: int(n) for k, n in rows}


def test_a_run_over_thousands_of_keys_holds_apple_s_rate_limit_across_two_workers(
    env: Env, reset: FakeApple
) -> None:
    fake = reset
    app_id = "TEAMID1234.com.example.many"
    keys = _store_keys(env, app_id, 2500)
    fake.risk_metric = 3
    fake.arrivals.clear()
    fake.statuses.clear()
    report = env.workdir / "report-many"
    done = _refresh(env, "--app-id", app_id, "--report-dir", str(report), "--stall-timeout", "60")
    assert done.returncode == 0, done.stderr
    # Every key refreshed once, with its metric and one history reading.
    assert set(_metrics(env, keys).values()) == {3}
    assert set(_readings_per_key(env, keys).values()) == {1}
    lines = (report / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(keys) and all('"outcome": "refreshed"' in line for line in lines)
    assert "refreshed" in done.stderr
    # The shared bucket held the rate: Apple never answered 429, and never saw more than its
    # limit in any second.
    assert fake.statuses[429] == 0, fake.statuses
    assert fake.statuses[200] == len(keys)
    assert fake.busiest_second() <= APPLE_LIMIT
    # Both worker processes exchanged receipts.
    logs = {p.name: p.read_text() for p in env.workdir.glob("worker-*.log")}
    served = [name for name, text in logs.items() if "appattest.refresh_receipts" in text]
    assert len(served) == 2, sorted(logs)


def test_throttled_and_failing_answers_are_retried_and_no_key_is_lost(
    env: Env, reset: FakeApple
) -> None:
    fake = reset
    app_id = "TEAMID1234.com.example.throttled"
    keys = _store_keys(env, app_id, 300)
    fake.statuses.clear()
    fake.risk_metric = 4
    # Apple throttles and fails now and then: 429 with Retry-After, 500, 503.
    fake.force(429, 500, 429, 503, 429, 500)
    done = _refresh(env, "--app-id", app_id, "--report-dir", str(env.workdir / "r-throttled"))
    assert done.returncode == 0, done.stderr
    assert (fake.statuses[429], fake.statuses[500], fake.statuses[503]) == (3, 2, 1)
    assert set(_metrics(env, keys).values()) == {4}
    assert set(_readings_per_key(env, keys).values()) == {1}


def test_a_refused_token_stops_the_run_and_the_fixed_run_resumes(
    env: Env, reset: FakeApple
) -> None:
    fake = reset
    app_id = "TEAMID1234.com.example.unauthorized"
    keys = _store_keys(env, app_id, 400)
    fake.statuses.clear()
    fake.force_always = 401
    run_id = "stopped-run"
    stopped = _refresh(env, "--app-id", app_id, "--run-id", run_id, "--stall-timeout", "60")
    assert stopped.returncode == 1, stopped.stderr
    assert "run stopped" in stopped.stderr and "401" in stopped.stderr
    # Apple was not hammered: each batch already in a worker's hands sent one request at
    # most, then the run was stopped for all of them.
    assert 1 <= fake.statuses[401] <= 32
    assert set(_metrics(env, keys).values()) == {None}
    fake.force_always = None
    resumed = _refresh(env, "--app-id", app_id, "--run-id", run_id, "--stall-timeout", "60")
    assert resumed.returncode == 0, resumed.stderr
    assert None not in set(_metrics(env, keys).values())
    assert set(_readings_per_key(env, keys).values()) == {1}


def test_a_killed_run_whose_messages_were_lost_resumes_and_decides_each_key_once(
    env: Env, reset: FakeApple
) -> None:
    fake = reset
    app_id = "TEAMID1234.com.example.killed"
    keys = _store_keys(env, app_id, 400)
    fake.latency = 0.05  # slow enough to be killed halfway
    run_id = "killed-run"
    command = [sys.executable, "-m", "worker.cli.commands", "receipts", "refresh"]
    proc = subprocess.Popen(
        [*command, "--app-id", app_id, "--run-id", run_id, "--batch-size", "10"],
        env=env.stack.env,
        cwd=env.workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _done(env, run_id) < 40:
            time.sleep(0.1)
        assert _done(env, run_id) >= 40
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # The queued messages are lost too (as with a broker that lost its data).
    client = redis.Redis.from_url(env.stack.settings.broker_url)
    try:
        client.delete(RECEIPTS_QUEUE)
    finally:
        client.close()
    settled = _done(env, run_id)
    assert settled < len(keys)
    resumed = _refresh(env, "--app-id", app_id, "--run-id", run_id, "--stall-timeout", "60")
    assert resumed.returncode == 0, resumed.stderr
    assert _done(env, run_id) == len(keys)
    assert None not in set(_metrics(env, keys).values())
    assert set(_readings_per_key(env, keys).values()) == {1}  # never exchanged twice


def _done(env: Env, run_id: str) -> int:
    with env.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(RefreshResult)
                .where(RefreshResult.run_id == run_id, RefreshResult.status == "done")
            )
            or 0
        )


def test_the_periodic_refresh_hands_out_due_keys_once_across_workers(
    env: Env, reset: FakeApple
) -> None:
    from worker.queue.schedule import RefreshSchedule

    fake = reset
    fake.risk_metric = 6
    app_id = "TEAMID1234.com.example.periodic"
    now = datetime.now(UTC)
    due = _store_keys(env, app_id, 120, due_at=now - timedelta(minutes=1))
    later = _store_keys(env, app_id, 30, due_at=now + timedelta(hours=1))
    app = create_celery_app(env.stack.settings)
    client = redis.Redis.from_url(env.stack.settings.broker_url)
    client.delete("appattest:receipts:schedule")
    try:
        first, second = (
            RefreshSchedule(app, env.sessions, client, interval=30, max_keys=10_000)
            for _ in range(2)
        )
        published = first.tick()
        # One round at a time across workers: the other one's tick finds the lock taken.
        assert second.tick() is None
        assert published is not None and published >= len(due)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and None in set(_metrics(env, due).values()):
            time.sleep(0.2)
    finally:
        client.delete("appattest:receipts:schedule")
        client.close()
        app.close()
    assert set(_metrics(env, due).values()) == {6}
    assert set(_metrics(env, later).values()) == {None}  # not due: not exchanged
    with env.sessions() as session:
        states = session.scalars(select(ReceiptState).where(ReceiptState.key_id.in_(due))).all()
        # Due again after the interval (a day), never before the receipt's not-before.
        assert all(
            s.next_refresh_at and s.next_refresh_at > now + timedelta(hours=20) for s in states
        )


def test_verdicts_through_the_workers_carry_the_refreshed_risk_metric(
    env: Env, reset: FakeApple
) -> None:
    from producer.direct import QueueClient
    from tests.factory import APP_ID
    from worker.store.challenges import Purpose, new_challenge, store_challenges

    fake = reset
    fake.risk_metric = 12
    now = datetime.now(UTC)

    def challenge(purpose: Purpose, key_id: str | None) -> str:
        issued = new_challenge(purpose=purpose, key_id=key_id, ttl=timedelta(minutes=5), now=now)
        with env.sessions() as session, session.begin():
            store_challenges(session, [issued])
        return issued.challenge

    # A device registers through the verification worker, its attestation carrying an
    # ATTEST receipt the fake accepts.
    device = Device(ca=env.ca)
    issued = challenge(Purpose.REGISTRATION, None)
    first = parse_attestation_object(device.attestation_object(client_data_hash(issued), now=now))
    receipt = make_receipt(
        ca=env.receipt_ca,
        app_id=APP_ID,
        credential_certificate_der=first.x5c[0],
        client_hash=client_data_hash(issued),
        creation_time=now,
        expiration_time=now + timedelta(days=90),
    )
    app = create_celery_app(env.stack.settings)
    try:
        client = QueueClient(app)
        body = device.registration_body(issued, now=now, x5c=list(first.x5c), receipt=receipt)
        registered = client.verify(body)
        assert registered.ok, registered
        before = client.verify(
            device.assertion_body(challenge(Purpose.ASSERTION, device.key_id_b64))
        )
        assert before.ok and before.risk_metric is None  # not measured yet
        done = _refresh(env, "--app-id", APP_ID)
        assert done.returncode == 0, done.stderr
        after = client.verify(
            device.assertion_body(challenge(Purpose.ASSERTION, device.key_id_b64))
        )
    finally:
        app.close()
    assert after.ok and after.risk_metric == 12 and after.risk_metric_at is not None
    assert after.to_json_dict()["riskMetric"] == 12


def test_keys_apple_keeps_refusing_end_as_retry_later_and_stay_due(
    env: Env, reset: FakeApple
) -> None:
    fake = reset
    app_id = "TEAMID1234.com.example.down"
    keys = _store_keys(env, app_id, 30)
    fake.statuses.clear()
    fake.force_always = 503
    report = env.workdir / "report-down"
    done = _refresh(env, "--app-id", app_id, "--report-dir", str(report))
    assert done.returncode == 0, done.stderr
    lines = (report / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(keys) and all('"outcome": "retry_later"' in line for line in lines)
    assert "retry_later" in done.stderr
    # One batch: its first key was sent once per attempt (the first and 10 retries), the rest
    # of the batch waited with it.
    assert fake.statuses[503] == 11
    # Nothing was lost: the keys are due again after the backoff (Apple's Retry-After of 1 s
    # here), and once Apple is back a run of the due keys refreshes them.
    fake.force_always = None
    time.sleep(2.5)
    again = _refresh(env, "--app-id", app_id, "--due-only")
    assert again.returncode == 0, again.stderr
    assert None not in set(_metrics(env, keys).values())


def test_appattest_serve_refreshes_receipts_with_its_embedded_worker(
    ca: TestCA, tmp_path: Path
) -> None:
    import httpx

    from tests.factory import APP_ID
    from tests.faults import free_port

    receipt_ca = ReceiptCA.create()
    p8 = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "AuthKey.p8").write_bytes(
        p8.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "receipt-root.pem").write_bytes(receipt_ca.root_pem)
    (tmp_path / "root.pem").write_bytes(ca.root_pem)
    data = tmp_path / "data"
    fake = FakeApple(ca=receipt_ca, public_key=p8.public_key(), risk_metric=2)
    with running(fake):
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
        env |= {
            "APPATTEST_APPLE_TEAM_ID": TEAM_ID,
            "APPATTEST_APPLE_KEY_ID": KEY_ID,
            "APPATTEST_APPLE_PRIVATE_KEY_FILE": str(tmp_path / "AuthKey.p8"),
            "APPATTEST_APPLE_DATA_URL": fake.url("production"),
            "APPATTEST_RECEIPT_ROOT_CA": str(tmp_path / "receipt-root.pem"),
        }
        port = free_port()
        with (tmp_path / "serve.log").open("wb") as log:
            command = [sys.executable, "-m", "appattest", "serve", "--data-dir", str(data)]
            options = ["--app-id", APP_ID, "--root-ca", str(tmp_path / "root.pem")]
            serve = subprocess.Popen(
                [*command, *options, "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            engine = create_store_engine(f"sqlite:///{data / 'keys.db'}")
            embedded = Store(session_factory(engine), receipt_ca, ca)
            keys = _store_keys(embedded, APP_ID, 20)
            refresh = [sys.executable, "-m", "worker.cli.commands", "receipts", "refresh"]
            done = subprocess.run(
                [*refresh, "--report-dir", str(tmp_path / "report"), "--stall-timeout", "60"],
                env=env
                | {
                    "APPATTEST_STORE_URL": f"sqlite:///{data / 'keys.db'}",
                    "APPATTEST_BROKER_URL": f"sqla+sqlite:///{data / 'broker.db'}",
                    "APPATTEST_RESULT_BACKEND": f"db+sqlite:///{data / 'results.db'}",
                },
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert set(_metrics(embedded, keys).values()) == {2}
            engine.dispose()
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=30)
    assert "appattest.receipts" in (tmp_path / "serve.log").read_text()


def test_a_long_retry_after_is_not_waited_for_in_a_task(env: Env, reset: FakeApple) -> None:
    fake = reset
    app_id = "TEAMID1234.com.example.later"
    keys = _store_keys(env, app_id, 20)
    fake.statuses.clear()
    fake.retry_after = "600"  # beyond half the broker's visibility timeout (120 s)
    fake.force(429)
    report = env.workdir / "report-later"
    started = time.monotonic()
    done = _refresh(env, "--app-id", app_id, "--report-dir", str(report))
    fake.retry_after = "1"
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    lines = (report / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(keys)
    assert all('"outcome": "retry_later"' in line and "due then" in line for line in lines)
    assert fake.statuses[429] == 1
    with env.sessions() as session:
        due = session.scalars(
            select(ReceiptState.next_refresh_at).where(ReceiptState.key_id.in_(keys))
        ).all()
    assert all(d is not None and d > datetime.now(UTC) + timedelta(minutes=9) for d in due)
