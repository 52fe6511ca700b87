"""The producer's HTTP API against the real stack: Redis, PostgreSQL and two worker processes.

Each app runs in a real uvicorn server on a free local port, and requests go over real HTTP
(chunked uploads included). Devices are minted by the test factory; every verdict comes from a
real worker. Tests assert status codes and reason codes, never message text.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from producer import create_app
from producer.batching import new_batch_id, seal_job_id
from tests.factory import Device, TestCA, client_data_hash
from tests.faults import serve_app as serve
from tests.stack import Stack, key_owner
from worker.settings import Settings
from worker.version import __version__

KEY = "test-key"
DEV_APP_ID = "TEAMID1234.com.example.devapp"
DEAD_REDIS = "redis://127.0.0.1:1/0"
DEAD_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def settings(stack: Stack) -> Settings:
    return stack.settings.model_copy(update={"api_keys": [SecretStr(KEY)]})


@contextmanager
def _client(settings: Settings, **kwargs: Any) -> Iterator[httpx.Client]:
    with (
        serve(create_app(settings, **kwargs)) as url,
        httpx.Client(base_url=url, headers=AUTH, timeout=30) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def api(settings: Settings) -> Iterator[httpx.Client]:
    with _client(settings) as client:
        yield client


def _now() -> datetime:
    return datetime.now(UTC)


def issue(api: httpx.Client, purpose: str, key_id: str | None = None) -> str:
    body = {"purpose": purpose} if key_id is None else {"purpose": purpose, "keyId": key_id}
    response = api.post("/v1/challenges", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["challenge"])


def verdict(api: httpx.Client, path: str, body: Any) -> dict[str, Any]:
    """Submit with ?wait= and return the verdict."""
    response = api.post(path, params={"wait": 20}, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["status"] == "done"
    assert uuid.UUID(data["jobId"])
    return dict(data["result"])


def job_verdict(api: httpx.Client, job_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/jobs/{job_id}", params={"wait": 20})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data == {"jobId": job_id, "status": "done", "result": data["result"], "error": None}
    return dict(data["result"])


def register(api: httpx.Client, ca: TestCA, **device: Any) -> Device:
    dev = Device(ca=ca, **device)
    body = dev.registration_body(issue(api, "registration"), now=_now())
    result = verdict(api, "/v1/attestations", body)
    assert result["ok"], result
    return dev


def plugin_assertion(device: Device, payload: str, *, counter: int) -> dict[str, str]:
    """An assertion body with an explicit counter, as a device that repeats one would send."""
    token = device.assertion_object(client_data_hash(payload), counter=counter)
    return {
        "platform": "ios",
        "format": "apple-app-attest",
        "keyId": device.key_id_b64,
        "payload": payload,
        "token": base64.b64encode(token).decode("ascii"),
    }


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert isinstance(response.json()["error"]["detail"], str)


# Challenges, registrations, assertions --------------------------------------------------------


def test_challenge_is_issued_with_its_expiry(api: httpx.Client, settings: Settings) -> None:
    before = _now()
    response = api.post("/v1/challenges", json={"purpose": "assertion", "keyId": "k" * 44})
    assert response.status_code == 201
    data = response.json()
    assert set(data) == {"challenge", "expiresAt", "purpose", "keyId"}
    assert data["purpose"] == "assertion" and data["keyId"] == "k" * 44
    assert len(data["challenge"]) >= 43
    expires = datetime.fromisoformat(data["expiresAt"])
    ttl = timedelta(seconds=settings.challenge_ttl_seconds)
    assert before + ttl <= expires <= _now() + ttl
    unbound = api.post("/v1/challenges", json={"purpose": "registration"}).json()
    assert unbound["keyId"] is None and unbound["challenge"] != data["challenge"]


def test_registration_then_assertions_advance_the_counter(api: httpx.Client, ca: TestCA) -> None:
    device = Device(ca=ca)
    result = verdict(
        api, "/v1/attestations", device.registration_body(issue(api, "registration"), now=_now())
    )
    assert result["ok"] and result["kind"] == "registration"
    assert result["keyId"] == device.key_id_b64 and result["counter"] == 0
    assert result["environment"] == "production" and result["reason"] is None

    for expected in (1, 2):
        challenge = issue(api, "assertion", device.key_id_b64)
        result = verdict(api, "/v1/assertions", device.assertion_body(challenge))
        assert result["ok"] and result["kind"] == "assertion"
        assert result["counter"] == expected


def test_a_lone_waiting_request_does_not_wait_for_company(settings: Settings, ca: TestCA) -> None:
    """With a batch window of a minute, requests that wait for their verdict alone (no other
    wait in progress) are sent at once: a registration and an assertion each get their verdict
    within the client's 30 s timeout (the window itself is tested in test_batching)."""
    with _client(settings.model_copy(update={"batch_window_seconds": 60})) as client:
        device = register(client, ca)
        challenge = issue(client, "assertion", device.key_id_b64)
        result = verdict(client, "/v1/assertions", device.assertion_body(challenge))
        assert result["ok"] and result["counter"] == 1


def test_assertion_naming_a_challenge_inside_its_payload(api: httpx.Client, ca: TestCA) -> None:
    device = register(api, ca)
    challenge = issue(api, "assertion")
    payload = f'{{"action":"transfer","amount":10,"nonce":"{challenge}"}}'
    result = verdict(
        api, "/v1/assertions", {**device.assertion_body(payload), "challenge": challenge}
    )
    assert result["ok"] and result["counter"] == 1

    other = issue(api, "assertion")
    response = api.post(
        "/v1/assertions", json={**device.assertion_body("no nonce here"), "challenge": other}
    )
    assert_error(response, 422, "invalid_request")


def test_a_used_challenge_is_refused(api: httpx.Client, ca: TestCA) -> None:
    challenge = issue(api, "registration")
    first = verdict(api, "/v1/attestations", Device(ca=ca).registration_body(challenge, now=_now()))
    assert first["ok"]
    second = verdict(
        api, "/v1/attestations", Device(ca=ca).registration_body(challenge, now=_now())
    )
    assert second["ok"] is False and second["reason"] == "challenge_used"

    device = register(api, ca)
    challenge = issue(api, "assertion")
    assert verdict(api, "/v1/assertions", device.assertion_body(challenge))["ok"]
    again = verdict(api, "/v1/assertions", device.assertion_body(challenge))
    assert again["reason"] == "challenge_used"


def test_an_expired_challenge_is_refused(settings: Settings, ca: TestCA) -> None:
    short = settings.model_copy(update={"challenge_ttl_seconds": 1})
    with _client(short) as api:
        challenge = issue(api, "registration")
        time.sleep(1.5)
        result = verdict(
            api, "/v1/attestations", Device(ca=ca).registration_body(challenge, now=_now())
        )
    assert result["ok"] is False and result["reason"] == "challenge_expired"


def test_a_never_issued_challenge_is_unknown(api: httpx.Client, ca: TestCA) -> None:
    made_up = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()
    result = verdict(api, "/v1/attestations", Device(ca=ca).registration_body(made_up, now=_now()))
    assert result["reason"] == "challenge_unknown"

    device = register(api, ca)
    result = verdict(api, "/v1/assertions", device.assertion_body(made_up))
    assert result["reason"] == "challenge_unknown"
    # A registration challenge does not serve an assertion, nor one bound to another key.
    for challenge in (issue(api, "registration"), issue(api, "assertion", "x" * 44)):
        result = verdict(api, "/v1/assertions", device.assertion_body(challenge))
        assert result["reason"] == "challenge_unknown"


def test_an_assertion_before_registration_is_key_unknown(api: httpx.Client, ca: TestCA) -> None:
    device = Device(ca=ca)
    result = verdict(api, "/v1/assertions", device.assertion_body(issue(api, "assertion")))
    assert result["ok"] is False and result["reason"] == "key_unknown"
    assert result["keyId"] == device.key_id_b64


def test_get_job_answers_not_found_pending_then_done(api: httpx.Client, ca: TestCA) -> None:
    # An id that was never accepted is 404 at once, with or without waiting.
    unknown = str(uuid.uuid4())
    response = api.get(f"/v1/jobs/{unknown}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
    response = api.get(f"/v1/jobs/{unknown}", params={"wait": 10})
    assert response.status_code == 404

    body = Device(ca=ca).registration_body(issue(api, "registration"), now=_now())
    response = api.post("/v1/attestations", json=body)
    assert response.status_code == 202
    accepted = response.json()
    assert accepted == {"jobId": accepted["jobId"], "status": "pending"}
    assert job_verdict(api, accepted["jobId"])["ok"]


# Batches ------------------------------------------------------------------------------------


def test_a_batch_of_mixed_jobs(api: httpx.Client, ca: TestCA) -> None:
    alice, bob = register(api, ca), register(api, ca)
    carol = Device(ca=ca)
    dave = Device(ca=ca, app_id=DEV_APP_ID, environment="development")
    android = {**carol.registration_body("c", now=_now()), "platform": "android"}
    jobs: list[Any] = [
        {
            "type": "attestation",
            "body": carol.registration_body(issue(api, "registration"), now=_now()),
        },
        {
            "type": "attestation",
            "body": dave.registration_body(issue(api, "registration"), now=_now()),
        },
        {"type": "assertion", "body": alice.assertion_body(issue(api, "assertion"))},
        {"type": "assertion", "body": bob.assertion_body(issue(api, "assertion"))},
        {"type": "attestation", "body": {"platform": "ios"}},
        {"type": "attestation", "body": bob.assertion_body("wrong route")},
        {"type": "attestation", "body": android},
        "not an object",
        {"type": "signature", "body": {}},
        {
            "type": "attestation",
            "body": Device(ca=ca).registration_body("never issued", now=_now()),
        },
    ]
    response = api.post("/v1/jobs", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    entries = response.json()["jobs"]
    assert [entry["index"] for entry in entries] == list(range(len(jobs)))

    rejected = {e["index"]: e["error"]["code"] for e in entries if e["status"] == "rejected"}
    assert rejected == {
        4: "invalid_request",
        5: "invalid_request",
        6: "unsupported_format",
        7: "invalid_request",
        8: "invalid_request",
    }
    for entry in entries:
        assert set(entry) == (
            {"index", "status", "error"}
            if entry["index"] in rejected
            else {"index", "jobId", "status"}
        )

    results = {
        e["index"]: job_verdict(api, e["jobId"]) for e in entries if e["status"] == "pending"
    }
    assert results[0]["ok"] and results[0]["environment"] == "production"
    assert results[1]["ok"] and results[1]["environment"] == "development"
    assert results[1]["appId"] == DEV_APP_ID
    assert (
        results[2]["ok"] and results[2]["counter"] == 1 and results[2]["keyId"] == alice.key_id_b64
    )
    assert results[3]["ok"] and results[3]["counter"] == 1 and results[3]["keyId"] == bob.key_id_b64
    assert results[9]["reason"] == "challenge_unknown"


def test_batch_bounds(settings: Settings, api: httpx.Client, ca: TestCA) -> None:
    assert_error(api.post("/v1/jobs", json={"jobs": []}), 422, "invalid_request")
    assert_error(api.post("/v1/jobs", json={"jobs": {}}), 422, "invalid_request")
    assert_error(api.post("/v1/jobs", json=[]), 422, "invalid_request")
    assert_error(api.post("/v1/jobs", json={"jobs": [], "more": 1}), 422, "invalid_request")
    response = api.post("/v1/jobs", content=b'{"jobs": [', headers=JSON)
    assert_error(response, 400, "invalid_json")
    small = settings.model_copy(update={"max_batch_jobs": 2})
    body = Device(ca=ca).registration_body("x", now=_now())
    with _client(small) as client:
        too_many = {"jobs": [{"type": "attestation", "body": body}] * 3}
        assert_error(client.post("/v1/jobs", json=too_many), 413, "payload_too_large")


# Concurrency: two worker processes race -------------------------------------------------------


def test_one_counter_value_is_accepted_once(api: httpx.Client, ca: TestCA) -> None:
    device = register(api, ca)
    bodies = [plugin_assertion(device, issue(api, "assertion"), counter=7) for _ in range(12)]
    response = api.post(
        "/v1/jobs", json={"jobs": [{"type": "assertion", "body": b} for b in bodies]}
    )
    assert response.status_code == 202
    results = [job_verdict(api, entry["jobId"]) for entry in response.json()["jobs"]]
    accepted = [r for r in results if r["ok"]]
    assert len(accepted) == 1 and accepted[0]["counter"] == 7
    assert Counter(r["reason"] for r in results if not r["ok"]) == {"counter_replay": 11}


def test_one_registration_challenge_is_used_once(api: httpx.Client, ca: TestCA) -> None:
    challenge = issue(api, "registration")
    bodies = [Device(ca=ca).registration_body(challenge, now=_now()) for _ in range(6)]
    response = api.post(
        "/v1/jobs", json={"jobs": [{"type": "attestation", "body": b} for b in bodies]}
    )
    assert response.status_code == 202
    results = [job_verdict(api, entry["jobId"]) for entry in response.json()["jobs"]]
    assert sum(r["ok"] for r in results) == 1
    assert Counter(r["reason"] for r in results if not r["ok"]) == {"challenge_used": 5}


# Authentication -------------------------------------------------------------------------------

PROTECTED = [
    ("POST", "/v1/challenges"),
    ("POST", "/v1/attestations"),
    ("POST", "/v1/assertions"),
    ("POST", "/v1/jobs"),
    ("GET", f"/v1/jobs/{uuid.UUID(int=1)}"),
]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer", f"Bearer {KEY}x", KEY],
    ids=["missing", "wrong", "basic", "empty", "longer", "no-scheme"],
)
def test_requests_without_a_valid_key_are_refused(
    api: httpx.Client, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in PROTECTED:
        request = api.build_request(method, path, json={"purpose": "registration"})
        if authorization is None:
            del request.headers["Authorization"]
        else:
            request.headers.update(headers)
        response = api.send(request)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_without_configured_keys_every_request_is_refused(settings: Settings) -> None:
    for keys in ([], [SecretStr("")]):
        with _client(settings.model_copy(update={"api_keys": keys})) as client:
            for method, path in PROTECTED:
                response = client.request(method, path, json={"purpose": "registration"})
                assert_error(response, 401, "unauthorized")
            for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
                assert client.get(path).status_code == 200


def test_any_configured_key_is_accepted(settings: Settings) -> None:
    keys = [SecretStr("first"), SecretStr("second")]
    with _client(settings.model_copy(update={"api_keys": keys})) as client:
        for key in ("first", "second"):
            response = client.post(
                "/v1/challenges",
                json={"purpose": "registration"},
                headers={"Authorization": f"bearer {key}"},
            )
            assert response.status_code == 201


# Malformed and oversized requests ---------------------------------------------------------------


def test_oversized_bodies_are_refused_before_parsing(api: httpx.Client, settings: Settings) -> None:
    limit = settings.max_body_bytes
    for path in ("/v1/attestations", "/v1/assertions", "/v1/challenges"):
        response = api.post(path, content=b"{" * (limit + 1), headers=JSON)
        assert_error(response, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        for _ in range(limit // 4096 + 2):
            yield b" " * 4096

    response = api.post("/v1/attestations", content=chunks(), headers=JSON)
    assert_error(response, 413, "payload_too_large")
    # Just within the limit, the body is parsed (and refused for what it is, not for its size).
    response = api.post("/v1/attestations", content=b" " * (limit - 2) + b"{}", headers=JSON)
    assert_error(response, 422, "invalid_request")


def _good_registration(ca: TestCA) -> dict[str, str]:
    return Device(ca=ca).registration_body("challenge", now=_now())


@pytest.mark.parametrize(
    ("path", "mutate"),
    [
        ("/v1/attestations", lambda b: b"[1, 2]"),
        ("/v1/attestations", lambda b: {**b, "token": 12}),
        ("/v1/attestations", lambda b: {**b, "keyId": None}),
        ("/v1/attestations", lambda b: {k: v for k, v in b.items() if k != "challenge"}),
        ("/v1/attestations", lambda b: {**b, "extra": "field"}),
        ("/v1/attestations", lambda b: {**b, "challenge": ""}),
        ("/v1/attestations", lambda b: {**b, "payload": "makes it an assertion"}),
        ("/v1/assertions", lambda b: b),
        ("/v1/assertions", lambda b: {**b, "payload": 5}),
        ("/v1/challenges", lambda b: {"purpose": "signing"}),
        ("/v1/challenges", lambda b: {"purpose": "assertion", "keyId": "k" * 45}),
        ("/v1/challenges", lambda b: {"purpose": "assertion", "other": 1}),
        ("/v1/challenges", lambda b: b"[]"),
    ],
)
def test_malformed_requests_are_invalid_request(
    api: httpx.Client, ca: TestCA, path: str, mutate: Any
) -> None:
    body = mutate(_good_registration(ca))
    if isinstance(body, bytes):
        response = api.post(path, content=body, headers=JSON)
    else:
        response = api.post(path, json=body)
    assert_error(response, 422, "invalid_request")
    # (Bodies that are not JSON at all are 400 invalid_json: tests/test_api_hardening.py.)


@pytest.mark.parametrize(
    "claims",
    [
        {"platform": "android", "format": "apple-app-attest"},
        {"platform": "ios", "format": "google-play-integrity-standard"},
        {"format": "web-fallback"},
        {"platform": "IOS"},
    ],
)
def test_other_platforms_are_unsupported_format(
    api: httpx.Client, ca: TestCA, claims: dict[str, str]
) -> None:
    response = api.post("/v1/attestations", json={**_good_registration(ca), **claims})
    assert_error(response, 422, "unsupported_format")
    body = {**Device(ca=ca).assertion_body("payload"), **claims}
    assert_error(api.post("/v1/assertions", json=body), 422, "unsupported_format")


@pytest.mark.parametrize("wait", ["0", "-1", "30.5", "abc", "nan", "inf"])
def test_wait_out_of_range_is_invalid_request(api: httpx.Client, ca: TestCA, wait: str) -> None:
    job = f"/v1/jobs/{uuid.uuid4()}"
    assert_error(api.get(job, params={"wait": wait}), 422, "invalid_request")
    response = api.post("/v1/attestations", params={"wait": wait}, json=_good_registration(ca))
    assert_error(response, 422, "invalid_request")


def test_unknown_routes_and_bad_job_ids(api: httpx.Client) -> None:
    assert_error(api.get("/v1/jobs/not-a-uuid"), 422, "invalid_request")
    assert_error(api.get("/v1/nothing"), 404, "not_found")
    assert_error(api.delete("/v1/challenges"), 405, "method_not_allowed")


# Health, infrastructure failures, documentation ------------------------------------------------


def test_health_and_readiness(api: httpx.Client) -> None:
    response = api.get("/healthz", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "version": __version__}
    response = api.get("/readyz", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"broker": "ok", "backend": "ok", "database": "ok"},
    }


def test_readiness_fails_when_the_broker_is_down(settings: Settings) -> None:
    started = time.monotonic()
    with _client(settings.model_copy(update={"broker_url": DEAD_REDIS})) as client:
        response = client.get("/readyz")
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    data = response.json()
    assert data["status"] == "unavailable"
    assert data["checks"]["broker"].startswith("error: ")
    assert data["checks"]["backend"] == "ok" and data["checks"]["database"] == "ok"


def test_readiness_fails_when_the_backend_and_database_are_down(settings: Settings) -> None:
    dead = settings.model_copy(update={"result_backend": DEAD_REDIS, "store_url": DEAD_POSTGRES})
    with _client(dead) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"] == "ok"
    assert checks["backend"].startswith("error: ") and checks["database"].startswith("error: ")


def test_a_dead_broker_is_service_unavailable(settings: Settings, ca: TestCA) -> None:
    with _client(settings.model_copy(update={"broker_url": DEAD_REDIS})) as client:
        body = _good_registration(ca)
        assert_error(client.post("/v1/attestations", json=body), 503, "service_unavailable")
        batch = {"jobs": [{"type": "attestation", "body": body}]}
        assert_error(client.post("/v1/jobs", json=batch), 503, "service_unavailable")


def sealed_job_id(key: str = KEY) -> str:
    """A job id as the API would give it to the holder of ``key`` (for a batch that does not
    exist)."""
    return seal_job_id(key_owner(key), new_batch_id(), 0)


def test_a_dead_result_backend_is_service_unavailable(settings: Settings) -> None:
    with _client(settings.model_copy(update={"result_backend": DEAD_REDIS})) as client:
        response = client.get(f"/v1/jobs/{sealed_job_id()}")
    assert_error(response, 503, "service_unavailable")


def test_a_dead_database_is_service_unavailable(settings: Settings) -> None:
    with _client(settings.model_copy(update={"store_url": DEAD_POSTGRES})) as client:
        response = client.post("/v1/challenges", json={"purpose": "registration"})
    assert_error(response, 503, "service_unavailable")


class _BrokenCelery:
    """A Celery app whose every use fails with a programming error."""

    backend = None

    def producer_or_acquire(self, producer: Any = None) -> Any:
        raise RuntimeError("secret-token-value must not leak")


def test_unexpected_errors_are_internal_error_without_details(
    settings: Settings, ca: TestCA
) -> None:
    with _client(settings, celery_app=_BrokenCelery()) as client:
        response = client.post("/v1/attestations", json=_good_registration(ca))
    assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text


class _Backend:
    """A result backend that holds one stored task state."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta

    def get_task_meta(self, task_id: str, cache: bool = True) -> dict[str, Any]:
        return {"task_id": task_id, **self.meta}


class _CeleryWithBackend:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.backend = _Backend(meta)


@pytest.mark.parametrize(
    "meta",
    [
        {"status": "FAILURE", "result": {"exc_type": "RuntimeError", "exc_message": "x"}},
        {"status": "REVOKED", "result": None},
        {"status": "SUCCESS", "result": {"not": "a verdict"}},
    ],
    ids=["failure", "revoked", "unreadable"],
)
def test_a_failed_job_is_done_with_internal_error(settings: Settings, meta: dict[str, Any]) -> None:
    job_id = sealed_job_id()
    with _client(settings, celery_app=_CeleryWithBackend(meta)) as client:
        response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    data = response.json()
    assert data["jobId"] == job_id and data["status"] == "done"
    assert data["result"]["ok"] is False and data["result"]["reason"] == "internal_error"


ROUTES = {
    "/v1/challenges",
    "/v1/attestations",
    "/v1/assertions",
    "/v1/jobs",
    "/v1/jobs/{jobId}",
    "/healthz",
    "/readyz",
}


def test_openapi_documents_the_routes(api: httpx.Client, settings: Settings) -> None:
    assert set(create_app(settings).openapi()["paths"]) >= ROUTES
    schema = api.get("/openapi.json", headers={"Authorization": ""}).json()
    paths = schema["paths"]
    assert set(paths) >= ROUTES
    for path, operations in paths.items():
        for operation in operations.values():
            assert operation["summary"], path
    attestation = paths["/v1/attestations"]["post"]
    body = attestation["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["required"]) == {"platform", "format", "keyId", "challenge", "token"}
    assert {"200", "202", "401", "413", "422", "503"} <= set(attestation["responses"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
