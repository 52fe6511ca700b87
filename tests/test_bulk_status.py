"""Collecting many verdicts at once: ``POST /v1/jobs/status`` and the clients' ``wait_many``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from producer import AppAttestClient, AsyncAppAttestClient, create_app
from producer.batching import new_batch_id, seal_job_id
from tests.factory import Device, TestCA
from tests.stack import Stack
from tests.test_producer_api import KEY, serve


@pytest.fixture(scope="module")
def base_url(stack: Stack) -> Iterator[str]:
    settings = stack.settings.model_copy(update={"api_keys": [SecretStr(KEY)]})
    with serve(create_app(settings)) as url:
        yield url


def test_wait_many_collects_a_bulk_submission(base_url: str, ca: TestCA) -> None:
    with AppAttestClient(base_url, KEY) as client:
        devices = [Device(ca=ca) for _ in range(30)]
        jobs = []
        for device in devices:
            challenge = client.create_challenge("registration").challenge
            jobs.append(("attestation", device.registration_body(challenge, now=datetime.now(UTC))))
        jobs.append(
            ("attestation", devices[0].registration_body("never issued", now=datetime.now(UTC)))
        )
        entries = client.submit_many(jobs)  # type: ignore[arg-type]
        job_ids = [entry.job_id for entry in entries if entry.job_id]
        assert len(job_ids) == 31
        verdicts = client.wait_many(job_ids, timeout=60)
        assert set(verdicts) == set(job_ids)
        assert [verdicts[j].ok for j in job_ids] == [True] * 30 + [False]
        assert verdicts[job_ids[-1]].reason == "challenge_unknown"
        assert [verdicts[j].key_id for j in job_ids[:30]] == [d.key_id_b64 for d in devices]


def test_status_endpoint_reports_pending_and_refuses_bad_input(base_url: str) -> None:
    unknown = str(uuid.uuid4())
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        response = http.post("/v1/jobs/status", json={"jobIds": [unknown]})
        assert response.status_code == 200
        [status] = response.json()["jobs"]
        assert status["jobId"] == unknown and status["status"] == "not_found"
        assert status["result"] is None and status["error"]["code"] == "job_not_found"
        for body in ({"jobIds": []}, {"jobIds": ["not-a-uuid"]}, {"ids": [unknown]}, [1]):
            refused = http.post("/v1/jobs/status", json=body)
            assert refused.status_code == 422, body
            assert refused.json()["error"]["code"] == "invalid_request"
        too_many = http.post("/v1/jobs/status", json={"jobIds": [unknown] * 1001})
        assert too_many.status_code == 413
        assert (
            httpx.post(f"{base_url}/v1/jobs/status", json={"jobIds": [unknown]}).status_code == 401
        )


def test_async_wait_many(base_url: str, ca: TestCA) -> None:
    async def scenario() -> None:
        async with AsyncAppAttestClient(base_url, KEY) as client:
            device = Device(ca=ca)
            challenge = (await client.create_challenge("registration")).challenge
            entries = await client.submit_many(
                [("attestation", device.registration_body(challenge, now=datetime.now(UTC)))]
            )
            job_id = entries[0].job_id
            assert job_id is not None
            verdicts = await client.wait_many([job_id], timeout=30)
            assert verdicts[job_id].ok and verdicts[job_id].counter == 0

    asyncio.run(scenario())


def test_waiting_requests_share_one_watcher(stack: Stack, ca: TestCA) -> None:
    """Fifty requests waiting at once on one event loop are served by one watcher: its first
    read of the result backend covers every job awaited (not one read per waiter), no read
    covers a job already answered, every waiter gets its own verdict, a waiter whose time
    runs out gets "pending" and leaves no trace, and a backend that cannot be reached fails
    the waiters with QueueUnavailable."""
    from producer.errors import QueueUnavailable
    from producer.jobs import JobQueue, check_request
    from tests.test_faults import issue, sessions_for
    from worker.queue.app import create_celery_app

    app = create_celery_app(stack.settings)
    queue = JobQueue(app)
    reads: list[list[str]] = []
    answered: set[str] = set()
    real_statuses = queue.statuses_of

    def counting_statuses(wanted: list[Any], *, consult_store: bool = True) -> list[object]:
        job_ids = [job_id for _, job_id in wanted]
        assert answered.isdisjoint(job_ids)
        reads.append(job_ids)
        found = real_statuses(wanted, consult_store=consult_store)
        answered.update(s.job_id for s in found if s.final)
        return found  # type: ignore[return-value]

    queue.statuses_of = counting_statuses  # type: ignore[method-assign, assignment]
    try:
        with sessions_for(stack.settings.store_url) as sessions:
            devices = [Device(ca=ca) for _ in range(50)]
            challenges = issue(sessions, "registration", [None] * 50)
        job_ids = [
            queue.submit(check_request(d.registration_body(c, now=datetime.now(UTC))))
            for d, c in zip(devices, challenges, strict=True)
        ]

        async def wait_all() -> list[object]:
            return list(await asyncio.gather(*(queue.wait_async(job_id, 60) for job_id in job_ids)))

        statuses = asyncio.run(wait_all())
        assert [s.result.key_id for s in statuses] == [d.key_id_b64 for d in devices]  # type: ignore[attr-defined]
        assert all(s.result.ok for s in statuses)  # type: ignore[attr-defined]
        # The first read covers all 50 jobs (not one waiter's), and no read a job answered.
        assert sorted(reads[0]) == sorted(job_ids)

        # An id of this queue's own that no worker has (its batch was never sent) stays
        # pending until the wait ends; an id it never gave out is not_found at once.
        unsent = seal_job_id(queue.owner, new_batch_id(), 0)
        [late] = asyncio.run(queue.wait_many_async([unsent], 0.2))
        assert late.status == "pending" and late.job_id == unsent
        [unknown] = asyncio.run(queue.wait_many_async([str(uuid.uuid4())], 10))
        assert unknown.status == "not_found"
        assert all(not w._waiters for w in queue._watchers.values())
    finally:
        app.close()

    down = stack.settings.model_copy(update={"result_backend": "redis://127.0.0.1:1/0"})
    dead_app = create_celery_app(down)
    dead_queue = JobQueue(dead_app, ledger=None)

    async def wait_dead() -> list[BaseException | object]:
        return list(
            await asyncio.gather(
                *(
                    dead_queue.wait_async(seal_job_id(dead_queue.owner, new_batch_id(), 0), 5)
                    for _ in range(3)
                ),
                return_exceptions=True,
            )
        )

    try:
        outcomes = asyncio.run(wait_dead())
    finally:
        dead_app.close()
    assert all(isinstance(o, QueueUnavailable) for o in outcomes), outcomes
