"""RabbitMQ as the broker (Redis stays the result backend): the queue path works end to end,
and a worker killed while it holds a job loses nothing, since RabbitMQ hands an unacknowledged
message to another consumer as soon as the dead one's connection closes.

Each test gets a virtual host of its own on the machine's RabbitMQ (created and deleted with
``rabbitmqctl``), so nothing it queues is seen by another run.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import _unavailable
from tests.factory import Device, TestCA
from tests.test_faults import (
    collect,
    enter_stack,
    issue,
    job_queue,
    kill_holding_a_job,
    queue_status,
    registration,
    report,
    sessions_for,
    verdict_rows,
    wait_until,
)

RABBITMQ = ("127.0.0.1", 5672)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A fresh RabbitMQ virtual host for one test; fails under CI when RabbitMQ is down."""
    try:
        socket.create_connection(RABBITMQ, timeout=2).close()
        if shutil.which("rabbitmqctl") is None:
            raise FileNotFoundError("rabbitmqctl is not installed")
    except OSError as exc:
        _unavailable(f"RabbitMQ at {RABBITMQ[0]}:{RABBITMQ[1]}", exc)
    vhost = f"appattest-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def test_a_worker_killed_on_rabbitmq_loses_no_job(
    ca: TestCA, pg_url: str, amqp_url: str, tmp_path: Path
) -> None:
    """Registrations through RabbitMQ: one worker is SIGKILLed while it holds a job, the other
    gets what it held at once (no visibility timeout to wait for), and every job ends with
    exactly one recorded verdict, the right one. Jobs need no ledger on this broker."""
    with ExitStack() as cleanup:
        stack = enter_stack(cleanup, ca, pg_url, tmp_path, broker_url=amqp_url)
        victim = stack.start_worker(name="victim")
        stack.start_worker(name="survivor")
        queue = cleanup.enter_context(job_queue(stack.settings, max_batch=5))
        assert queue.ledger is None
        sessions = cleanup.enter_context(sessions_for(pg_url))

        devices = [Device(ca=ca) for _ in range(240)]
        burst = [
            registration(device, challenge)
            for device, challenge in zip(
                devices, issue(sessions, "registration", [None] * len(devices)), strict=True
            )
        ]
        job_ids = queue.submit_many([request for request, _ in burst])
        expected = dict(zip(job_ids, (e for _, e in burst), strict=True))
        wait_until(lambda: len(verdict_rows(sessions, job_ids)) >= 10, 60, "first verdicts")
        held = kill_holding_a_job(stack, victim, "victim")
        victim.wait(timeout=10)

        results = collect(queue_status(queue), job_ids, 90)
        wrong = [j for j, r in results.items() if not expected[j].matches(r)]
        report("rabbitmq-sigkill", len(job_ids), len(results), len(wrong))
        assert held
        assert wrong == [] and len(results) == len(job_ids)
        rows = verdict_rows(sessions, job_ids)
        assert set(rows) == set(job_ids)
        assert all(rows[j].result == results[j] for j in job_ids)
