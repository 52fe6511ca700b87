"""Android jobs through the service: issued one-time challenges, Google's decode (the local fake,
over HTTP), the verdict core, and the store (SQLite and real PostgreSQL)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.fake_google import FakeGoogle, fake_google, payload
from worker.contract import VerificationResult, parse_request
from worker.core import Reason
from worker.core.integrity import AndroidApp, AndroidPolicy
from worker.queue.play_integrity import PlayIntegrityClient
from worker.service.integrity import IntegrityService
from worker.store import bulk
from worker.store.challenges import (
    Purpose,
    challenge_digest,
    new_challenge,
    store_challenges,
)
from worker.store.db import create_store_engine, session_factory, upgrade

PACKAGE = "com.example.app"
OTHER = "com.example.other"
CERT = hashlib.sha256(b"the app's signing certificate").digest()
KEY_ID = "android-standard-integrity"


@pytest.fixture
def sessions(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_store_engine(store_url)
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    with fake_google() as fake:
        yield fake


@pytest.fixture
def client(google: FakeGoogle, tmp_path: Path) -> Iterator[PlayIntegrityClient]:
    with PlayIntegrityClient(
        credentials_file=google.service_account_file(tmp_path),
        base_url=google.url,
        attempts=3,
        sleep=lambda _: None,
    ) as client:
        yield client


def _policy(*packages: str) -> AndroidPolicy:
    return AndroidPolicy.build(
        AndroidApp(package_name=p, certificate_digests=frozenset({CERT})) for p in packages
    )


@pytest.fixture
def service(
    sessions: sessionmaker[Session], client: PlayIntegrityClient
) -> Iterator[IntegrityService]:
    with ThreadPoolExecutor(8) as pool:
        yield IntegrityService(
            policy=_policy(PACKAGE), decoder=client, sessions=sessions, executor=pool
        )


def _issue(
    sessions: sessionmaker[Session],
    purpose: Purpose = Purpose.REGISTRATION,
    ttl: timedelta = timedelta(minutes=5),
    now: datetime | None = None,
) -> str:
    issued = new_challenge(purpose=purpose, key_id=None, ttl=ttl, now=now or datetime.now(UTC))
    with sessions() as session, session.begin():
        store_challenges(session, [issued])
    return issued.challenge


def _registration(
    google: FakeGoogle, challenge: str, *, signed: str | None = None, **verdict: Any
) -> dict[str, Any]:
    """The plugin's Android attestation body, with a token Google will decode to a verdict
    over ``signed`` (the challenge by default) with the given changes."""
    package = verdict.pop("package_name", PACKAGE)
    answer = payload(
        package_name=package,
        signed_text=signed if signed is not None else challenge,
        certificate_digest=CERT,
        at=datetime.now(UTC) - timedelta(seconds=2),
        **verdict,
    )
    return {
        "platform": "android",
        "format": "google-play-integrity-standard",
        "keyId": KEY_ID,
        "challenge": challenge,
        "token": google.add_token(package, answer),
    }


def _challenge_used_by(sessions: sessionmaker[Session], challenge: str) -> bool:
    with sessions() as session:
        row = bulk.get_challenges(session, [challenge_digest(challenge)])[
            challenge_digest(challenge)
        ]
    return row.used_at is not None


def _recorded(sessions: sessionmaker[Session], job_id: str) -> VerificationResult:
    with sessions() as session:
        return VerificationResult.model_validate(bulk.get_verdicts(session, [job_id])[job_id])


def test_an_android_registration_is_accepted_once_and_recorded(
    service: IntegrityService, sessions: sessionmaker[Session], google: FakeGoogle
) -> None:
    challenge = _issue(sessions)
    body = _registration(google, challenge)
    result = service.handle(parse_request(body), job_id="job-1")
    assert result.ok, result
    assert result.platform == "android" and result.app_id == PACKAGE
    assert result.kind == "registration" and result.key_id == KEY_ID
    assert result.integrity is not None
    assert result.integrity.device_labels == ["MEETS_BASIC_INTEGRITY", "MEETS_DEVICE_INTEGRITY"]
    assert result.integrity.recent_device_activity == "LEVEL_1"
    assert result.integrity.app_recognition == "PLAY_RECOGNIZED"
    assert result.counter is None and result.environment is None
    assert _recorded(sessions, "job-1") == result
    assert _challenge_used_by(sessions, challenge)

    # A redelivery of the same job answers its first verdict without asking Google again.
    calls = google.decode_requests
    assert service.handle(parse_request(body), job_id="job-1") == result
    assert google.decode_requests == calls

    # The same challenge in another job, even with a fresh genuine token, is spent.
    again = service.handle(parse_request(_registration(google, challenge)), job_id="job-2")
    assert again.reason is Reason.CHALLENGE_USED and again.platform == "android"
    assert google.decode_requests == calls  # refused before Google was asked
    assert _recorded(sessions, "job-2").reason is Reason.CHALLENGE_USED


def test_an_android_assertion_over_a_payload_with_the_challenge(
    service: IntegrityService, sessions: sessionmaker[Session], google: FakeGoogle
) -> None:
    challenge = _issue(sessions, Purpose.ASSERTION)
    signed = f'{{"action":"transfer","amount":5,"nonce":"{challenge}"}}'
    body = {
        **_registration(google, challenge, signed=signed),
        "payload": signed,
    }
    request = parse_request(body)  # with payload and challenge: an assertion
    result = service.handle(request, job_id="assert-1")
    assert result.ok and result.kind == "assertion", result
    assert _challenge_used_by(sessions, challenge)

    # The payload alone is the challenge when no challenge is named.
    plain = _issue(sessions, Purpose.ASSERTION)
    alone = {**_registration(google, plain), "payload": plain}
    del alone["challenge"]
    assert service.handle(parse_request(alone), job_id="assert-2").ok


def test_challenge_problems_are_refused_before_asking_google(
    service: IntegrityService, sessions: sessionmaker[Session], google: FakeGoogle
) -> None:
    expired = _issue(sessions, ttl=timedelta(seconds=1), now=datetime.now(UTC) - timedelta(hours=1))
    for_assertions = _issue(sessions, Purpose.ASSERTION)
    cases = {
        "never issued by us": Reason.CHALLENGE_UNKNOWN,
        expired: Reason.CHALLENGE_EXPIRED,
        for_assertions: Reason.CHALLENGE_UNKNOWN,
    }
    items = [
        (f"c-{n}", parse_request(_registration(google, challenge)))
        for n, challenge in enumerate(cases)
    ]
    results = service.handle_batch(items)
    assert [r.reason for r in results] == list(cases.values())
    assert google.decode_requests == 0


@pytest.mark.parametrize(
    ("change", "reason", "spends_challenge"),
    [
        pytest.param({"signed": "another challenge"}, Reason.INTEGRITY_REQUEST_HASH_MISMATCH, False,
                     id="hash-mismatch"),
        pytest.param({"package_name": OTHER}, Reason.INTEGRITY_TOKEN_INVALID, False,
                     id="token-of-another-app"),
        pytest.param({"app_recognition": "UNEVALUATED"}, Reason.INTEGRITY_APP_UNRECOGNIZED, True,
                     id="app-unrecognized"),
        pytest.param({"device_labels": ()}, Reason.INTEGRITY_DEVICE_NOT_TRUSTED, True,
                     id="device-not-trusted"),
        pytest.param({"licensing": "UNLICENSED"}, Reason.INTEGRITY_UNLICENSED, True,
                     id="unlicensed"),
        pytest.param({"request_package_name": OTHER}, Reason.INTEGRITY_PACKAGE_MISMATCH, True,
                     id="package-mismatch"),
    ],
)  # fmt: skip
def test_rejections_and_whether_they_spend_the_challenge(
    service: IntegrityService,
    sessions: sessionmaker[Session],
    google: FakeGoogle,
    change: dict[str, Any],
    reason: Reason,
    spends_challenge: bool,
) -> None:
    """A token Google decoded for this very request spends its challenge whatever the verdict;
    one Google refuses or bound to another request leaves it for the genuine device."""
    challenge = _issue(sessions)
    result = service.handle(parse_request(_registration(google, challenge, **change)), job_id="r")
    assert result.reason is reason and not result.ok
    assert _recorded(sessions, "r").reason is reason
    assert _challenge_used_by(sessions, challenge) is spends_challenge
    genuine = service.handle(parse_request(_registration(google, challenge)), job_id="g")
    assert (genuine.reason is Reason.CHALLENGE_USED) is spends_challenge
    assert genuine.ok is not spends_challenge


def test_a_forged_token_does_not_burn_the_challenge(
    service: IntegrityService, sessions: sessionmaker[Session], google: FakeGoogle
) -> None:
    challenge = _issue(sessions)
    forged = {**_registration(google, challenge), "token": "a token Google never issued"}
    result = service.handle(parse_request(forged), job_id="forged")
    assert result.reason is Reason.INTEGRITY_TOKEN_INVALID
    assert not _challenge_used_by(sessions, challenge)
    assert service.handle(parse_request(_registration(google, challenge)), job_id="real").ok


@pytest.mark.parametrize("status", [429, 503])
def test_google_down_is_internal_error_and_never_an_accept(
    service: IntegrityService, sessions: sessionmaker[Session], google: FakeGoogle, status: int
) -> None:
    challenge = _issue(sessions)
    google.fail_next(*[status] * 3)  # every attempt of the client
    result = service.handle(parse_request(_registration(google, challenge)), job_id="down")
    assert not result.ok and result.reason is Reason.INTERNAL_ERROR
    assert _recorded(sessions, "down").reason is Reason.INTERNAL_ERROR
    # Nothing was judged, so the challenge is still there for the app's next try.
    assert not _challenge_used_by(sessions, challenge)
    assert service.handle(parse_request(_registration(google, challenge)), job_id="up").ok


def test_a_batch_decides_each_job_and_one_challenge_goes_to_one_job(
    service: IntegrityService, sessions: sessionmaker[Session], google: FakeGoogle
) -> None:
    google.latency = 0.02
    challenges = [_issue(sessions) for _ in range(12)]
    shared = challenges[0]
    items: list[tuple[str | None, Any]] = [
        (f"b-{n}", parse_request(_registration(google, c))) for n, c in enumerate(challenges)
    ]
    items.append(("b-twin", parse_request(_registration(google, shared))))
    items.append(
        (
            "b-ios",
            parse_request(
                {
                    **_registration(google, challenges[1]),
                    "platform": "ios",
                    "format": "apple-app-attest",
                }
            ),
        )
    )
    results = service.handle_batch(items, submitted_by=["alice"] * len(items))
    assert all(r.ok for r in results[:12]), results
    assert results[12].reason is Reason.CHALLENGE_USED
    assert results[13].reason is Reason.UNSUPPORTED_FORMAT
    with sessions() as session:
        recorded = bulk.get_verdicts_of(session, [job_id for job_id, _ in items if job_id])
    assert len(recorded) == len(items)
    assert {by for by, _ in recorded.values()} == {"alice"}


def test_several_apps_need_the_package_name(
    sessions: sessionmaker[Session], client: PlayIntegrityClient, google: FakeGoogle
) -> None:
    service = IntegrityService(policy=_policy(PACKAGE, OTHER), decoder=client, sessions=sessions)
    challenge = _issue(sessions)
    unnamed = service.handle(parse_request(_registration(google, challenge)))
    assert unnamed.reason is Reason.INVALID_REQUEST
    body = {**_registration(google, challenge, package_name=OTHER), "packageName": OTHER}
    named = service.handle(parse_request(body))
    assert named.ok and named.app_id == OTHER, named


def test_racing_jobs_with_one_challenge_accept_exactly_one(
    sessions: sessionmaker[Session], client: PlayIntegrityClient, google: FakeGoogle
) -> None:
    """Several services (as on several workers) decide jobs presenting the same challenge at
    the same time, each with its own genuine token: the store's conditional claim lets one
    through and records the others as challenge_used."""
    google.latency = 0.05  # so that several are past the challenge read before one commits
    challenge = _issue(sessions)
    bodies = [parse_request(_registration(google, challenge)) for _ in range(6)]
    services = [
        IntegrityService(policy=_policy(PACKAGE), decoder=client, sessions=sessions) for _ in bodies
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(
            pool.map(
                lambda n: services[n].handle(bodies[n], job_id=f"race-{n}"), range(len(bodies))
            )
        )
    assert sum(r.ok for r in results) == 1, results
    assert {r.reason for r in results if not r.ok} == {Reason.CHALLENGE_USED}
    with sessions() as session:
        assert len(bulk.get_verdicts(session, [f"race-{n}" for n in range(len(bodies))])) == 6
