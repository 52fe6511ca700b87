"""Hardening: no job lost under faults, no wrong verdict under hostile input, no race between
workers. Everything runs against real servers and real ``appattest worker`` processes.

Fault tests start their own Redis and PostgreSQL (``tests/faults.py``) on spare ports of
127.0.0.1 and stop, crash and restart them, and SIGKILL workers; of the shared servers they only
use databases of their own. Each fault test prints one line
``fault=<name> sent=N verdicts=M wrong=W lost=L`` (``pytest -s`` shows it): N jobs were
accepted, M of them got a verdict in time, W verdicts differ from the expected one and L jobs
never got one.

The few deliberate waits are for time that the system itself waits (the broker's visibility
timeout, an outage that must last); everything else polls with a deadline.

Kombu's Redis transport takes a message off the queue (``BRPOP``) and only then, in a second
command, records it as unacknowledged; a Redis that dies between the two loses that message.
The ledger (``worker.queue.ledger``) closes that gap, and ``test_redis_crash_mid_burst`` requires
every accepted job to get its right verdict.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from celery import states
from cryptography.hazmat.primitives.asymmetric import ec
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel, SecretStr
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import State

from producer import create_app
from producer.batching import Owner, new_batch_id, open_job_id, seal_job_id
from producer.jobs import JobQueue, check_request
from producer.ratelimit import RateLimiter, retry_after_seconds
from producer.routes import api_routes
from tests.factory import APP_ID, Device, TestCA
from tests.faults import (
    PostgresServer,
    RedisServer,
    ServerUnavailable,
    postgres_server,
    redis_server,
    serve_app,
)
from tests.stack import Stack, service_stack
from tests.stack import key_owner as stack_key_owner
from worker.contract import PluginRequest
from worker.queue.app import create_celery_app
from worker.queue.messaging import QUEUE, VERIFY_BATCH_TASK, VERIFY_TASK, decode, publish
from worker.settings import Settings
from worker.store.challenges import Purpose, new_challenge, store_challenges
from worker.store.db import create_store_engine, session_factory
from worker.store.models import DeviceKey, Verdict

# Fault tests take tens of seconds each: a generous bound per test, well below pytest's default.
pytestmark = pytest.mark.timeout(240)

T = TypeVar("T")

# The broker hands a delivered but unacknowledged message to another worker after this long.
VISIBILITY_TIMEOUT = 3
KEY = f"fault-key-{secrets.token_urlsafe(16)}"
AUTH = {"Authorization": f"Bearer {KEY}"}


# Servers and stacks ---------------------------------------------------------------------------


def _enter(cleanup: ExitStack, manager: AbstractContextManager[T]) -> T:
    """Enter a server's context; skip the test when the server cannot run here (fail in CI)."""
    try:
        return cleanup.enter_context(manager)
    except ServerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (required under CI)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this module's own, which tests may stop and start. It records
    commit timestamps, so that tests can order transactions as they committed."""
    with ExitStack() as cleanup:
        yield _enter(cleanup, postgres_server(settings={"track_commit_timestamp": "on"}))


@pytest.fixture
def private_db(private_pg: PostgresServer) -> Iterator[str]:
    """A fresh database on the private cluster; the cluster is running again afterwards."""
    url = private_pg.create_database(f"faults_{uuid.uuid4().hex[:12]}")
    try:
        yield url
    finally:
        if not private_pg.running:
            private_pg.start()


@contextmanager
def fault_stack(
    ca: TestCA, workdir: Path, *, store_url: str, redis: RedisServer, env: dict[str, str]
) -> Iterator[Stack]:
    """A service stack on a private Redis (broker in database 0, results in 1)."""
    with service_stack(
        store_url=store_url,
        root_pem=ca.root_pem,
        workdir=workdir,
        app_ids=APP_ID,
        broker_url=redis.url(0),
        result_backend=redis.url(1),
        extra_env=env,
    ) as stack:
        yield stack


def enter_stack(
    cleanup: ExitStack, ca: TestCA, store_url: str, workdir: Path, **options: Any
) -> Stack:
    """A service stack for ``APP_ID`` on this store, stopped with ``cleanup``; ``options`` go
    to ``service_stack`` (broker and backend URLs, extra environment)."""
    return cleanup.enter_context(
        service_stack(
            store_url=store_url, root_pem=ca.root_pem, workdir=workdir, app_ids=APP_ID, **options
        )
    )


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


def producer_settings(settings: Settings, *keys: str, **update: Any) -> Settings:
    return settings.model_copy(
        update={"api_keys": [SecretStr(k) for k in keys or (KEY,)], **update}
    )


@contextmanager
def http_api(
    settings: Settings, *, key: str = KEY, verbose: bool = False, **app_options: Any
) -> Iterator[httpx.Client]:
    """The producer for ``settings`` in a real server, and a client holding ``key``."""
    app = create_app(settings, **app_options)
    with (
        serve_app(app, log_level="debug" if verbose else "warning", access_log=verbose) as url,
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client,
    ):
        yield client


# Jobs and verdicts ------------------------------------------------------------------------------


def now() -> datetime:
    return datetime.now(UTC)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def issue(sessions: sessionmaker[Session], purpose: str, key_ids: list[str | None]) -> list[str]:
    """One fresh challenge per entry of ``key_ids`` (bound to that key, or to none)."""
    issued = [
        new_challenge(purpose=Purpose(purpose), key_id=key_id, ttl=timedelta(minutes=10), now=now())
        for key_id in key_ids
    ]
    with sessions() as session, session.begin():
        store_challenges(session, issued)
    return [i.challenge for i in issued]


def issue_http(api: httpx.Client, purpose: str) -> str:
    response = api.post("/v1/challenges", json={"purpose": purpose})
    assert response.status_code == 201, response.text
    return str(response.json()["challenge"])


@dataclass(frozen=True)
class Expected:
    """The verdict a job must get: accepted with its counter, or refused for ``reason``."""

    kind: str
    key_id: str
    counter: int | None
    reason: str | None = None

    def matches(self, result: dict[str, Any]) -> bool:
        if self.reason is not None:
            return bool(
                not result["ok"]
                and result["reason"] == self.reason
                and result["keyId"] == self.key_id
            )
        return bool(
            result["ok"]
            and result["kind"] == self.kind
            and result["keyId"] == self.key_id
            and result["counter"] == self.counter
        )


def registration(device: Device, challenge: str) -> tuple[PluginRequest, Expected]:
    body = device.registration_body(challenge, now=now())
    return check_request(body), Expected("registration", device.key_id_b64, 0)


def assertion(device: Device, challenge: str) -> tuple[PluginRequest, Expected]:
    body = device.assertion_body(challenge)
    return check_request(body), Expected("assertion", device.key_id_b64, device.counter)


def collect(
    status: Callable[[str], dict[str, Any] | None],
    job_ids: list[str],
    timeout: float,
    *,
    idle: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Poll every job until it has a verdict, the deadline passed, or (with ``idle``) no new
    verdict came in for that long; return the verdicts."""
    results: dict[str, dict[str, Any]] = {}
    pending = list(job_ids)
    deadline = time.monotonic() + timeout
    progress = time.monotonic()
    while pending and time.monotonic() < deadline:
        if idle is not None and time.monotonic() - progress > idle:
            break
        for job_id in pending:
            result = status(job_id)
            if result is not None:
                results[job_id] = result
                progress = time.monotonic()
        pending = [job_id for job_id in pending if job_id not in results]
        if pending:
            time.sleep(0.1)
    return results


def queue_status(queue: JobQueue) -> Callable[[str], dict[str, Any] | None]:
    def status(job_id: str) -> dict[str, Any] | None:
        job = queue.status(job_id)
        return job.result.to_json_dict() if job.done and job.result is not None else None

    return status


def http_status(api: httpx.Client) -> Callable[[str], dict[str, Any] | None]:
    def status(job_id: str) -> dict[str, Any] | None:
        response = api.get(f"/v1/jobs/{job_id}")
        if response.status_code != 200 or response.json()["status"] != "done":
            return None
        return dict(response.json()["result"])

    return status


def submit_http(api: httpx.Client, path: str, body: dict[str, Any]) -> str:
    response = api.post(path, json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["jobId"])


def register_devices(
    ca: TestCA, queue: JobQueue, sessions: sessionmaker[Session], count: int
) -> list[Device]:
    devices = [Device(ca=ca) for _ in range(count)]
    challenges = issue(sessions, "registration", [None] * count)
    job_ids = queue.submit_many(
        [registration(d, c)[0] for d, c in zip(devices, challenges, strict=True)]
    )
    results = collect(queue_status(queue), job_ids, 60)
    assert len(results) == count and all(r["ok"] for r in results.values())
    return devices


def verdict_rows(sessions: sessionmaker[Session], job_ids: list[str]) -> dict[str, Verdict]:
    with sessions() as session:
        rows = session.scalars(select(Verdict).where(Verdict.job_id.in_(job_ids))).all()
    return {row.job_id: row for row in rows}


def verdict_count(sessions: sessionmaker[Session], job_ids: list[str]) -> int:
    return len(verdict_rows(sessions, job_ids))


def stored_counter(sessions: sessionmaker[Session], key_id: str) -> int:
    with sessions() as session:
        key = session.get(DeviceKey, key_id)
        assert key is not None
        return key.counter


def report(fault: str, sent: int, verdicts: int, wrong: int) -> None:
    print(f"\nfault={fault} sent={sent} verdicts={verdicts} wrong={wrong} lost={sent - verdicts}")


def worker_log(stack: Stack, name: str) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in stack.workdir.glob(f"worker-{name}*.log")
    )


_RECEIVED = re.compile(r"Task appattest\.verify(?:_batch)?\[([0-9a-z-]+)\] received")
_SUCCEEDED = re.compile(r"Task appattest\.verify(?:_batch)?\[([0-9a-z-]+)\] succeeded")


def key_owner(key: str = KEY) -> Owner:
    """The owner whose seal the API puts on the job ids of ``key``'s jobs."""
    return stack_key_owner(key)


def task_of(job_id: str, owner: Owner) -> str:
    """The id of the task (message) that carries a job: its batch's, or its own."""
    located = open_job_id(owner, job_id)
    return job_id if located is None else located[0]


def new_batch(owner: Owner, size: int) -> tuple[str, list[str]]:
    """A batch id and the ids of its jobs, sealed for ``owner``."""
    batch_id = new_batch_id()
    return batch_id, [seal_job_id(owner, batch_id, i) for i in range(size)]


def task_status(queue: JobQueue) -> Callable[[str], dict[str, Any] | None]:
    """The verdict of a task sent on its own (a job id that is its own task id)."""

    def status(job_id: str) -> dict[str, Any] | None:
        meta = queue.celery_app.backend.get_task_meta(job_id, cache=False)
        return dict(meta["result"]) if meta.get("status") == states.SUCCESS else None

    return status


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert isinstance(response.json()["error"]["detail"], str)


# 1. Delivery: a worker killed mid-burst -------------------------------------------------------


def test_sigkill_of_a_worker_mid_burst_loses_no_job(
    ca: TestCA, pg_url: str, tmp_path: Path
) -> None:
    """300 valid jobs (150 registrations, 150 first assertions of known keys) and 20 hostile
    ones (forged assertions, registrations of known keys), shuffled and sent as batch messages
    of ten and as single-job messages in turn; one of two workers is killed with its whole
    process group while they run. Every job ends with exactly one verdict, the right one:
    redelivered jobs return what their first attempt decided instead of challenge_used or
    counter_replay, and no hostile job is accepted."""
    with ExitStack() as cleanup:
        broker = _enter(cleanup, redis_server())
        stack = cleanup.enter_context(
            fault_stack(
                ca,
                tmp_path,
                store_url=pg_url,
                redis=broker,
                env={"APPATTEST_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT)},
            )
        )
        victim = stack.start_worker(name="victim")
        stack.start_worker(name="survivor")
        queue = cleanup.enter_context(job_queue(stack.settings, max_batch=10))
        sessions = cleanup.enter_context(sessions_for(pg_url))

        known = register_devices(ca, queue, sessions, 150)
        fresh = [Device(ca=ca) for _ in range(150)]
        burst = [
            registration(device, challenge)
            for device, challenge in zip(
                fresh, issue(sessions, "registration", [None] * len(fresh)), strict=True
            )
        ] + [
            assertion(device, challenge)
            for device, challenge in zip(
                known, issue(sessions, "assertion", [d.key_id_b64 for d in known]), strict=True
            )
        ]
        forger = ec.generate_private_key(ec.SECP256R1())
        burst += [
            (
                check_request(device.assertion_body(challenge, signing_key=forger)),
                Expected("assertion", device.key_id_b64, None, "signature_invalid"),
            )
            for device, challenge in zip(
                known[:10], issue(sessions, "assertion", [None] * 10), strict=True
            )
        ] + [
            (
                check_request(device.registration_body(challenge, now=now())),
                Expected("registration", device.key_id_b64, None, "key_already_registered"),
            )
            for device, challenge in zip(
                known[10:20], issue(sessions, "registration", [None] * 10), strict=True
            )
        ]
        random.Random(1).shuffle(burst)
        job_ids: list[str] = []
        for start in range(0, len(burst), 10):
            chunk = [request for request, _ in burst[start : start + 10]]
            if start % 20:
                job_ids += [queue.submit_one(request) for request in chunk]
            else:
                job_ids += queue.submit_many(chunk)
        expected = dict(zip(job_ids, (e for _, e in burst), strict=True))

        wait_until(
            lambda: verdict_count(sessions, job_ids) >= len(job_ids) // 5, 60, "a fifth decided"
        )
        in_flight = kill_holding_a_job(stack, victim, "victim")
        killed_at = time.monotonic()
        victim.wait(timeout=10)
        decided_at_kill = verdict_count(sessions, job_ids)
        # What the killed worker held stays unacknowledged in the broker; it becomes visible
        # again once the visibility timeout passed. The replacement worker sweeps the broker
        # for such messages as it starts, so it starts after that instant.
        time.sleep(max(0.0, killed_at + VISIBILITY_TIMEOUT + 0.5 - time.monotonic()))
        stack.start_worker(name="replacement")

        results = collect(queue_status(queue), job_ids, 90)
        wrong = [j for j, r in results.items() if not expected[j].matches(r)]
        report("sigkill", len(job_ids), len(results), len(wrong))

        assert 0 < decided_at_kill < len(job_ids), "the kill did not land mid-burst"
        assert in_flight <= {task_of(j, queue.owner) for j in job_ids}
        # What the killed worker held was delivered again, to another worker.
        others = worker_log(stack, "survivor") + worker_log(stack, "replacement")
        assert in_flight <= set(_RECEIVED.findall(others))
        assert not wrong, Counter(results[j]["reason"] for j in wrong)
        assert len(results) == len(job_ids)
        # Exactly one recorded verdict per job, and it is the one the job reports.
        rows = verdict_rows(sessions, job_ids)
        assert set(rows) == set(job_ids)
        assert all(rows[j].result == results[j] for j in job_ids)


def kill_holding_a_job(stack: Stack, worker: subprocess.Popen[bytes], name: str) -> set[str]:
    """SIGKILL a worker's whole process group at a moment it holds a job it received but did
    not finish; return the ids of the tasks it held.

    The group is frozen (SIGSTOP) while its log is read, so what the log shows is what the
    worker holds when the SIGKILL lands; a worker caught between two jobs is let go on
    (SIGCONT) and caught again a moment later.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        os.killpg(worker.pid, signal.SIGSTOP)
        log = worker_log(stack, name)
        held = set(_RECEIVED.findall(log)) - set(_SUCCEEDED.findall(log))
        if held:
            os.killpg(worker.pid, signal.SIGKILL)
            return held
        os.killpg(worker.pid, signal.SIGCONT)
        time.sleep(0.003)
    raise AssertionError("the worker never held a job while the burst ran")


def _send(queue: JobQueue, task: str, task_id: str, argument: dict[str, Any]) -> None:
    """Put a message on the queue under a chosen task id, as a redelivery of the broker would
    (built and published as the producer publishes, without a ledger entry)."""
    publish(queue.celery_app, task_id, decode(task, argument), ledger=None)


def _send_job(queue: JobQueue, job_id: str, body: dict[str, Any]) -> None:
    _send(queue, VERIFY_TASK, job_id, {"body": body})


def _wait_job(queue: JobQueue, job_id: str) -> dict[str, Any]:
    results = collect(task_status(queue), [job_id], 30)
    assert job_id in results, f"job {job_id} got no verdict"
    return results[job_id]


def test_a_redelivered_job_returns_its_first_verdict(stack: Stack, ca: TestCA) -> None:
    """A job run again after its first attempt committed (its result never reached the
    backend, as when the worker dies before acknowledging) returns that first verdict: no
    challenge_used, and the counter does not move twice."""
    with job_queue(stack.settings) as queue, sessions_for(stack.settings.store_url) as sessions:
        device = Device(ca=ca)
        [challenge] = issue(sessions, "registration", [None])
        body = device.registration_body(challenge, now=now())
        job_id = str(uuid.uuid4())
        _send_job(queue, job_id, body)
        first = _wait_job(queue, job_id)
        assert first["ok"] and first["counter"] == 0

        queue.celery_app.backend.forget(job_id)
        _send_job(queue, job_id, body)
        assert _wait_job(queue, job_id) == first
        # The same body under another job id is another request: its challenge is used.
        other = str(uuid.uuid4())
        _send_job(queue, other, body)
        assert _wait_job(queue, other)["reason"] == "challenge_used"

        [challenge] = issue(sessions, "assertion", [device.key_id_b64])
        body = device.assertion_body(challenge)
        job_id = str(uuid.uuid4())
        _send_job(queue, job_id, body)
        first = _wait_job(queue, job_id)
        assert first["ok"] and first["counter"] == 1
        queue.celery_app.backend.forget(job_id)
        _send_job(queue, job_id, body)
        assert _wait_job(queue, job_id) == first
        assert stored_counter(sessions, device.key_id_b64) == 1

        # Two deliveries of one job at once, as after a visibility timeout: one verdict.
        [challenge] = issue(sessions, "assertion", [device.key_id_b64])
        body = device.assertion_body(challenge)
        job_id = str(uuid.uuid4())
        _send_job(queue, job_id, body)
        _send_job(queue, job_id, body)
        result = _wait_job(queue, job_id)
        assert result["ok"] and result["counter"] == 2
        # Both deliveries have run once the second delivery is no longer queued or running.
        wait_until(
            lambda: worker_log(stack, "").count(f"[{job_id}] succeeded") == 2, 30, "both ran"
        )
        assert _wait_job(queue, job_id) == result
        assert set(verdict_rows(sessions, [job_id])) == {job_id}
        assert stored_counter(sessions, device.key_id_b64) == 2

        # A batch message delivered again: every job of it returns its first verdict.
        devices = [Device(ca=ca) for _ in range(3)]
        challenges = issue(sessions, "registration", [None] * 3)
        bodies = [
            d.registration_body(c, now=now()) for d, c in zip(devices, challenges, strict=True)
        ]
        [challenge] = issue(sessions, "assertion", [device.key_id_b64])
        bodies.append(device.assertion_body(challenge))
        batch_id, job_ids = new_batch(queue.owner, len(bodies))
        batch = {"jobs": [{"jobId": j, "body": b} for j, b in zip(job_ids, bodies, strict=True)]}
        _send(queue, VERIFY_BATCH_TASK, batch_id, batch)
        first_results = collect(queue_status(queue), job_ids, 30)
        assert len(first_results) == 4 and all(r["ok"] for r in first_results.values())
        queue.celery_app.backend.forget(batch_id)
        _send(queue, VERIFY_BATCH_TASK, batch_id, batch)
        assert collect(queue_status(queue), job_ids, 30) == first_results
        assert stored_counter(sessions, device.key_id_b64) == 3


# Celery's Redis result backend writes with a command redis-py 8 calls deprecated.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_the_ledger_resends_only_jobs_neither_queued_nor_held_nor_finished(
    ca: TestCA, pg_url: str, tmp_path: Path
) -> None:
    """The ledger's sweep (no worker runs here, the test plays the broker's part): a queued
    job, even the oldest, is never sent again; one taken off the queue and held by a worker
    (in the broker's unacknowledged hash) neither; one whose result is stored leaves the ledger;
    one taken off the queue and then lost is published again, under its job id, once."""
    with ExitStack() as cleanup:
        stack = enter_stack(cleanup, ca, pg_url, tmp_path)
        queue = cleanup.enter_context(job_queue(stack.settings))
        ledger = queue.ledger
        assert ledger is not None
        broker = ledger.client
        job_ids = [
            task_of(queue.submit_one(registration(Device(ca=ca), f"challenge-{n}")[0]), queue.owner)
            for n in range(3)
        ]
        assert ledger.pending() == 3 and broker.llen(QUEUE) == 3
        app = queue.celery_app

        # A backlog, however old, is left alone: every job in it is still queued.
        assert ledger.sweep(app, resend_after=0).resent == []
        assert broker.llen(QUEUE) == 3

        # The oldest message vanishes between the queue and the worker: sent again, once.
        lost_message = broker.rpop(QUEUE)
        assert lost_message is not None and job_ids[0].encode() in lost_message
        assert ledger.sweep(app, resend_after=0).resent == [job_ids[0]]
        assert broker.llen(QUEUE) == 3
        assert job_ids[0].encode() in broker.lindex(QUEUE, 0)  # type: ignore[operator]
        assert ledger.sweep(app, resend_after=60).resent == []  # re-dated by the resend

        # The next one is held by a worker: not sent again.
        held = broker.rpop(QUEUE)
        assert held is not None and job_ids[1].encode() in held
        broker.hset("unacked", "tag-1", json.dumps([json.loads(held), "", QUEUE]))
        assert ledger.sweep(app, resend_after=0).resent == []

        # A job with a stored result leaves the ledger.
        app.backend.store_result(job_ids[2], {"ok": True}, states.SUCCESS)
        report_ = ledger.sweep(app, resend_after=0)
        assert report_.finished == 1 and report_.resent == []
        assert ledger.pending() == 2


def test_a_job_whose_message_was_lost_still_gets_its_verdict(
    ca: TestCA, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs entered in the ledger whose messages never reached the queue (as when Redis dies
    with the message taken off the queue but not yet held) are published again by a worker's
    sweeper and decided, a single job and a batch alike; so is a job whose publish failed
    after its ledger entry was written (accepted, not refused: it may have been queued). The
    ledger empties as results are stored."""
    env = {"APPATTEST_LEDGER_SWEEP_SECONDS": "0.5", "APPATTEST_LEDGER_RESEND_SECONDS": "1"}
    with ExitStack() as cleanup:
        stack = enter_stack(cleanup, ca, pg_url, tmp_path, extra_env=env)
        stack.start_worker(name="a")
        sessions = cleanup.enter_context(sessions_for(pg_url))
        queue = cleanup.enter_context(job_queue(stack.settings))
        assert queue.ledger is not None
        devices = [Device(ca=ca) for _ in range(5)]
        challenges = issue(sessions, "registration", [None] * 5)
        bodies = [
            d.registration_body(c, now=now()) for d, c in zip(devices, challenges, strict=True)
        ]
        single = str(uuid.uuid4())
        batch_id, batch_jobs = new_batch(queue.owner, 3)
        queue.ledger.record(
            [
                (single, VERIFY_TASK, {"body": bodies[0]}),
                (
                    batch_id,
                    VERIFY_BATCH_TASK,
                    {
                        "jobs": [
                            {"jobId": j, "body": b}
                            for j, b in zip(batch_jobs, bodies[1:4], strict=True)
                        ]
                    },
                ),
            ]
        )

        def broker_refuses(*args: Any, **kwargs: Any) -> None:
            raise KombuOperationalError("connection reset")

        monkeypatch.setattr(queue.celery_app.amqp, "send_task_message", broker_refuses)
        unpublished = queue.submit_one(check_request(bodies[4]))
        monkeypatch.undo()
        results = collect(task_status(queue), [single], 60)
        results |= collect(queue_status(queue), [*batch_jobs, unpublished], 60)
        assert len(results) == 5
        assert all(r["ok"] and r["kind"] == "registration" for r in results.values())
        assert {r["keyId"] for r in results.values()} == {d.key_id_b64 for d in devices}
        wait_until(lambda: queue.ledger.pending() == 0, 30, "ledger emptied")  # type: ignore[union-attr]
        assert "published again" in worker_log(stack, "")


# 2. Server faults ---------------------------------------------------------------------------


def test_redis_crash_mid_burst(ca: TestCA, pg_url: str, tmp_path: Path) -> None:
    """Redis crashes (SIGKILL) while the workers work through a burst and comes back on the
    same port. While it is down the producer answers 503 and is not ready; afterwards it
    recovers, and every job it accepted (202) before and after the crash gets its verdict, none
    of them a false accept or a false reject, none lost.

    A Redis that keeps no files loses its whole queue when it restarts. This one keeps an
    append-only file fsynced on every write (``appendonly yes``, ``appendfsync always``), and
    what follows holds only for a Redis configured that way. A message a worker took off the
    queue as Redis died, before the broker recorded it as held, comes back through the ledger
    (``worker.queue.ledger``); the log says how many did."""
    with ExitStack() as cleanup:
        server = _enter(cleanup, redis_server(persistent=True))
        stack = cleanup.enter_context(
            fault_stack(
                ca,
                tmp_path,
                store_url=pg_url,
                redis=server,
                env={
                    "APPATTEST_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT),
                    "APPATTEST_LEDGER_SWEEP_SECONDS": "1",
                    "APPATTEST_LEDGER_RESEND_SECONDS": "5",
                },
            )
        )
        workers = [stack.start_worker(name="a"), stack.start_worker(name="b")]
        sessions = cleanup.enter_context(sessions_for(pg_url))
        api = cleanup.enter_context(http_api(producer_settings(stack.settings)))

        devices = [Device(ca=ca) for _ in range(260)]
        bodies = [d.registration_body(issue_http(api, "registration"), now=now()) for d in devices]
        expected: dict[str, Expected] = {}
        index_of: dict[str, int] = {}

        def submit(index: int) -> None:
            job_id = submit_http(api, "/v1/attestations", bodies[index])
            expected[job_id] = Expected("registration", devices[index].key_id_b64, 0)
            index_of[job_id] = index

        # The burst before the crash queues up behind paused workers, so that the crash lands
        # while most of it is still undecided however fast the workers are.
        before = 200
        for worker in workers:
            os.killpg(worker.pid, signal.SIGSTOP)
        try:
            for index in range(before):
                submit(index)
        finally:
            for worker in workers:
                os.killpg(worker.pid, signal.SIGCONT)
        wait_until(lambda: verdict_count(sessions, list(expected)) >= 5, 60, "first verdicts")
        server.stop(kill=True)
        crashed_at = time.monotonic()
        decided_at_crash = verdict_count(sessions, list(expected))

        refused = list(range(before, before + 3))
        for index in refused:
            response = api.post("/v1/attestations", json=bodies[index])
            assert_error(response, 503, "service_unavailable")
        assert_error(api.get(f"/v1/jobs/{next(iter(expected))}"), 503, "service_unavailable")
        readiness = api.get("/readyz")
        assert readiness.status_code == 503
        checks = readiness.json()["checks"]
        assert checks["broker"].startswith("error") and checks["backend"].startswith("error")
        assert checks["database"] == "ok"

        # Down for longer than the visibility timeout: what the workers held when Redis died
        # is due for redelivery by the time they reconnect (they sweep for it then).
        time.sleep(max(0.0, crashed_at + VISIBILITY_TIMEOUT + 1 - time.monotonic()))
        server.start()
        wait_until(lambda: api.get("/readyz").status_code == 200, 30, "ready again")
        # Refused jobs were not queued: the client sends them again, as the 503 tells it to.
        for index in [*refused, *range(before + len(refused), len(bodies))]:
            submit(index)

        # Once the workers are back, verdicts flow within seconds; a job that gets none for
        # 15 s gets none.
        results = collect(http_status(api), list(expected), 60, idle=15)
        wrong = [j for j, r in results.items() if not expected[j].matches(r)]
        lost = [j for j in expected if j not in results]
        report("redis-crash", len(expected), len(results), len(wrong))
        assert 0 < decided_at_crash < before, "the crash did not land mid-burst"

        resent = worker_log(stack, "").count("published again")
        print(
            f"redis-crash: {decided_at_crash} of {before} decided when Redis died; "
            f"{resent} lost message(s) published again from the ledger"
        )
        assert wrong == [] and lost == [], (wrong, lost)


def test_postgres_outage_mid_burst_is_retried_to_the_right_verdicts(
    ca: TestCA, private_pg: PostgresServer, private_db: str, tmp_path: Path
) -> None:
    """PostgreSQL stops (fast shutdown) for a few seconds while the workers work through a
    burst. Jobs keep being accepted (the queue does not need the database); challenges cannot
    be issued (503) and readiness reports the database. The workers retry with bounded
    backoff, and every job ends with the right verdict once the database is back."""
    outage = 4.0
    with ExitStack() as cleanup:
        server = _enter(cleanup, redis_server())
        stack = cleanup.enter_context(
            fault_stack(
                ca,
                tmp_path,
                store_url=private_db,
                redis=server,
                env={"APPATTEST_TASK_MAX_RETRIES": "10", "APPATTEST_TASK_RETRY_BACKOFF_MAX": "2"},
            )
        )
        stack.start_worker(name="a")
        stack.start_worker(name="b")
        sessions = cleanup.enter_context(sessions_for(private_db))
        api = cleanup.enter_context(http_api(producer_settings(stack.settings)))

        devices = [Device(ca=ca) for _ in range(100)]
        bodies = [d.registration_body(issue_http(api, "registration"), now=now()) for d in devices]
        expected: dict[str, Expected] = {}

        def submit(index: int) -> None:
            job_id = submit_http(api, "/v1/attestations", bodies[index])
            expected[job_id] = Expected("registration", devices[index].key_id_b64, 0)

        for index in range(50):
            submit(index)
        wait_until(lambda: verdict_count(sessions, list(expected)) >= 5, 60, "first verdicts")
        private_pg.stop(mode="fast")
        stopped_at = time.monotonic()

        assert_error(
            api.post("/v1/challenges", json={"purpose": "registration"}),
            503,
            "service_unavailable",
        )
        readiness = api.get("/readyz")
        assert readiness.status_code == 503
        assert readiness.json()["checks"]["database"].startswith("error")
        assert readiness.json()["checks"]["broker"] == "ok"
        for index in range(50, len(bodies)):
            submit(index)

        time.sleep(max(0.0, stopped_at + outage - time.monotonic()))
        private_pg.start()
        wait_until(lambda: api.get("/readyz").status_code == 200, 30, "ready again")

        results = collect(http_status(api), list(expected), 40)
        wrong = [j for j, r in results.items() if not expected[j].matches(r)]
        report("postgres-outage", len(expected), len(results), len(wrong))
        assert not wrong, Counter(results[j]["reason"] for j in wrong)
        assert len(results) == len(expected) == len(bodies)
        # The workers did retry, and never waited longer than the configured bound.
        delays = [
            int(d)
            for d in re.findall(
                r"retry \d+ in (\d+)s", worker_log(stack, "a") + worker_log(stack, "b")
            )
        ]
        assert delays and max(delays) <= 2


def test_postgres_down_beyond_the_retry_budget_ends_in_internal_error(
    ca: TestCA, private_pg: PostgresServer, private_db: str, tmp_path: Path
) -> None:
    """With the database down for longer than the workers retry, every job ends with
    internal_error, visible in its status; nothing was judged, so once the database is back
    the same bodies are accepted."""
    with ExitStack() as cleanup:
        server = _enter(cleanup, redis_server())
        stack = cleanup.enter_context(
            fault_stack(
                ca,
                tmp_path,
                store_url=private_db,
                redis=server,
                env={"APPATTEST_TASK_MAX_RETRIES": "1", "APPATTEST_TASK_RETRY_BACKOFF_MAX": "1"},
            )
        )
        stack.start_worker(name="a")
        api = cleanup.enter_context(http_api(producer_settings(stack.settings)))

        devices = [Device(ca=ca) for _ in range(10)]
        bodies = [d.registration_body(issue_http(api, "registration"), now=now()) for d in devices]
        private_pg.stop(mode="fast")
        job_ids = [submit_http(api, "/v1/attestations", body) for body in bodies]
        results = collect(http_status(api), job_ids, 60)
        wrong = [
            j
            for j, r in results.items()
            if r["ok"] or r["reason"] != "internal_error" or r["keyId"] is None
        ]
        report("postgres-beyond-retries", len(job_ids), len(results), len(wrong))
        assert not wrong and len(results) == len(job_ids)

        private_pg.start()
        again = [submit_http(api, "/v1/attestations", body) for body in bodies]
        results = collect(http_status(api), again, 60)
        assert len(results) == len(again) and all(r["ok"] for r in results.values())


# 4. Races between two worker processes ----------------------------------------------------


def test_races_between_two_workers(ca: TestCA, private_db: str, tmp_path: Path) -> None:
    """Assertions of one key with interleaved counters, one assertion replayed, and one
    challenge raced by several keys, across two worker processes (and, for the counters,
    within batch messages too)."""
    with ExitStack() as cleanup:
        server = _enter(cleanup, redis_server())
        stack = cleanup.enter_context(
            fault_stack(ca, tmp_path, store_url=private_db, redis=server, env={})
        )
        stack.start_worker(name="a")
        stack.start_worker(name="b")
        queue = cleanup.enter_context(job_queue(stack.settings, max_batch=5))
        sessions = cleanup.enter_context(sessions_for(private_db))
        status = queue_status(queue)

        # Counters 1..40 in a shuffled order, each with its own challenge, sent in turn as
        # five single-job messages and as one batch message of five.
        [device] = register_devices(ca, queue, sessions, 1)
        key_id = device.key_id_b64
        counters = list(range(1, 41))
        random.Random(7).shuffle(counters)
        challenges = issue(sessions, "assertion", [key_id] * len(counters))
        requests = [
            check_request(device.assertion_body(challenge, counter=counter))
            for challenge, counter in zip(challenges, counters, strict=True)
        ]
        samples: list[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                samples.append(stored_counter(sessions, key_id))
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, name="counter-watch")
        watcher.start()
        try:
            job_ids = []
            for start in range(0, len(requests), 5):
                chunk = requests[start : start + 5]
                if start % 10:
                    job_ids += queue.submit_many(chunk)
                else:
                    job_ids += [queue.submit_one(request) for request in chunk]
            results = collect(status, job_ids, 60)
        finally:
            done.set()
            watcher.join(timeout=10)
        counter_of = dict(zip(job_ids, counters, strict=True))
        assert len(results) == len(job_ids)
        assert {r["reason"] for r in results.values()} <= {None, "counter_replay"}
        accepted = {j for j, r in results.items() if r["ok"]}
        assert accepted
        # In the order the transactions committed (and, within a batch's transaction, in
        # batch order), exactly the jobs whose counter is above every counter accepted before
        # them are accepted.
        with sessions() as session:
            rows = session.execute(
                text(
                    "SELECT job_id, pg_xact_commit_timestamp(xmin), xmin::text::bigint "
                    "FROM verdicts WHERE job_id = ANY(:ids)"
                ),
                {"ids": job_ids},
            ).all()
        assert len(rows) == len(job_ids)
        committed = sorted(
            rows, key=lambda r: (r[1], r[2], (open_job_id(queue.owner, r[0]) or ("", 0))[1])
        )
        highest = 0
        for job_id, _, _ in committed:
            assert (job_id in accepted) == (counter_of[job_id] > highest), job_id
            if job_id in accepted:
                highest = counter_of[job_id]
        assert stored_counter(sessions, key_id) == highest == max(counter_of[j] for j in accepted)
        # The counter never went backwards, and only ever held accepted values.
        assert samples == sorted(samples)
        assert set(samples) <= {0} | {counter_of[j] for j in accepted}
        # Both workers took part in the race.
        for name in ("a", "b"):
            received = set(_RECEIVED.findall(worker_log(stack, name)))
            assert received & {task_of(j, queue.owner) for j in job_ids}, name

        # One assertion, replayed ten times at once: accepted once.
        [challenge] = issue(sessions, "assertion", [key_id])
        replayed = check_request(device.assertion_body(challenge, counter=highest + 1))
        job_ids = [queue.submit_one(replayed) for _ in range(10)]
        results = collect(status, job_ids, 60)
        assert len(results) == 10 and sum(r["ok"] for r in results.values()) == 1
        assert {r["reason"] for r in results.values() if not r["ok"]} <= {
            "challenge_used",
            "counter_replay",
        }
        assert stored_counter(sessions, key_id) == highest + 1

        # One assertion challenge, raced by eight keys: exactly one wins.
        racers = register_devices(ca, queue, sessions, 8)
        [challenge] = issue(sessions, "assertion", [None])
        job_ids = [queue.submit_one(assertion(d, challenge)[0]) for d in racers]
        results = collect(status, job_ids, 60)
        assert len(results) == 8
        assert sum(r["ok"] for r in results.values()) == 1
        assert Counter(r["reason"] for r in results.values() if not r["ok"]) == {
            "challenge_used": 7
        }


# 5. API security ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    assert [limiter.acquire("k") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("k") == pytest.approx(0.5)
    assert limiter.acquire("other") == 0  # every key has its own bucket
    clock.now += 0.5
    assert limiter.acquire("k") == 0
    assert limiter.acquire("k") > 0
    clock.now += 60  # refills up to the burst, not beyond
    assert [limiter.acquire("k") for _ in range(4)][-1] > 0
    # A request costing more than the burst waits for a full bucket, then leaves a debt.
    clock.now += 60
    assert limiter.acquire("k", cost=7) == 0
    assert limiter.acquire("k") == pytest.approx(2.5)
    clock.now += 2.5
    assert limiter.acquire("k") == 0
    assert [retry_after_seconds(w) for w in (0.01, 1.0, 1.2, 4.0)] == [1, 1, 2, 4]
    for rate, burst in ((0, 1), (-1, 1), (float("inf"), 1), (float("nan"), 1), (1, 0)):
        with pytest.raises(ValueError):
            RateLimiter(rate=rate, burst=burst)


def test_rate_limits_per_key_with_retry_after(stack: Stack) -> None:
    other = f"other-{secrets.token_urlsafe(8)}"
    settings = producer_settings(
        stack.settings, KEY, other, rate_limit_per_second=0.25, rate_limit_burst=3
    )
    with http_api(settings) as api:
        for _ in range(3):
            assert api.post("/v1/challenges", json={"purpose": "registration"}).status_code == 201
        for response in (
            api.post("/v1/challenges", json={"purpose": "registration"}),
            api.get(f"/v1/jobs/{uuid.uuid4()}"),
        ):
            assert_error(response, 429, "rate_limited")
            assert response.headers["Retry-After"].isdigit()
            assert 1 <= int(response.headers["Retry-After"]) <= 4
        # Another key has its own bucket; health is never limited; a wrong key is refused as
        # unauthenticated before any limit applies.
        response = api.post(
            "/v1/challenges",
            json={"purpose": "registration"},
            headers={"Authorization": f"Bearer {other}"},
        )
        assert response.status_code == 201
        for _ in range(5):
            assert api.get("/healthz").status_code == 200
            assert api.get("/readyz").status_code == 200
        response = api.get("/v1/jobs/x", headers={"Authorization": "Bearer wrong"})
        assert_error(response, 401, "unauthorized")

    # A batch costs one token per job.
    settings = producer_settings(stack.settings, rate_limit_per_second=0.01, rate_limit_burst=5)
    with http_api(settings) as api:
        response = api.post("/v1/jobs", json={"jobs": ["not a job"] * 4})
        assert response.status_code == 202, response.text
        assert api.post("/v1/challenges", json={"purpose": "assertion"}).status_code == 201
        assert_error(api.post("/v1/jobs", json={"jobs": ["x"]}), 429, "rate_limited")
    with http_api(settings) as api:
        response = api.post("/v1/jobs", json={"jobs": ["not a job"] * 6})
        assert response.status_code == 202, response.text
        response = api.post("/v1/challenges", json={"purpose": "assertion"})
        assert_error(response, 429, "rate_limited")
        assert int(response.headers["Retry-After"]) >= 100


def _texts(value: Any, depth: int = 0, seen: set[int] | None = None) -> Iterator[str]:
    """Every string and byte string reachable from the app's own state (its objects, the
    settings, containers; not into library objects such as the Celery app or the engine)."""
    seen = set() if seen is None else seen
    if depth > 10 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _texts(key, depth + 1, seen)
            yield from _texts(item, depth + 1, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _texts(item, depth + 1, seen)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _texts(getattr(value, name), depth + 1, seen)
    elif isinstance(value, State):
        yield from _texts(value._state, depth + 1, seen)
    elif type(value).__module__.startswith(("producer.", "worker.settings")):
        yield from _texts(vars(value), depth + 1, seen)


def test_api_keys_are_kept_only_as_hashes_and_compared_in_full(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"first-{secrets.token_urlsafe(12)}", KEY, f"third-{secrets.token_urlsafe(12)}"]
    app = create_app(producer_settings(stack.settings, *keys))
    with (
        serve_app(app) as url,
        httpx.Client(base_url=url, headers=AUTH, timeout=30) as api,
    ):
        assert api.post("/v1/challenges", json={"purpose": "registration"}).status_code == 201
        held = list(_texts(app.state))
    for key in keys:
        assert not [text for text in held if key in text]
        assert app.state.api_keys.match(key).digest == hashlib.sha256(key.encode()).digest()

    # Every stored hash is compared, whichever matches and whether any does.
    compared: list[object] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return compare(a, b)

    # producer.auth calls hmac.compare_digest through the module, so this reaches it.
    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in [*keys, "wrong", "", None]:
        compared.clear()
        app.state.api_keys.match(presented)
        assert len(compared) == len(keys)


def test_secrets_never_appear_in_logs(
    stack: Stack, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    """A full flow, with refusals and rejections: no challenge, token or API key reaches the
    producer's log (captured at DEBUG, uvicorn's access log included) or the workers' logs."""
    caplog.set_level(logging.DEBUG)
    # An earlier server in this process may have applied uvicorn's own logging configuration,
    # which stops the access log from propagating: this test reads it through pytest's capture.
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.disabled = False
        logger.propagate = True
        logger.handlers.clear()
    wrong_key = f"wrong-{secrets.token_urlsafe(16)}"
    secrets_sent = [KEY, wrong_key]
    job_ids: list[str] = []

    def verdict(api: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
        secrets_sent.extend(v for k, v in body.items() if k in ("challenge", "payload", "token"))
        response = api.post(path, params={"wait": 20}, json=body)
        assert response.status_code == 200, response.text
        job_ids.append(response.json()["jobId"])
        return dict(response.json()["result"])

    with http_api(producer_settings(stack.settings), verbose=True) as api:
        device = Device(ca=ca)
        registration_body = device.registration_body(issue_http(api, "registration"), now=now())
        assert verdict(api, "/v1/attestations", registration_body)["ok"]
        body = device.assertion_body(issue_http(api, "assertion"))
        assert verdict(api, "/v1/assertions", body)["ok"]
        assert verdict(api, "/v1/assertions", body)["reason"] == "challenge_used"
        corrupt = Device(ca=ca).registration_body(issue_http(api, "registration"), now=now())
        corrupt["token"] = corrupt["token"][:-8] + "AAAAAAA="
        assert not verdict(api, "/v1/attestations", corrupt)["ok"]
        unknown = Device(ca=ca).assertion_body(issue_http(api, "assertion"))
        assert verdict(api, "/v1/assertions", unknown)["reason"] == "key_unknown"
        # Refused by the producer: an unknown field, the wrong route, a wrong key.
        refused = {**Device(ca=ca).registration_body("refused-challenge", now=now())}
        secrets_sent.extend([refused["challenge"], refused["token"]])
        assert_error(api.post("/v1/attestations", json={**refused, "x": 1}), 422, "invalid_request")
        assert_error(api.post("/v1/assertions", json=refused), 422, "invalid_request")
        response = api.post(
            "/v1/jobs",
            json={"jobs": [{"type": "attestation", "body": refused}]},
            headers={"Authorization": f"Bearer {wrong_key}"},
        )
        assert_error(response, 401, "unauthorized")

    # The workers log each job's end after storing its result: wait for those lines.
    wait_until(
        lambda: all(
            f"[{task_of(j, key_owner())}] succeeded" in worker_log(stack, "") for j in job_ids
        ),
        30,
        "worker log lines",
    )
    logs = {
        "workers": worker_log(stack, ""),
        "producer": caplog.text + "\n".join(str(r.__dict__) for r in caplog.records),
    }
    assert "POST /v1/attestations" in logs["producer"]  # the access log was captured
    # Long values are also looked for in part (from their middle: tokens of one kind share
    # their first bytes), since a log that cuts a token short still leaks it.
    needles = {s for s in secrets_sent if s} | {
        s[len(s) // 2 : len(s) // 2 + 24] for s in secrets_sent if len(s) > 40
    }
    for where, content in logs.items():
        leaked = sorted(needle[:12] + "..." for needle in needles if needle in content)
        assert not leaked, f"{where} log holds {leaked}"


class _ExplodingBackend:
    def get_task_meta(self, task_id: str, cache: bool = True) -> dict[str, Any]:
        raise RuntimeError(f"{KEY} Traceback (most recent call last)")


class _ExplodingCelery:
    """A Celery app whose every use fails with an error quoting a secret."""

    backend = _ExplodingBackend()

    def producer_or_acquire(self, producer: Any = None) -> Any:
        raise ValueError(f"token {KEY}")


def test_no_stack_trace_in_error_responses(
    stack: Stack, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = Device(ca=ca).registration_body("challenge", now=now())
    responses = []
    with http_api(producer_settings(stack.settings), celery_app=_ExplodingCelery()) as api:
        responses.append(api.get(f"/v1/jobs/{seal_job_id(key_owner(), new_batch_id(), 0)}"))
        responses.append(
            api.post("/v1/jobs", json={"jobs": [{"type": "attestation", "body": body}]})
        )
        responses.append(api.post("/v1/assertions", json=Device(ca=ca).assertion_body("p")))
    # A store that fails with an error that is not an outage (a bad connection option).
    broken = producer_settings(
        stack.settings, store_url=f"{stack.settings.store_url}?bogus_option={KEY}"
    )
    with http_api(broken) as api:
        responses.append(api.post("/v1/challenges", json={"purpose": "registration"}))
        readiness = api.get("/readyz")
    for response in responses:
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert set(response.json()) == {"error"} and set(error) == {"code", "detail"}
        assert error["code"] == "internal_error"
        for marker in ("Traceback", 'File "', KEY, "Error", "line "):
            assert marker not in response.text
    assert readiness.status_code == 503
    assert KEY not in readiness.text and "Traceback" not in readiness.text
    # The producer's log has what an operator needs (the class and the stack), not the message.
    assert "RuntimeError" in caplog.text and "ProgrammingError" in caplog.text
    assert KEY not in caplog.text


def test_every_verdict_has_an_audit_record_the_api_cannot_change(stack: Stack, ca: TestCA) -> None:
    started = now()
    settings = producer_settings(stack.settings)
    app = create_app(settings)
    with (
        serve_app(app) as url,
        httpx.Client(base_url=url, headers=AUTH, timeout=30) as api,
        sessions_for(settings.store_url) as sessions,
    ):

        def decide(path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            response = api.post(path, params={"wait": 20}, json=body)
            assert response.status_code == 200, response.text
            return response.json()["jobId"], response.json()["result"]

        device = Device(ca=ca)
        decided = [
            decide(
                "/v1/attestations",
                device.registration_body(issue_http(api, "registration"), now=now()),
            ),
            decide("/v1/assertions", device.assertion_body(issue_http(api, "assertion"))),
            decide("/v1/assertions", device.assertion_body("never issued")),
            decide("/v1/assertions", Device(ca=ca).assertion_body(issue_http(api, "assertion"))),
        ]
        job_ids = [job_id for job_id, _ in decided]
        rows = verdict_rows(sessions, job_ids)
        assert set(rows) == set(job_ids)
        for job_id, result in decided:
            row = rows[job_id]
            assert (row.kind, row.key_id, row.ok, row.reason) == (
                result["kind"],
                result["keyId"],
                result["ok"],
                result["reason"],
            )
            assert row.app_id == result["appId"]
            assert started <= row.decided_at <= now()
            assert row.result == result
        assert [rows[j].reason for j in job_ids] == [None, None, "challenge_unknown", "key_unknown"]
        assert rows[job_ids[0]].app_id == APP_ID

        # No route writes to existing jobs or verdicts: /v1/jobs only takes new jobs (whose
        # ids the producer picks), a job is only read, and nothing else names verdicts.
        methods = {route.path: set(route.methods or ()) for route in api_routes()}
        assert methods["/v1/jobs"] == {"POST"} and methods["/v1/jobs/{jobId}"] == {"GET"}
        for path, allowed in methods.items():
            assert allowed <= {"GET", "POST"}, path
            assert "verdict" not in path and "audit" not in path
        for method in ("PUT", "PATCH", "DELETE", "POST"):
            assert_error(api.request(method, f"/v1/jobs/{job_ids[0]}"), 405, "method_not_allowed")
        for method in ("PUT", "PATCH", "DELETE"):
            assert_error(api.request(method, "/v1/jobs"), 405, "method_not_allowed")
        chosen = {"type": "attestation", "body": device.assertion_body("x"), "jobId": job_ids[1]}
        response = api.post("/v1/jobs", json={"jobs": [chosen]})
        assert response.json()["jobs"][0]["status"] == "rejected"
        after = verdict_rows(sessions, job_ids)
        assert {j: (r.ok, r.reason, r.result) for j, r in after.items()} == {
            j: (r.ok, r.reason, r.result) for j, r in rows.items()
        }
