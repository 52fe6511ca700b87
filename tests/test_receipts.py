"""Receipt refresh against a local fake of Apple's fraud-metric service, on real PostgreSQL."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from producer import AppAttestClient, AppAttestError
from tests.factory import APP_ID, Device, ReceiptCA, TestCA, client_data_hash, make_receipt
from tests.fake_apple import KEY_ID, TEAM_ID, FakeApple, running
from tests.faults import serve_app as serve
from worker.contract import parse_request
from worker.core import Policy, Reason, TrustStore
from worker.core.attestation import parse_attestation_object
from worker.core.receipt import Receipt, ReceiptTrustStore
from worker.queue.receipts_setup import RefreshNotConfigured, build_refresher, receipt_trust
from worker.service import VerificationService
from worker.service.apple import AppleToken, ExchangeOutcome, ReceiptExchange
from worker.service.apple_rate import RedisTokenBucket, Unlimited
from worker.service.receipts import ReceiptRefresher, RefreshOutcome
from worker.settings import load_settings
from worker.store.db import create_store_engine, session_factory, upgrade
from worker.store.models import ReceiptState, RiskMetricReading
from worker.store.receipts import due_key_ids, get_key_state

TENANT = "tenant-a"


@pytest.fixture(scope="module")
def receipt_ca() -> ReceiptCA:
    return ReceiptCA.create()


@pytest.fixture(scope="module")
def p8_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_store_engine(pg_url)
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def fake(receipt_ca: ReceiptCA, p8_key: ec.EllipticCurvePrivateKey) -> Iterator[FakeApple]:
    with running(FakeApple(ca=receipt_ca, public_key=p8_key.public_key())) as server:
        yield server


@dataclass
class World:
    service: VerificationService
    refresher: ReceiptRefresher
    exchange: ReceiptExchange
    sessions: sessionmaker[Session]
    devices: list[Device]


def _register(
    service: VerificationService, ca: TestCA, receipt_ca: ReceiptCA, now: datetime
) -> Device:
    """Register a device whose attestation carries an ATTEST receipt naming its credCert."""
    device = Device(ca=ca)
    challenge = f"c-{device.key_id_b64}"
    first = parse_attestation_object(
        device.attestation_object(client_data_hash(challenge), now=now)
    )
    receipt = make_receipt(
        ca=receipt_ca,
        app_id=APP_ID,
        credential_certificate_der=first.x5c[0],
        client_hash=client_data_hash(challenge),
        creation_time=now,
        expiration_time=now + timedelta(days=90),
    )
    body = device.registration_body(challenge, now=now, x5c=list(first.x5c), receipt=receipt)
    # Registered as the API key named "tenant-a" would: only it may read the key's state.
    [result] = service.handle_batch([(None, parse_request(body))], now=now, submitted_by=[TENANT])
    assert result.ok, result
    return device


def _world(
    ca: TestCA,
    receipt_ca: ReceiptCA,
    p8_key: ec.EllipticCurvePrivateKey,
    fake: FakeApple,
    sessions: sessionmaker[Session],
    *,
    count: int = 3,
    max_risk_metric: int | None = None,
) -> World:
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )
    service = VerificationService(policy=policy, sessions=sessions, max_risk_metric=max_risk_metric)
    now = datetime.now(UTC)
    devices = [_register(service, ca, receipt_ca, now) for _ in range(count)]
    token = AppleToken(team_id=TEAM_ID, key_id=KEY_ID, private_key=p8_key)
    exchange = ReceiptExchange(
        token=token,
        production_url=fake.url("production"),
        development_url=fake.url("development"),
        timeout=5,
    )
    refresher = ReceiptRefresher(
        sessions=sessions,
        exchange=exchange,
        trust=ReceiptTrustStore.replacing_apple_root(receipt_ca.root_pem),
        limit=Unlimited(),
    )
    return World(service, refresher, exchange, sessions, devices)


@pytest.fixture
def world(
    ca: TestCA,
    receipt_ca: ReceiptCA,
    p8_key: ec.EllipticCurvePrivateKey,
    fake: FakeApple,
    sessions: sessionmaker[Session],
) -> Iterator[World]:
    made = _world(ca, receipt_ca, p8_key, fake, sessions)
    yield made
    made.exchange.close()


def _ids(world: World) -> list[str]:
    return [d.key_id_b64 for d in world.devices]


def _state(world: World, key_id: str) -> ReceiptState:
    with world.sessions() as session:
        state = session.get(ReceiptState, key_id)
        assert state is not None
        session.expunge(state)
        return state


# --- The token ------------------------------------------------------------------------------


def test_the_token_is_es256_jose_and_reused_for_half_an_hour(
    p8_key: ec.EllipticCurvePrivateKey, fake: FakeApple
) -> None:
    token = AppleToken(team_id=TEAM_ID, key_id=KEY_ID, private_key=p8_key)
    now = datetime.now(UTC)
    first = token.token(now)
    header, claims, signature = first.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "ES256", "kid": KEY_ID}
    assert json.loads(base64.urlsafe_b64decode(claims + "==")) == {
        "iss": TEAM_ID,
        "iat": int(now.timestamp()),
    }
    assert len(base64.urlsafe_b64decode(signature + "==")) == 64
    assert fake._token_ok(first)
    assert token.token(now + timedelta(minutes=29)) == first
    assert token.token(now + timedelta(minutes=31)) != first


def test_a_token_signed_with_another_key_is_refused_and_stops_the_run(
    world: World, fake: FakeApple
) -> None:
    other = AppleToken(
        team_id=TEAM_ID, key_id=KEY_ID, private_key=ec.generate_private_key(ec.SECP256R1())
    )
    world.exchange._token = other
    batch = world.refresher.refresh_batch(_ids(world))
    assert batch.stopped
    assert [r.outcome for r in batch.results] == [RefreshOutcome.UNAUTHORIZED]
    assert batch.untried == tuple(_ids(world)[1:])
    assert fake.statuses == {401: 1}  # Apple is not hammered with a bad token


# --- Outcomes ---------------------------------------------------------------------------------


def test_registration_keeps_the_attest_receipt_dates(world: World) -> None:
    state = _state(world, world.devices[0].key_id_b64)
    assert state.receipt_type == "ATTEST"
    assert state.created_at is not None and state.expires_at is not None
    assert state.risk_metric is None


def test_a_refresh_stores_the_new_receipt_metric_and_history(world: World, fake: FakeApple) -> None:
    fake.risk_metric = 3
    # Receipts valid at once, so that the second exchange is not too early.
    fake.not_before_delay = timedelta(0)
    before = datetime.now(UTC)
    batch = world.refresher.refresh_batch(_ids(world))
    assert [r.outcome for r in batch.results] == [RefreshOutcome.REFRESHED] * 3
    assert not batch.stopped and batch.retry == ()
    state = _state(world, world.devices[0].key_id_b64)
    assert state.receipt_type == "RECEIPT" and state.risk_metric == 3
    assert state.not_before is not None and state.not_before >= before
    assert state.next_refresh_at is not None
    assert state.next_refresh_at >= before + timedelta(hours=23)  # daily
    # The next exchange sends the receipt Apple returned: the fake only accepts its own.
    fake.risk_metric = 5
    world.refresher.refresh_batch(_ids(world)[:1])
    with world.sessions() as session:
        key_state = get_key_state(session, world.devices[0].key_id_b64, registered_by=TENANT)
    assert key_state is not None
    assert key_state.risk_metric == 5
    assert [m for _, m in key_state.history] == [5, 3]
    assert fake.statuses == {200: 4}


def test_before_not_before_apple_answers_304_and_the_key_waits_for_it(
    world: World, fake: FakeApple
) -> None:
    world.refresher.refresh_batch(_ids(world)[:1])
    stored = _state(world, world.devices[0].key_id_b64)
    batch = world.refresher.refresh_batch(_ids(world)[:1])
    assert [r.outcome for r in batch.results] == [RefreshOutcome.TOO_EARLY]
    after = _state(world, world.devices[0].key_id_b64)
    assert after.receipt == stored.receipt
    assert after.next_refresh_at == stored.not_before
    with world.sessions() as session:
        assert world.devices[0].key_id_b64 not in due_key_ids(session, now=datetime.now(UTC))
        assert world.devices[1].key_id_b64 in due_key_ids(session, now=datetime.now(UTC))


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, RefreshOutcome.BAD_REQUEST),
        (404, RefreshOutcome.RECEIPT_STALE),
    ],
)
def test_final_statuses(
    world: World, fake: FakeApple, status: int, outcome: RefreshOutcome
) -> None:
    fake.force(status)
    batch = world.refresher.refresh_batch(_ids(world)[:1])
    assert [r.outcome for r in batch.results] == [outcome]
    state = _state(world, world.devices[0].key_id_b64)
    assert state.outcome == outcome.value and state.receipt_type == "ATTEST"
    if outcome is RefreshOutcome.RECEIPT_STALE:
        assert state.next_refresh_at is None
        # Apple holds no more data: the key is never exchanged again.
        again = world.refresher.refresh_batch(_ids(world)[:1])
        assert [r.outcome for r in again.results] == [RefreshOutcome.RECEIPT_STALE]
        assert fake.statuses == {status: 1}
        with world.sessions() as session:
            assert world.devices[0].key_id_b64 not in due_key_ids(
                session, now=datetime.now(UTC) + timedelta(days=365), due_only=False
            )


@pytest.mark.parametrize("status", [429, 500, 503])
def test_throttling_backs_off_the_rest_of_the_batch_without_losing_keys(
    world: World, fake: FakeApple, status: int
) -> None:
    fake.retry_after = "30"
    fake.force(status)
    batch = world.refresher.refresh_batch(_ids(world))
    assert [r.outcome for r in batch.results] == [RefreshOutcome.RETRY_LATER] * 3
    assert batch.retry == tuple(_ids(world))
    assert batch.backoff is not None and batch.backoff > 0
    if status == 429:
        assert batch.backoff >= 30  # Apple's Retry-After
    assert fake.statuses == {status: 1}  # the rest of the batch was not sent
    later = datetime.now(UTC) + timedelta(hours=7)
    with world.sessions() as session:
        assert set(due_key_ids(session, now=later)) == set(_ids(world))
    # Handed out again, the keys are refreshed.
    again = world.refresher.refresh_batch(list(batch.retry))
    assert [r.outcome for r in again.results] == [RefreshOutcome.REFRESHED] * 3


def test_a_revoked_key_is_not_refreshed(world: World, fake: FakeApple) -> None:
    from worker.store.models import DeviceKey

    with world.sessions() as session, session.begin():
        key = session.get(DeviceKey, world.devices[0].key_id_b64)
        assert key is not None
        key.revoked_at = datetime.now(UTC)
        key.revoked_reason = "certificate_chain_invalid"
    batch = world.refresher.refresh_batch([*_ids(world)[:1], "unknown-key"])
    assert [r.outcome for r in batch.results] == [
        RefreshOutcome.REVOKED,
        RefreshOutcome.KEY_UNKNOWN,
    ]
    assert sum(fake.statuses.values()) == 0


# --- Forged answers -------------------------------------------------------------------------


def _forger(kind: str, receipt_ca: ReceiptCA) -> object:
    def forge(sent: Receipt, now: datetime) -> bytes:
        fields: dict[str, object] = {
            "ca": receipt_ca,
            "app_id": sent.app_id,
            "credential_certificate_der": sent.credential_certificate,
            "client_hash": b"\x00" * 8,
            "receipt_type": "RECEIPT",
            "environment": sent.environment,
            "creation_time": now,
            "not_before": now + timedelta(days=1),
            "expiration_time": now + timedelta(days=90),
            "risk_metric": 2,
            "der": True,
        }
        if kind == "wrong_key":
            fields["credential_certificate_der"] = sent.credential_certificate[:-1] + b"\x00"
        elif kind == "wrong_app":
            fields["app_id"] = "OTHERTEAM.com.example.other"
        elif kind == "other_ca":
            fields["ca"] = ReceiptCA.create()
        elif kind == "expired":
            fields["expiration_time"] = now - timedelta(seconds=1)
        elif kind == "old":
            fields["creation_time"] = now - timedelta(hours=2)
        elif kind == "attest_type":
            fields["receipt_type"] = "ATTEST"
        raw = make_receipt(**fields)  # type: ignore[arg-type]
        if kind == "bad_signature":
            # The signature is the last OCTET STRING of a DER receipt: flip its last byte.
            raw = raw[:-1] + bytes([raw[-1] ^ 1])
        return raw

    return forge


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("wrong_key", "key_mismatch"),
        ("wrong_app", "app_id_mismatch"),
        ("other_ca", "receipt_invalid"),
        ("bad_signature", "receipt_invalid"),
        ("expired", "expired"),
        ("old", "not_fresh"),
        ("attest_type", "wrong_type"),
    ],
)
def test_a_forged_answer_is_never_stored(
    world: World, fake: FakeApple, receipt_ca: ReceiptCA, kind: str, reason: str
) -> None:
    before = _state(world, world.devices[0].key_id_b64)
    fake.forge = _forger(kind, receipt_ca)  # type: ignore[assignment]
    batch = world.refresher.refresh_batch(_ids(world)[:1])
    (result,) = batch.results
    assert result.outcome is RefreshOutcome.RECEIPT_REJECTED
    assert result.reason == reason
    after = _state(world, world.devices[0].key_id_b64)
    assert after.receipt == before.receipt and after.risk_metric is None
    assert after.outcome == "receipt_rejected"
    with world.sessions() as session:
        assert session.scalars(select(RiskMetricReading)).all() == []


def test_a_replayed_older_receipt_is_never_stored(
    world: World, fake: FakeApple, receipt_ca: ReceiptCA
) -> None:
    # A first refresh stores a receipt created now; an answer created before it (a genuine
    # receipt of the same key and app, still within ten minutes) would roll the metric back.
    fake.not_before_delay = timedelta(0)
    fake.risk_metric = 9
    world.refresher.refresh_batch(_ids(world)[:1])
    stored = _state(world, world.devices[0].key_id_b64)
    assert stored.created_at is not None and stored.risk_metric == 9

    def replay(sent: Receipt, now: datetime) -> bytes:
        return make_receipt(
            ca=receipt_ca,
            app_id=sent.app_id,
            credential_certificate_der=sent.credential_certificate,
            client_hash=b"\x00" * 8,
            receipt_type="RECEIPT",
            environment=sent.environment,
            creation_time=stored.created_at - timedelta(seconds=5),  # type: ignore[operator]
            not_before=now,
            expiration_time=now + timedelta(days=90),
            risk_metric=1,
            der=True,
        )

    fake.forge = replay
    (result,) = world.refresher.refresh_batch(_ids(world)[:1]).results
    assert result.outcome is RefreshOutcome.RECEIPT_REJECTED and result.reason == "replayed"
    after = _state(world, world.devices[0].key_id_b64)
    assert after.receipt == stored.receipt and after.risk_metric == 9


def test_a_receipt_of_another_registered_key_is_never_stored(
    world: World, fake: FakeApple, receipt_ca: ReceiptCA
) -> None:
    # Apple (or whoever answers) returns a genuine receipt of another key of the same app.
    with world.sessions() as session:
        from worker.store.models import DeviceKey

        other = session.get(DeviceKey, world.devices[1].key_id_b64)
        assert other is not None
        other_cert = parse_attestation_object(other.attestation).x5c[0]

    def other_key(sent: Receipt, now: datetime) -> bytes:
        return make_receipt(
            ca=receipt_ca,
            app_id=sent.app_id,
            credential_certificate_der=other_cert,
            client_hash=b"\x00" * 8,
            receipt_type="RECEIPT",
            environment=sent.environment,
            creation_time=now,
            not_before=now,
            expiration_time=now + timedelta(days=90),
            risk_metric=1,
            der=True,
        )

    fake.forge = other_key
    (result,) = world.refresher.refresh_batch(_ids(world)[:1]).results
    assert result.outcome is RefreshOutcome.RECEIPT_REJECTED and result.reason == "key_mismatch"
    assert _state(world, world.devices[0].key_id_b64).risk_metric is None


@pytest.mark.parametrize(
    ("body", "outcome", "reason"),
    [
        (b"not base64 at all!", RefreshOutcome.RETRY_LATER, None),
        (b"QUFB" * 100_000, RefreshOutcome.RETRY_LATER, None),  # 400 KB: not read to the end
        (
            base64.b64encode(b"\x30\x03\x02\x01\x00"),
            RefreshOutcome.RECEIPT_REJECTED,
            "receipt_invalid",
        ),
        (b"", RefreshOutcome.RECEIPT_REJECTED, "receipt_invalid"),
    ],
)
def test_a_malformed_answer_is_never_stored(
    world: World, fake: FakeApple, body: bytes, outcome: RefreshOutcome, reason: str | None
) -> None:
    fake.body = body
    (result,) = world.refresher.refresh_batch(_ids(world)[:1]).results
    assert result.outcome is outcome and result.reason == reason
    state = _state(world, world.devices[0].key_id_b64)
    assert state.receipt_type == "ATTEST" and state.risk_metric is None
    assert state.next_refresh_at is not None  # tried again later, never dropped


def test_a_timeout_is_retried_later_and_changes_nothing(
    world: World, fake: FakeApple, p8_key: ec.EllipticCurvePrivateKey
) -> None:
    fake.latency = 1.0
    slow = ReceiptExchange(
        token=AppleToken(team_id=TEAM_ID, key_id=KEY_ID, private_key=p8_key),
        production_url=fake.url("production"),
        development_url=fake.url("development"),
        timeout=0.2,
    )
    try:
        answer = slow.exchange(b"receipt", "production")
    finally:
        slow.close()
    assert answer.outcome is ExchangeOutcome.RETRY_LATER
    assert "Timeout" in answer.detail


# --- Runs -----------------------------------------------------------------------------------


def test_a_run_records_outcomes_stops_on_401_and_resumes(world: World, fake: FakeApple) -> None:
    from worker.service.refresh_runs import RefreshFilters, RefreshRunner, run_state, start_run

    runner = RefreshRunner(sessions=world.sessions, refresher=world.refresher)
    with world.sessions() as session, session.begin():
        state = start_run(session, run_id="r1", filters=RefreshFilters(), now=datetime.now(UTC))
    assert (state.total, state.done) == (3, 0)
    fake.force_always = 401
    step = runner.decide("r1", _ids(world))
    assert step.stopped is not None and "401" in step.stopped
    assert fake.statuses == {401: 1}  # the rest of the batch was not sent
    # Stopped: a further batch of the run sends nothing at all.
    assert runner.decide("r1", _ids(world)).decided == 0
    assert fake.statuses == {401: 1}
    with world.sessions() as session:
        assert run_state(session, "r1").pending == 3
    # The configuration is fixed; the run is resumed by its id.
    fake.force_always = None
    with world.sessions() as session, session.begin():
        state = start_run(session, run_id="r1", filters=RefreshFilters(), now=datetime.now(UTC))
    assert state.stopped_reason is None
    step = runner.decide("r1", _ids(world))
    assert step.decided == 3 and step.stopped is None
    # Delivered again, the batch exchanges nothing: every key of the run is decided.
    before = sum(fake.statuses.values())
    assert runner.decide("r1", _ids(world)).decided == 0
    assert sum(fake.statuses.values()) == before
    with world.sessions() as session:
        assert run_state(session, "r1").pending == 0


def test_a_run_s_batch_delivered_twice_at_once_exchanges_each_key_once(
    world: World, fake: FakeApple
) -> None:
    """A resumed run sends again the keys of a batch the worker still holds: the two
    deliveries, decided by two threads at the same moment, exchange each key once."""
    import threading

    from worker.service.refresh_runs import RefreshFilters, RefreshRunner, run_state, start_run

    runner = RefreshRunner(sessions=world.sessions, refresher=world.refresher)
    with world.sessions() as session, session.begin():
        start_run(session, run_id="r4", filters=RefreshFilters(), now=datetime.now(UTC))
    fake.latency = 0.3  # both deliveries are in flight together
    barrier = threading.Barrier(2)
    steps: list[int] = []

    def deliver() -> None:
        barrier.wait()
        steps.append(runner.decide("r4", _ids(world)).decided)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(steps) == [0, 3]
    assert sum(fake.statuses.values()) == 3  # one exchange per key
    with world.sessions() as session:
        assert run_state(session, "r4").pending == 0


def test_a_run_id_reused_with_other_filters_is_refused(world: World) -> None:
    from worker.service.refresh_runs import RefreshFilters, RunMismatch, start_run

    now = datetime.now(UTC)
    with world.sessions() as session, session.begin():
        start_run(session, run_id="r2", filters=RefreshFilters(limit=2), now=now)
    with pytest.raises(RunMismatch), world.sessions() as session, session.begin():
        start_run(session, run_id="r2", filters=RefreshFilters(limit=3), now=now)


def test_retried_keys_that_apple_keeps_refusing_end_as_retry_later(
    world: World, fake: FakeApple
) -> None:
    from worker.service.refresh_runs import RefreshFilters, RefreshRunner, run_state, start_run
    from worker.store.refresh_runs import results

    runner = RefreshRunner(sessions=world.sessions, refresher=world.refresher)
    with world.sessions() as session, session.begin():
        start_run(session, run_id="r3", filters=RefreshFilters(), now=datetime.now(UTC))
    fake.force(503)
    step = runner.decide("r3", _ids(world))
    assert set(step.retry) == set(_ids(world)) and step.decided == 0
    runner.give_up("r3", step.retry, "retries ended")
    with world.sessions() as session:
        assert run_state(session, "r3").pending == 0
        rows = list(results(session, "r3"))
        assert {r.outcome for r in rows} == {"retry_later"}
        # The keys stay due: a later run or the periodic refresh takes them up.
        later = datetime.now(UTC) + timedelta(hours=7)
        assert set(due_key_ids(session, now=later)) == set(_ids(world))


# --- The signal where callers need it -------------------------------------------------------


def test_assertions_carry_the_risk_metric_and_the_policy_refuses_above_it(
    ca: TestCA,
    receipt_ca: ReceiptCA,
    p8_key: ec.EllipticCurvePrivateKey,
    fake: FakeApple,
    sessions: sessionmaker[Session],
) -> None:
    made = _world(ca, receipt_ca, p8_key, fake, sessions, count=2, max_risk_metric=4)
    try:
        fresh, risky = made.devices
        result = made.service.handle(parse_request(fresh.assertion_body("p0")))
        assert result.ok and result.risk_metric is None
        fake.risk_metric = 4
        made.refresher.refresh_batch([fresh.key_id_b64])
        fake.risk_metric = 5
        made.refresher.refresh_batch([risky.key_id_b64])
        result = made.service.handle(parse_request(fresh.assertion_body("p1")))
        assert result.ok and result.risk_metric == 4 and result.risk_metric_at is not None
        assert result.to_json_dict()["riskMetric"] == 4
        refused = made.service.handle(parse_request(risky.assertion_body("p1")))
        assert refused.reason is Reason.RISK_METRIC_EXCEEDED
    finally:
        made.exchange.close()


def test_get_key_state_route(world: World, fake: FakeApple, pg_url: str) -> None:
    from producer.app import create_app

    fake.risk_metric = 7
    world.refresher.refresh_batch(_ids(world)[:1])
    settings = load_settings(store_url=pg_url, api_keys=f"{TENANT}:secret-key,tenant-b:other-key")
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        key_id = world.devices[0].key_id_b64
        path = "/v1/keys/" + key_id  # standard base64: "/" is part of the path
        assert client.get(path).status_code == 401
        answer = client.get(path, headers={"Authorization": "Bearer secret-key"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["keyId"] == key_id and body["appId"] == APP_ID
        assert body["riskMetric"] == 7 and body["receiptType"] == "RECEIPT"
        assert [h["riskMetric"] for h in body["history"]] == [7]
        assert body["revoked"] is False and body["counter"] == 0
        missing = client.get("/v1/keys/nope", headers={"Authorization": "Bearer secret-key"})
        assert missing.status_code == 404
        # What is not a keyId is refused before the store is read (NUL: not a 500).
        newline = client.get("/v1/keys/a%0Ab", headers={"Authorization": "Bearer secret-key"})
        assert newline.status_code == 404  # no route takes it
        for bad in ("%00", "a%01b", "x" * 45, "k%3Bdrop"):
            refused = client.get(f"/v1/keys/{bad}", headers={"Authorization": "Bearer secret-key"})
            assert refused.status_code == 422, (bad, refused.text)
            assert refused.json()["error"]["code"] == "invalid_request"
        with AppAttestClient(url, api_key="secret-key") as api:
            state = api.get_key(key_id)
            assert state.risk_metric == 7 and state.history[0].risk_metric == 7
            with pytest.raises(AppAttestError) as refused:
                api.get_key("nope")
            assert refused.value.status == 404
        # Another API key reads the key like one never registered: 404, the same answer.
        other = client.get(path, headers={"Authorization": "Bearer other-key"})
        assert other.status_code == 404
        assert other.json() == missing.json()
        assert other.json()["error"]["code"] == "not_found"
        with AppAttestClient(url, api_key="other-key") as api, pytest.raises(AppAttestError):
            api.get_key(key_id)


def test_the_migration_gives_existing_keys_their_receipt(pg_url: str) -> None:
    from sqlalchemy import text

    engine = create_store_engine(pg_url)
    try:
        upgrade(engine, "0006")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO device_keys (key_id, app_id, environment, public_key, counter,"
                    " receipt, attestation, verified_at, leaf_fingerprint,"
                    " intermediate_fingerprint) VALUES ('k', 'a', 'production', 'p', 0, 'r',"
                    " 'x', now(), 'l', 'i'), ('m', 'a', 'production', 'p', 0, 'r', 'x', now(),"
                    " 'l', 'i')"
                )
            )
            # Key k's registration verdict names its API key; m was imported (none).
            connection.execute(
                text(
                    "INSERT INTO verdicts (job_id, kind, key_id, app_id, ok, result, decided_at,"
                    " submitted_by) VALUES ('j1', 'registration', 'k', 'a', true, '{}', now(),"
                    " 'web'), ('j2', 'registration', 'k', 'a', false, '{}', now(), 'evil'),"
                    " ('j3', 'assertion', 'm', 'a', true, '{}', now(), 'evil')"
                )
            )
        upgrade(engine)
        with session_factory(engine)() as session:
            assert due_key_ids(session, now=datetime.now(UTC)) == ["k", "m"]
            state = session.get(ReceiptState, "k")
            assert state is not None and state.receipt == b"r" and state.receipt_type is None
            assert get_key_state(session, "k", registered_by="web") is not None
            assert get_key_state(session, "k", registered_by="evil") is None
            assert get_key_state(session, "m", registered_by="evil") is None
    finally:
        engine.dispose()


# --- The shared rate limit ------------------------------------------------------------------


def test_the_token_bucket_is_shared_through_redis(redis_server: str) -> None:
    client = redis.Redis.from_url(redis_server)
    key = f"appattest-test:apple-rate:{datetime.now(UTC).timestamp()}"
    try:
        one = RedisTokenBucket(client, rate=0.01, burst=3, key=key)
        two = RedisTokenBucket(client, rate=0.01, burst=3, key=key)
        taken = [one.take(), two.take(), one.take()]
        assert taken == [0.0, 0.0, 0.0]
        # The burst is spent for both limiters: one more token is about 100 s away.
        assert two.take() > 50 and one.take() > 50
    finally:
        client.delete(key)
        client.close()


def test_exchange_maps_a_connection_error_to_retry_later(
    p8_key: ec.EllipticCurvePrivateKey,
) -> None:
    token = AppleToken(team_id=TEAM_ID, key_id=KEY_ID, private_key=p8_key)
    exchange = ReceiptExchange(
        token=token,
        production_url="http://127.0.0.1:9/v1/attestationData",
        development_url="http://127.0.0.1:9/v1/attestationData",
        timeout=1,
    )
    try:
        assert exchange.exchange(b"r", "production").outcome is ExchangeOutcome.RETRY_LATER
    finally:
        exchange.close()


# --- Built from the settings ----------------------------------------------------------------


def test_the_refresher_is_built_from_the_settings(
    world: World,
    fake: FakeApple,
    receipt_ca: ReceiptCA,
    p8_key: ec.EllipticCurvePrivateKey,
    redis_server: str,
    pg_url: str,
    tmp_path: Path,
) -> None:
    p8 = tmp_path / "AuthKey.p8"
    p8.write_bytes(
        p8_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    root = tmp_path / "receipt-root.pem"
    root.write_bytes(receipt_ca.root_pem)
    settings = load_settings(
        store_url=pg_url,
        apple_team_id=TEAM_ID,
        apple_key_id=KEY_ID,
        apple_private_key_file=p8,
        apple_data_url=fake.url("production"),
        apple_data_development_url=fake.url("development"),
        receipt_root_ca=root,
    )
    client = redis.Redis.from_url(redis_server)
    refresher, exchange = build_refresher(settings, sessions=world.sessions, client=client)
    try:
        batch = refresher.refresh_batch(_ids(world))
        assert [r.outcome for r in batch.results] == [RefreshOutcome.REFRESHED] * 3
    finally:
        exchange.close()
        client.close()
    # Without the DeviceCheck key nothing is sent; by default receipts chain to Apple's root.
    with pytest.raises(RefreshNotConfigured):
        build_refresher(load_settings(), sessions=world.sessions, client=client)
    assert receipt_trust(load_settings()).is_apple


# --- Commands -------------------------------------------------------------------------------


def test_refresh_without_the_devicecheck_key_is_a_usage_error_and_dry_run_lists_keys(
    world: World, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from worker.cli.commands import main

    for name in ("APPATTEST_APPLE_TEAM_ID", "APPATTEST_APPLE_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("APPATTEST_STORE_URL", pg_url)
    refused = CliRunner().invoke(main, ["receipts", "refresh"])
    assert refused.exit_code == 2
    assert "APPATTEST_APPLE_TEAM_ID" in refused.output
    listed = CliRunner().invoke(main, ["receipts", "refresh", "--dry-run", "--limit", "2"])
    assert listed.exit_code == 0, listed.output
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [line["keyId"] for line in lines] == sorted(_ids(world))[:2]
    assert {line["outcome"] for line in lines} == {"would_refresh"}
    # Nothing was called and nothing changed.
    assert _state(world, world.devices[0].key_id_b64).outcome is None


@pytest.mark.parametrize(
    ("queues", "message"),
    [
        ("bogus", "--queues takes verify, receipts and/or android"),
        ("receipts", "APPATTEST_APPLE_KEY_ID"),
    ],
)
def test_worker_queues_are_checked(
    monkeypatch: pytest.MonkeyPatch, queues: str, message: str
) -> None:
    from click.testing import CliRunner

    from worker.cli.commands import main

    monkeypatch.delenv("APPATTEST_APPLE_KEY_ID", raising=False)
    monkeypatch.setenv("APPATTEST_APP_IDS", APP_ID)
    result = CliRunner().invoke(main, ["worker", "--no-supervise", f"--queues={queues}"])
    assert result.exit_code == 2 and message in result.output


def test_the_ordered_path_keeps_receipt_states_and_reports_the_risk_metric(
    world: World, fake: FakeApple, ca: TestCA, receipt_ca: ReceiptCA
) -> None:
    # `appattest verify` decides lines in order (decide_in_order): a key it registers gets its
    # receipt state like any other, and its assertions carry the refreshed metric.
    now = datetime.now(UTC)
    device = Device(ca=ca)
    challenge = f"c-{device.key_id_b64}"
    first = parse_attestation_object(
        device.attestation_object(client_data_hash(challenge), now=now)
    )
    receipt = make_receipt(
        ca=receipt_ca,
        app_id=APP_ID,
        credential_certificate_der=first.x5c[0],
        client_hash=client_data_hash(challenge),
        creation_time=now,
        expiration_time=now + timedelta(days=90),
    )
    body = device.registration_body(challenge, now=now, x5c=list(first.x5c), receipt=receipt)
    [registered] = world.service.decide_in_order([parse_request(body)], now=now)
    assert registered.ok, registered
    state = _state(world, device.key_id_b64)
    assert state.receipt_type == "ATTEST" and state.expires_at is not None
    fake.risk_metric = 8
    world.refresher.refresh_batch([device.key_id_b64])
    [asserted] = world.service.decide_in_order([parse_request(device.assertion_body("p1"))])
    assert asserted.ok and asserted.risk_metric == 8
