"""The Python clients end to end: the HTTP clients (sync and asyncio) against a real uvicorn
server, and direct enqueueing through the broker, with verdicts from real worker processes."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import select

from producer import (
    AppAttestClient,
    AppAttestError,
    AsyncAppAttestClient,
    QueueClient,
    create_app,
)
from tests.factory import Device, TestCA
from tests.stack import REDIS_URL, Stack
from tests.test_producer_api import KEY, serve
from worker.contract import RegistrationRequest, VerificationResult
from worker.core import Reason, Rejected
from worker.queue.app import create_celery_app
from worker.store.db import create_store_engine
from worker.store.models import Verdict


def _now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def base_url(stack: Stack) -> Iterator[str]:
    settings = stack.settings.model_copy(update={"api_keys": [SecretStr(KEY)]})
    with serve(create_app(settings)) as url:
        yield url


def test_sync_client_end_to_end(base_url: str, ca: TestCA) -> None:
    device = Device(ca=ca)
    with AppAttestClient(base_url, KEY) as client:
        issued = client.create_challenge("registration")
        assert issued.purpose == "registration" and issued.key_id is None
        assert issued.expires_at > _now()
        # A contract model is accepted as well as a plain dict.
        body = RegistrationRequest.model_validate(
            device.registration_body(issued.challenge, now=_now())
        )
        result = client.verify_attestation(body, timeout=20)
        assert isinstance(result, VerificationResult)
        assert result.ok and result.kind == "registration" and result.reason is None
        assert result.key_id == device.key_id_b64 and result.counter == 0

        issued = client.create_challenge("assertion", key_id=device.key_id_b64)
        assert issued.key_id == device.key_id_b64
        result = client.verify_assertion(device.assertion_body(issued.challenge), timeout=20)
        assert result.ok and result.counter == 1

        nonce = client.create_challenge("assertion").challenge
        body_with_nonce = device.assertion_body(f"POST /transfer nonce={nonce}")
        job_id = client.submit_assertion(body_with_nonce, challenge=nonce)
        assert client.wait(job_id, timeout=20).counter == 2
        status = client.get_job(job_id)
        assert status.done and status.result is not None and status.result.counter == 2

        # The same body again: its challenge is spent.
        again = client.verify_assertion(body_with_nonce, challenge=nonce, timeout=20)
        assert again.ok is False and again.reason is Reason.CHALLENGE_USED


def test_sync_client_batches(base_url: str, ca: TestCA) -> None:
    with AppAttestClient(base_url, KEY) as client:
        newcomer = Device(ca=ca)
        challenge = client.create_challenge("registration").challenge
        entries = client.submit_many(
            [
                ("attestation", newcomer.registration_body(challenge, now=_now())),
                ("assertion", {"platform": "ios"}),
                ("assertion", Device(ca=ca).assertion_body(challenge)),
            ]
        )
        assert [entry.index for entry in entries] == [0, 1, 2]
        assert entries[0].accepted and entries[0].job_id is not None
        assert not entries[1].accepted and entries[1].error is not None
        assert entries[1].error.code == "invalid_request"
        assert entries[2].accepted and entries[2].job_id is not None
        assert client.wait(entries[0].job_id, timeout=20).ok
        # A registration challenge never serves an assertion.
        assert client.wait(entries[2].job_id, timeout=20).reason is Reason.CHALLENGE_UNKNOWN


def test_sync_client_errors(base_url: str, ca: TestCA) -> None:
    with AppAttestClient(base_url, "not-the-key") as client:
        with pytest.raises(AppAttestError) as refused:
            client.create_challenge("registration")
        assert refused.value.status == 401 and refused.value.code == "unauthorized"

    with AppAttestClient(base_url, KEY, server_wait=0.1) as client:
        with pytest.raises(AppAttestError) as invalid:
            client.submit_attestation({"platform": "ios", "format": "apple-app-attest"})
        assert invalid.value.status == 422 and invalid.value.code == "invalid_request"

        android = {**Device(ca=ca).registration_body("c", now=_now()), "platform": "android"}
        with pytest.raises(AppAttestError) as unsupported:
            client.verify_attestation(android)
        assert unsupported.value.code == "unsupported_format"

        with pytest.raises(AppAttestError) as mismatch:
            client.submit_assertion(Device(ca=ca).assertion_body("abc"), challenge="xyz")
        assert mismatch.value.code == "invalid_request"

        # An id this key was never given is no job of its: 404 at once, no waiting.
        with pytest.raises(AppAttestError) as unknown:
            client.wait(str(uuid.uuid4()), timeout=0.3)
        assert unknown.value.status == 404 and unknown.value.code == "job_not_found"


def test_async_client_end_to_end(base_url: str, ca: TestCA) -> None:
    async def scenario() -> None:
        device = Device(ca=ca)
        async with AsyncAppAttestClient(base_url, KEY) as client:
            issued = await client.create_challenge("registration")
            body = device.registration_body(issued.challenge, now=_now())
            result = await client.verify_attestation(body, timeout=20)
            assert result.ok and result.counter == 0

            # Several assertions at once, each with its own challenge and counter.
            challenges = [(await client.create_challenge("assertion")).challenge for _ in range(3)]
            bodies = [device.assertion_body(challenge) for challenge in challenges]
            job_ids = await asyncio.gather(*(client.submit_assertion(b) for b in bodies))
            results = await asyncio.gather(*(client.wait(j, timeout=20) for j in job_ids))
            # Two workers race; a higher counter that lands first makes a lower one a replay.
            accepted = sorted(r.counter for r in results if r.ok and r.counter is not None)
            assert 3 in accepted
            assert all(r.reason is Reason.COUNTER_REPLAY for r in results if not r.ok)

            nonce = (await client.create_challenge("assertion")).challenge
            payload = f'{{"nonce":"{nonce}"}}'
            result = await client.verify_assertion(
                device.assertion_body(payload), challenge=nonce, timeout=20
            )
            assert result.ok and result.counter == 4

            entries = await client.submit_many([("attestation", {"platform": "ios"})])
            assert entries[0].error is not None and entries[0].error.code == "invalid_request"
            status = await client.get_job(job_ids[0])
            assert status.done

        async with AsyncAppAttestClient(base_url, "wrong", server_wait=0.1) as client:
            with pytest.raises(AppAttestError) as refused:
                await client.get_job(str(uuid.uuid4()))
            assert refused.value.status == 401 and refused.value.code == "unauthorized"
        async with AsyncAppAttestClient(base_url, KEY, server_wait=0.1) as client:
            with pytest.raises(AppAttestError) as unknown:
                await client.wait(str(uuid.uuid4()), timeout=0.3)
            assert unknown.value.code == "job_not_found"

    asyncio.run(scenario())


def test_queue_client_end_to_end(stack: Stack, base_url: str, ca: TestCA) -> None:
    celery_app = create_celery_app(stack.settings)
    try:
        queue = QueueClient(celery_app)
        device = Device(ca=ca)
        with AppAttestClient(base_url, KEY) as client:
            registration = client.create_challenge("registration").challenge
            assertion = client.create_challenge("assertion").challenge

        result = queue.verify(device.registration_body(registration, now=_now()), timeout=20)
        assert result.ok and result.kind == "registration"
        job_id = queue.submit(device.assertion_body(assertion))
        assert uuid.UUID(job_id)
        result = queue.result(job_id, timeout=20)
        assert result.ok and result.counter == 1
        assert queue.status(job_id).done

        with pytest.raises(Rejected) as invalid:
            queue.submit(b"{not json")
        assert invalid.value.reason is Reason.INVALID_REQUEST
        with pytest.raises(Rejected) as unsupported:
            queue.submit({**device.assertion_body("p"), "format": "web-fallback"})
        assert unsupported.value.reason is Reason.UNSUPPORTED_FORMAT
        with pytest.raises(LookupError):
            queue.result(str(uuid.uuid4()), timeout=0.2)
    finally:
        celery_app.close()


def test_results_are_polled_or_awaited_per_batch_never_per_job(
    stack: Stack, base_url: str, ca: TestCA
) -> None:
    """Verdicts are read from the batches' results: no job makes the producer subscribe to
    a result channel of its own (as Celery's send_task and AsyncResult.get do with the Redis
    backend). A waiting request subscribes to its batch's channel only (producer.wakeups),
    never to a pattern, and unsubscribes when its wait ends."""
    commands: list[str] = []
    stop = f"stop-monitor-{uuid.uuid4()}"
    ours = {
        int(url.rsplit("/", 1)[1])
        for url in (stack.settings.broker_url, stack.settings.result_backend)
    }
    monitored = redis.Redis.from_url(REDIS_URL)
    started = threading.Event()

    def monitor() -> None:
        with monitored.monitor() as connection:
            started.set()
            for event in connection.listen():
                command = str(event["command"])
                if stop in command:
                    return
                # MONITOR shows the whole server: only this stack's databases count.
                if event["db"] in ours:
                    commands.append(command)

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    assert started.wait(5)
    celery_app = create_celery_app(stack.settings)
    try:
        with AppAttestClient(base_url, KEY) as client:
            challenge = client.create_challenge("registration").challenge
            body = Device(ca=ca).registration_body(challenge, now=_now())
            job_ids = [client.submit_attestation(body)]
            assert client.wait(job_ids[0], timeout=20).ok
            challenge = client.create_challenge("registration").challenge
        queue = QueueClient(celery_app)
        job_ids.append(queue.submit(Device(ca=ca).registration_body(challenge, now=_now())))
        assert queue.result(job_ids[1], timeout=20).ok
    finally:
        celery_app.close()
        echo = redis.Redis.from_url(REDIS_URL)
        echo.echo(stop)
        echo.close()
        thread.join(5)
        monitored.close()
    # Jobs travel in batches (their ids name no batch to an outsider): verdicts are read by
    # polling the batches' results, never through a result subscription.
    polls = [c for c in commands if "celery-task-meta-batch-" in c]
    assert any(c.startswith(("GET ", "MGET ")) for c in polls)
    assert not [c for c in commands if c.upper().startswith(("PSUBSCRIBE", "SSUBSCRIBE"))]
    subscribed = [c.split()[1:] for c in commands if c.upper().startswith("SUBSCRIBE ")]
    unsubscribed = {
        ch for c in commands if c.upper().startswith("UNSUBSCRIBE ") for ch in c.split()[1:]
    }
    assert subscribed and all(
        ch.startswith("celery-task-meta-batch-") and ch in unsubscribed
        for channels in subscribed
        for ch in channels
    ), (subscribed, unsubscribed)


class _LosesFirstAnswer(httpx.HTTPTransport):
    """Sends every request, but loses the answer to the first submission: the server
    accepted it, the client saw a network error (the case a blind retry turns into two
    jobs)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path != "/v1/challenges" and not self.lost:
            response.read()
            response.close()
            self.lost.append(request.headers.get("Idempotency-Key", ""))
            raise httpx.ReadError("connection reset after the request was sent")
        return response


def test_the_client_retries_a_lost_answer_with_the_same_idempotency_key(
    stack: Stack, base_url: str, ca: TestCA
) -> None:
    """The answer to a submission is lost after the server accepted it: the client sends it
    again with the same Idempotency-Key and gets the first job back; one job, one verdict,
    no challenge_used. The same for a bulk submission."""
    transport = _LosesFirstAnswer()
    with AppAttestClient(base_url, KEY, transport=transport) as client:
        device = Device(ca=ca)
        body = device.registration_body(
            client.create_challenge("registration").challenge, now=_now()
        )
        job_id = client.submit_attestation(body)
        assert transport.lost and transport.lost[0]
        result = client.wait(job_id, timeout=20)
        assert result.ok, result
        engine = create_store_engine(stack.settings.store_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(Verdict.job_id).where(Verdict.key_id == device.key_id_b64)
                ).all()
        finally:
            engine.dispose()
        assert [row.job_id for row in rows] == [job_id]

    transport = _LosesFirstAnswer()
    with AppAttestClient(base_url, KEY, transport=transport) as client:
        devices = [Device(ca=ca) for _ in range(3)]
        jobs = [
            (
                "attestation",
                d.registration_body(client.create_challenge("registration").challenge, now=_now()),
            )
            for d in devices
        ]
        entries = client.submit_many(jobs)  # type: ignore[arg-type]
        assert transport.lost
        verdicts = client.wait_many([e.job_id for e in entries if e.job_id], timeout=30)
        assert len(verdicts) == 3 and all(v.ok for v in verdicts.values())

    # Without retries the lost answer is the caller's error to see.
    with AppAttestClient(base_url, KEY, transport=_LosesFirstAnswer(), retries=0) as client:
        body = Device(ca=ca).registration_body(
            client.create_challenge("registration").challenge, now=_now()
        )
        with pytest.raises(httpx.ReadError):
            client.submit_attestation(body)
