"""Android jobs (Play Integrity standard tokens) through the real queue: the producer puts them
on their own queue, ``appattest worker`` serves it with a pool of threads beside Apple's
processes, and Google is the local fake (``tests.fake_google``) over HTTP. Redis brokers,
PostgreSQL stores, real worker subprocesses.

Each test prints ``android=<case> sent=N verdicts=M wrong=W lost=L`` (``pytest -s``)."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from producer.batching import Owner
from producer.jobs import JobQueue, check_request
from tests.factory import APP_ID, Device, TestCA
from tests.fake_google import FakeGoogle, fake_google, payload
from tests.stack import Stack, key_owner, service_stack
from worker.cli.commands import main as worker_main
from worker.contract import PluginRequest
from worker.queue.app import create_celery_app
from worker.queue.messaging import (
    ANDROID_QUEUE,
    QUEUE,
    VERIFY_ANDROID_BATCH_TASK,
    VERIFY_BATCH_TASK,
)
from worker.settings import Settings
from worker.store.challenges import Purpose, new_challenge, store_challenges
from worker.store.db import create_store_engine, session_factory

pytestmark = pytest.mark.timeout(300)

PACKAGE = "com.example.app"
OTHER = "com.example.other"
CERT = hashlib.sha256(b"the app's signing certificate").digest()
OTHER_CERT = hashlib.sha256(b"someone else's certificate").digest()
KEY_ID = "android-standard-integrity"


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    with fake_google() as fake:
        yield fake


def android_env(google: FakeGoogle, workdir: Path, **extra: str) -> dict[str, str]:
    apps = {
        PACKAGE: {"certificateDigests": [CERT.hex()]},
        OTHER: {"certificateDigests": [OTHER_CERT.hex()]},
    }
    return {
        "APPATTEST_ANDROID_APPS": json.dumps(apps),
        "APPATTEST_GOOGLE_CREDENTIALS_FILE": str(google.service_account_file(workdir)),
        "APPATTEST_PLAY_INTEGRITY_URL": google.url,
        **extra,
    }


@contextmanager
def android_stack(
    ca: TestCA, pg_url: str, workdir: Path, google: FakeGoogle, **env: str
) -> Iterator[Stack]:
    with service_stack(
        store_url=pg_url,
        root_pem=ca.root_pem,
        workdir=workdir,
        app_ids=APP_ID,
        extra_env=android_env(google, workdir, **env),
    ) as stack:
        yield stack


def start_both(stack: Stack, name: str = "w") -> None:
    """``appattest worker`` as deployed: supervised, its default queues (Apple's with two
    processes, Android's pool of threads a child of it, named NAME-android); waits until both
    Celery workers answer a ping."""
    stack.start_worker(name=name, concurrency=2, supervise=True, args=["--android-concurrency=8"])
    app = create_celery_app(stack.settings)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = [next(iter(r)) for r in app.control.ping(timeout=0.5) or []]
            android = [n for n in names if n.startswith(f"{name}") and "-android@" in n]
            if android and len([n for n in names if n.startswith(name)]) >= 2:
                return
        raise AssertionError(f"both workers of {name} did not answer within 60 s")
    finally:
        app.close()


@contextmanager
def sessions_for(url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_store_engine(url)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


@contextmanager
def job_queue(settings: Settings, **options: Any) -> Iterator[JobQueue]:
    app = create_celery_app(settings)
    try:
        yield JobQueue(app, **options)
    finally:
        app.close()


def issue(sessions: sessionmaker[Session], purpose: str, count: int) -> list[str]:
    issued = [
        new_challenge(purpose=Purpose(purpose), key_id=None, ttl=timedelta(minutes=10), now=now())
        for _ in range(count)
    ]
    with sessions() as session, session.begin():
        store_challenges(session, issued)
    return [i.challenge for i in issued]


def android_body(
    token: str, *, challenge: str | None = None, payload_text: str | None = None
) -> dict[str, str]:
    """The plugin's Android body: a registration (``challenge``) or an assertion."""
    body = {
        "platform": "android",
        "format": "google-play-integrity-standard",
        "keyId": KEY_ID,
        "token": token,
        "packageName": PACKAGE,
    }
    if payload_text is not None:
        body["payload"] = payload_text
        if challenge is not None:
            body["challenge"] = challenge
    else:
        assert challenge is not None
        body["challenge"] = challenge
    return body


@dataclass(frozen=True)
class Expected:
    """The verdict a job must get: accepted (of ``kind``, on ``platform``) or refused for
    ``reason``."""

    kind: str
    platform: str
    reason: str | None = None

    def matches(self, result: dict[str, Any]) -> bool:
        if self.reason is not None:
            return not result["ok"] and result["reason"] == self.reason
        if not result["ok"] or result["kind"] != self.kind:
            return False
        if self.platform == "android":
            integrity = result.get("integrity") or {}
            return bool(
                result.get("platform") == "android"
                and result["appId"] == PACKAGE
                and "MEETS_DEVICE_INTEGRITY" in integrity.get("deviceLabels", [])
                and integrity.get("appRecognition") == "PLAY_RECOGNIZED"
            )
        return "platform" not in result and "integrity" not in result


def android_case(
    google: FakeGoogle, challenge: str, case: str, *, assertion: bool = False
) -> tuple[PluginRequest, Expected]:
    """An Android job of ``case`` over ``challenge``, with the token Google will decode."""
    signed = f"order=7;nonce={challenge}" if assertion else challenge
    kind = "assertion" if assertion else "registration"
    options: dict[str, Any] = {}
    reason: str | None = None
    at = now()
    package = PACKAGE
    if case == "device":
        options["device_labels"] = ("MEETS_BASIC_INTEGRITY",)
        reason = "integrity_device_not_trusted"
    elif case == "unrecognized":  # a sideloaded or development build: the wrong environment
        options["app_recognition"] = "UNRECOGNIZED_VERSION"
        reason = "integrity_app_unrecognized"
    elif case == "unlicensed":
        options["licensing"] = "UNLICENSED"
        reason = "integrity_unlicensed"
    elif case == "stale":  # an expired token: requested an hour ago
        at = at - timedelta(hours=1)
        reason = "integrity_token_stale"
    elif case == "hash":  # the token was requested over another challenge
        signed = signed + "x"
        reason = "integrity_request_hash_mismatch"
    elif case == "package":  # Google evaluated it for another app of ours
        package = OTHER
        reason = "integrity_package_mismatch"
    elif case == "certificate":
        options["certificate_digest"] = OTHER_CERT
        reason = "integrity_certificate_mismatch"
    answer = payload(
        package_name=package,
        signed_text=signed,
        certificate_digest=options.pop("certificate_digest", CERT),
        at=at,
        **options,
    )
    if case == "refused":  # Google cannot read it (400)
        token = "not-a-token-google-issued"
        reason = "integrity_token_invalid"
    elif case == "foreign":  # a genuine token of another package (Google answers 403)
        token = google.add_token(OTHER, answer)
        reason = "integrity_token_invalid"
    else:
        token = google.add_token(PACKAGE, answer)
    body = (
        android_body(token, challenge=challenge, payload_text=signed)
        if assertion
        else android_body(token, challenge=challenge)
    )
    return check_request(body), Expected(kind, "android", reason)


def collect(
    queue: JobQueue, job_ids: list[str], timeout: float, owner: Owner | None = None
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    pending = list(job_ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for chunk_start in range(0, len(pending), 500):
            chunk = pending[chunk_start : chunk_start + 500]
            statuses = queue.statuses_of([(owner or queue.owner, job_id) for job_id in chunk])
            for job_id, status in zip(chunk, statuses, strict=True):
                if status.done and status.result is not None:
                    results[job_id] = status.result.to_json_dict()
        pending = [job_id for job_id in pending if job_id not in results]
        if pending:
            time.sleep(0.1)
    return results


def report(case: str, sent: int, verdicts: int, wrong: int) -> None:
    print(f"\nandroid={case} sent={sent} verdicts={verdicts} wrong={wrong} lost={sent - verdicts}")


# The producer -----------------------------------------------------------------------------------


def test_android_jobs_travel_on_their_own_queue(ca: TestCA, pg_url: str, tmp_path: Path) -> None:
    """A mixed chunk becomes two batch messages: the Android jobs in a VerifyAndroidBatch on
    the Android queue, the others in a VerifyBatch on Apple's (no worker runs: the messages
    stay where the producer put them)."""
    with (
        service_stack(
            store_url=pg_url, root_pem=ca.root_pem, workdir=tmp_path, app_ids=APP_ID
        ) as stack,
        job_queue(stack.settings) as queue,
        sessions_for(pg_url) as sessions,
    ):
        device = Device(ca=ca)
        [ios_challenge, android_challenge] = issue(sessions, "registration", 2)
        requests = [
            check_request(device.registration_body(ios_challenge, now=now())),
            check_request(android_body("opaque", challenge=android_challenge)),
        ]
        job_ids = queue.submit_many(requests)
        assert len(set(job_ids)) == 2
        client = redis.Redis.from_url(stack.settings.broker_url)
        try:
            apple = [json.loads(m) for m in client.lrange(QUEUE, 0, -1)]
            android = [json.loads(m) for m in client.lrange(ANDROID_QUEUE, 0, -1)]
        finally:
            client.close()
        assert [m["headers"]["task"] for m in apple] == [VERIFY_BATCH_TASK]
        assert [m["headers"]["task"] for m in android] == [VERIFY_ANDROID_BATCH_TASK]
        # Every job reads pending (its batch is in the ledger), none is lost.
        assert [s.status for s in queue.statuses(job_ids)] == ["pending", "pending"]


def test_worker_queues_option_refuses_unknown_queues() -> None:
    result = CliRunner().invoke(worker_main, ["worker", "--app-id", APP_ID, "--queues", "nope"])
    assert result.exit_code == 2
    assert "verify, receipts and/or android" in result.output


# Real workers ------------------------------------------------------------------------------------

_ANDROID_CASES = {
    "ok": 500,
    "device": 40,
    "unrecognized": 40,
    "unlicensed": 30,
    "stale": 30,
    "hash": 20,
    "package": 20,
    "certificate": 10,
    "refused": 10,
    "foreign": 10,
}


def test_a_thousand_mixed_ios_and_android_jobs_get_their_right_verdicts(
    ca: TestCA, pg_url: str, tmp_path: Path, google: FakeGoogle
) -> None:
    """1,000 jobs, shuffled: 240 iOS registrations and 760 Android jobs (registrations and
    assertions that pass, and every Android rejection), through one supervised ``appattest
    worker`` serving both queues. Every job gets exactly its verdict; then replays of accepted
    Android jobs (the same token and challenge) are ``challenge_used``, a challenge never
    issued is ``challenge_unknown``, and another API key finds none of the jobs."""
    with ExitStack() as cleanup:
        stack = cleanup.enter_context(android_stack(ca, pg_url, tmp_path, google))
        start_both(stack)
        queue = cleanup.enter_context(job_queue(stack.settings, max_batch=100))
        sessions = cleanup.enter_context(sessions_for(pg_url))
        owner = key_owner("first-key")

        jobs: list[tuple[PluginRequest, Expected]] = []
        android_total = sum(_ANDROID_CASES.values())
        challenges = iter(issue(sessions, "registration", android_total))
        for case, count in _ANDROID_CASES.items():
            jobs += [android_case(google, next(challenges), case) for _ in range(count)]
        assertion_challenges = issue(sessions, "assertion", 50)
        jobs += [
            android_case(google, challenge, "ok", assertion=True)
            for challenge in assertion_challenges
        ]
        ios = 1000 - len(jobs)
        assert ios == 240
        devices = [Device(ca=ca) for _ in range(ios)]
        jobs += [
            (
                check_request(device.registration_body(challenge, now=now())),
                Expected("registration", "ios"),
            )
            for device, challenge in zip(devices, issue(sessions, "registration", ios), strict=True)
        ]
        random.Random(16).shuffle(jobs)
        job_ids = queue.submit_many([request for request, _ in jobs], owner=owner)
        expected = dict(zip(job_ids, (e for _, e in jobs), strict=True))

        results = collect(queue, job_ids, 180, owner)
        wrong = {j: r for j, r in results.items() if not expected[j].matches(r)}
        report("mixed", len(job_ids), len(results), len(wrong))
        assert len(results) == 1000, f"{1000 - len(results)} jobs without a verdict"
        assert not wrong, list(wrong.items())[:3]
        accepted = [r for r in results.values() if r["ok"] and r.get("platform") == "android"]
        assert len(accepted) == 550

        # Replays: the bodies of ten accepted Android jobs, sent again.
        replayed = [
            request
            for (request, e), job_id in zip(jobs, job_ids, strict=True)
            if e.platform == "android" and e.reason is None
        ][:10]
        unknown = [
            android_case(google, "never-issued-challenge-" + str(n), "ok")[0] for n in range(5)
        ]
        again = queue.submit_many(replayed + unknown, owner=owner)
        verdicts = collect(queue, again, 60, owner)
        reasons = [verdicts[j]["reason"] for j in again]
        assert reasons == ["challenge_used"] * 10 + ["challenge_unknown"] * 5

        # A second API key finds none of these jobs.
        other = key_owner("second-key")
        statuses = queue.statuses_of([(other, job_id) for job_id in job_ids[:50]])
        assert {s.status for s in statuses} == {"not_found"}


def test_google_failures_end_in_stable_verdicts_and_lose_no_job(
    ca: TestCA, pg_url: str, tmp_path: Path, google: FakeGoogle
) -> None:
    """Google over quota (429) or failing (5xx) within the retry budget: the job is accepted.
    Beyond it, and a Google that times out, the verdict is ``internal_error`` and the challenge
    stays unused, so that the same request sent again is accepted. A 400 is
    ``integrity_token_invalid``, also without spending the challenge; an access token Google
    revoked is replaced. No job stays without a verdict, none is falsely accepted."""
    with ExitStack() as cleanup:
        stack = cleanup.enter_context(
            android_stack(
                ca,
                pg_url,
                tmp_path,
                google,
                APPATTEST_PLAY_INTEGRITY_ATTEMPTS="3",
                APPATTEST_PLAY_INTEGRITY_TIMEOUT_SECONDS="0.5",
            )
        )
        start_both(stack)
        queue = cleanup.enter_context(job_queue(stack.settings))
        sessions = cleanup.enter_context(sessions_for(pg_url))
        sent = decided = 0

        def one(request: PluginRequest) -> dict[str, Any]:
            nonlocal sent, decided
            [job_id] = queue.submit_many([request])
            sent += 1
            verdict = collect(queue, [job_id], 60).get(job_id)
            assert verdict is not None, "the job got no verdict"
            decided += 1
            return verdict

        # Over quota, then a 503: the third attempt succeeds.
        request, expected = android_case(google, issue(sessions, "registration", 1)[0], "ok")
        google.fail_next(429, 503)
        assert expected.matches(one(request))

        # Three 500s: the retries are spent; the challenge is not, so a retry is accepted.
        request, expected = android_case(google, issue(sessions, "registration", 1)[0], "ok")
        google.fail_next(500, 500, 500)
        verdict = one(request)
        assert (verdict["ok"], verdict["reason"]) == (False, "internal_error")
        assert expected.matches(one(request))

        # Quota exhausted for longer than the retries: the same.
        request, expected = android_case(google, issue(sessions, "registration", 1)[0], "ok")
        google.fail_next(429, 429, 429)
        assert one(request)["reason"] == "internal_error"
        assert expected.matches(one(request))

        # Google slower than the timeout on every attempt.
        request, expected = android_case(google, issue(sessions, "registration", 1)[0], "ok")
        google.latency = 1.0
        assert one(request)["reason"] == "internal_error"
        google.latency = 0.0
        assert expected.matches(one(request))

        # A 400 (a token Google cannot read) is a rejection that leaves the challenge.
        request, expected = android_case(google, issue(sessions, "registration", 1)[0], "ok")
        google.fail_next(400)
        assert one(request)["reason"] == "integrity_token_invalid"
        assert expected.matches(one(request))

        # Google revoked the access token: the worker signs in again.
        request, expected = android_case(google, issue(sessions, "registration", 1)[0], "ok")
        before = google.token_requests
        google.revoke_access_tokens()
        assert expected.matches(one(request))
        assert google.token_requests > before
        report("google-failures", sent, decided, 0)


def test_apple_jobs_do_not_wait_while_android_jobs_wait_on_google(
    ca: TestCA, pg_url: str, tmp_path: Path, google: FakeGoogle
) -> None:
    """Google holds every decode call: the Android jobs wait, and iOS jobs submitted after
    them are all decided meanwhile, by the other worker; once Google answers, the Android
    jobs are decided too."""
    with ExitStack() as cleanup:
        # Held calls must not time out while the test looks.
        stack = cleanup.enter_context(
            android_stack(
                ca, pg_url, tmp_path, google, APPATTEST_PLAY_INTEGRITY_TIMEOUT_SECONDS="100"
            )
        )
        start_both(stack)
        queue = cleanup.enter_context(job_queue(stack.settings, max_batch=5))
        sessions = cleanup.enter_context(sessions_for(pg_url))
        google.hold()
        cleanup.callback(google.release)
        android = [
            android_case(google, challenge, "ok")
            for challenge in issue(sessions, "registration", 40)
        ]
        android_ids = queue.submit_many([request for request, _ in android])
        devices = [Device(ca=ca) for _ in range(30)]
        ios_ids = queue.submit_many(
            [
                check_request(device.registration_body(challenge, now=now()))
                for device, challenge in zip(
                    devices, issue(sessions, "registration", 30), strict=True
                )
            ]
        )
        ios_results = collect(queue, ios_ids, 60)
        assert len(ios_results) == 30 and all(r["ok"] for r in ios_results.values())
        # Google has not answered once: no Android job could have been decided.
        assert {s.status for s in queue.statuses(android_ids)} == {"pending"}
        google.release()
        android_results = collect(queue, android_ids, 60)
        wrong = [
            j
            for j, (_, e) in zip(android_ids, android, strict=True)
            if j not in android_results or not e.matches(android_results[j])
        ]
        report("isolation", 70, len(ios_results) + len(android_results), len(wrong))
        assert not wrong


def test_the_ledger_judges_android_messages_by_their_own_queue(
    ca: TestCA, pg_url: str, tmp_path: Path
) -> None:
    """The ledger's sweep (no worker runs; the test plays the broker): an Android batch
    waiting on the Android queue is not sent again because Apple's queue is empty, and one
    lost between the Android queue and its worker is published again, to the Android queue."""
    with (
        service_stack(
            store_url=pg_url, root_pem=ca.root_pem, workdir=tmp_path, app_ids=APP_ID
        ) as stack,
        job_queue(stack.settings) as queue,
    ):
        ledger = queue.ledger
        assert ledger is not None
        broker = ledger.client
        app = queue.celery_app
        for n in range(2):
            queue.submit_one(check_request(android_body("opaque", challenge=f"challenge-{n}")))
        assert broker.llen(ANDROID_QUEUE) == 2 and broker.llen(QUEUE) == 0
        # Apple's queue is empty; the Android backlog is still queued: nothing is resent.
        assert ledger.sweep(app, resend_after=0).resent == []
        assert broker.llen(ANDROID_QUEUE) == 2
        # The oldest Android message vanishes on its way to a worker: sent again, there.
        lost = broker.rpop(ANDROID_QUEUE)
        assert lost is not None
        lost_id = json.loads(lost)["headers"]["id"]
        assert ledger.sweep(app, resend_after=0).resent == [lost_id]
        assert broker.llen(ANDROID_QUEUE) == 2 and broker.llen(QUEUE) == 0
