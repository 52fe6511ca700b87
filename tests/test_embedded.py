"""The embedded default end to end: ``appattest serve`` as a user starts it, no server at all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appattest_client import AppAttestClient, android_assertion, android_registration
from tests.factory import APP_ID, Device, TestCA
from tests.fake_google import FakeGoogle, fake_google, payload

API_KEY = "embedded-test-key"
PACKAGE = "com.example.app"
CERT = bytes(range(32))


@pytest.fixture(scope="module")
def google() -> Iterator[FakeGoogle]:
    with fake_google() as fake:
        yield fake


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(
    ca: TestCA, google: FakeGoogle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    workdir = tmp_path_factory.mktemp("embedded")
    (workdir / "root.pem").write_bytes(ca.root_pem)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    env["APPATTEST_API_KEYS"] = API_KEY
    # Android too, against the local fake of Google.
    env["APPATTEST_ANDROID_APPS"] = json.dumps({PACKAGE: {"certificateDigests": [CERT.hex()]}})
    env["APPATTEST_GOOGLE_CREDENTIALS_FILE"] = str(google.service_account_file(workdir))
    env["APPATTEST_PLAY_INTEGRITY_URL"] = google.url
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appattest",
                "serve",
                "--app-id",
                APP_ID,
                "--root-ca",
                str(workdir / "root.pem"),
                "--port",
                str(port),
                "--data-dir",
                str(workdir / "data"),
            ],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                "serve did not become ready: " + log_path.read_text()
            )
            time.sleep(0.2)
        yield client
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)  # serve gives its worker 10 s, then kills its group
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (workdir / "data" / "keys.db").exists()


def _challenge(client: httpx.Client, purpose: str) -> str:
    response = client.post("/v1/challenges", json={"purpose": purpose})
    assert response.status_code == 201, response.text
    return str(response.json()["challenge"])


def test_registration_and_assertions(served: httpx.Client, ca: TestCA) -> None:
    device = Device(ca=ca)
    body = device.registration_body(_challenge(served, "registration"), now=datetime.now(UTC))
    response = served.post("/v1/attestations", params={"wait": 20}, json=body)
    assert response.status_code == 200, response.text
    verdict = response.json()
    assert verdict["status"] == "done"
    assert verdict["result"]["ok"] is True
    assert verdict["result"]["environment"] == "production"
    for expected_counter in (1, 2):
        payload = _challenge(served, "assertion")
        response = served.post(
            "/v1/assertions", params={"wait": 20}, json=device.assertion_body(payload)
        )
        assert response.status_code == 200, response.text
        assert response.json()["result"]["counter"] == expected_counter


def test_rejections_and_job_lookup(served: httpx.Client, ca: TestCA) -> None:
    device = Device(ca=ca)
    unknown = device.registration_body("never-issued-challenge", now=datetime.now(UTC))
    response = served.post("/v1/attestations", json=unknown)
    assert response.status_code == 202
    job_id = response.json()["jobId"]
    response = served.get(f"/v1/jobs/{job_id}", params={"wait": 20})
    assert response.json()["result"]["reason"] == "challenge_unknown"
    before = served.post(
        "/v1/assertions",
        params={"wait": 20},
        json=device.assertion_body(_challenge(served, "assertion")),
    )
    assert before.json()["result"]["reason"] == "key_unknown"


def test_api_key_required(served: httpx.Client) -> None:
    response = httpx.post(f"{served.base_url}/v1/challenges", json={"purpose": "registration"})
    assert response.status_code == 401


def _verdict_counts(client: httpx.Client) -> Counter[str]:
    """``kind/reason`` -> count, from ``appattest_verdicts_total`` of the server's /metrics."""
    response = httpx.get(f"{client.base_url}/metrics", timeout=10)  # no API key needed
    assert response.status_code == 200, response.text
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "appattest_verdicts_total":
                counts[f"{sample.labels['kind']}/{sample.labels['reason']}"] += int(sample.value)
            if sample.name == "appattest_submission_to_verdict_seconds_count":
                counts["histogram"] += int(sample.value)
    return counts


def test_metrics_of_the_embedded_worker_on_the_servers_page(
    served: httpx.Client, ca: TestCA
) -> None:
    """`appattest serve` shows its worker's metrics on its own /metrics: the verdicts counted
    by kind and reason move by exactly the jobs decided, the latency histogram with them."""
    before = _verdict_counts(served)
    device = Device(ca=ca)
    now = datetime.now(UTC)
    jobs = [
        ("/v1/attestations", device.registration_body(_challenge(served, "registration"), now=now)),
        ("/v1/assertions", device.assertion_body(_challenge(served, "assertion"))),
        ("/v1/assertions", Device(ca=ca).assertion_body(_challenge(served, "assertion"))),
        ("/v1/attestations", device.registration_body("never-issued", now=now)),
    ]
    expected: Counter[str] = Counter()
    for path, body in jobs:
        response = served.post(path, params={"wait": 20}, json=body)
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        kind = "registration" if path.endswith("attestations") else "assertion"
        expected[f"{kind}/{'ok' if result['ok'] else result['reason']}"] += 1
    assert expected == Counter(
        {
            "registration/ok": 1,
            "assertion/ok": 1,
            "assertion/key_unknown": 1,
            "registration/challenge_unknown": 1,
        }
    )
    after = _verdict_counts(served)
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert moved == {**expected, "histogram": len(jobs)}


def test_android_bodies_through_the_embedded_default_and_the_python_client(
    served: httpx.Client, google: FakeGoogle
) -> None:
    """``appattest serve`` runs Android's worker too: the plugin's Android bodies, built with
    the Python client's helpers and sent through ``AppAttestClient``, get their verdicts."""
    challenge = _challenge(served, "registration")
    token = google.add_token(
        PACKAGE,
        payload(
            package_name=PACKAGE,
            signed_text=challenge,
            certificate_digest=CERT,
            at=datetime.now(UTC),
        ),
    )
    with AppAttestClient(str(served.base_url), API_KEY) as client:
        verdict = client.verify_attestation(android_registration(token, challenge))
        assert verdict.ok and verdict.platform == "android" and verdict.app_id == PACKAGE
        assert verdict.integrity is not None
        assert "MEETS_DEVICE_INTEGRITY" in verdict.integrity.device_labels
        # The same token again: its challenge is spent.
        replay = client.verify_attestation(android_registration(token, challenge))
        assert (replay.ok, replay.reason) == (False, "challenge_used")

        nonce = _challenge(served, "assertion")
        text = f"transfer=10;nonce={nonce}"
        token = google.add_token(
            PACKAGE,
            payload(
                package_name=PACKAGE,
                signed_text=text,
                certificate_digest=CERT,
                at=datetime.now(UTC),
                device_labels=("MEETS_BASIC_INTEGRITY",),
            ),
        )
        verdict = client.verify_assertion(android_assertion(token, text, challenge=nonce))
        assert (verdict.ok, verdict.reason) == (False, "integrity_device_not_trusted")


def test_a_bulk_submission_mixing_platforms(
    served: httpx.Client, google: FakeGoogle, ca: TestCA
) -> None:
    """``POST /v1/jobs`` with iOS and Android bodies together (two batch messages, one per
    queue) and ``wait_many``: every job its verdict, under its own id, in order."""
    ios = [Device(ca=ca) for _ in range(3)]
    jobs: list[tuple[Any, Any]] = []
    for n in range(6):
        challenge = _challenge(served, "registration")
        if n % 2:
            jobs.append(
                ("attestation", ios[n // 2].registration_body(challenge, now=datetime.now(UTC)))
            )
        else:
            token = google.add_token(
                PACKAGE,
                payload(
                    package_name=PACKAGE,
                    signed_text=challenge,
                    certificate_digest=CERT,
                    at=datetime.now(UTC),
                ),
            )
            jobs.append(("attestation", android_registration(token, challenge)))
    with AppAttestClient(str(served.base_url), API_KEY) as client:
        queued = client.submit_many(jobs)
        job_ids = [job.job_id for job in queued]
        assert all(job_ids)
        verdicts = client.wait_many([j for j in job_ids if j], timeout=60)
    platforms = [verdicts[j].platform for j in job_ids if j]
    assert platforms == ["android", None, "android", None, "android", None]
    assert all(verdicts[j].ok for j in job_ids if j)
