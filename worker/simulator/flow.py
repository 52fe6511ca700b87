"""Fake devices running the real flow against a live service, each job with the verdict it must
get.

A device asks the service for a registration challenge, attests a new key over it, then asks
for an assertion challenge per request and signs a payload that embeds it, exactly as an app
with the Capacitor plugin does. With ``hostile`` every registered device also tries what an
attacker would (a replay, a reused challenge, a stale counter, another app's signature, a bad
signature, an unknown key, a second registration, an unissued challenge, a mismatched nonce,
another app's attestation, an Android body) and each of those must be refused with its reason.

Errors of the service itself (unreachable, API key refused, 5xx, no verdict in time) stop the
run with a ``ServiceError``; they are not verdicts.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from worker.simulator.devices import Device, TestCA
from worker.simulator.google import FakeGoogle, payload

# The Android app the simulated devices run, as ``appattest simulate --make-ca`` prints its
# policy: its package, and the SHA-256 of its signing certificate.
SIMULATED_PACKAGE: Final = "com.example.simulated"
SIMULATED_OTHER_PACKAGE: Final = "com.example.someoneelse"
SIMULATED_CERTIFICATE: Final = bytes.fromhex("5a" * 32)

ACCEPTED: Final = "accepted"
"""The verdict of a job the service accepted; every other verdict is a reason code."""

JobKind = Literal["registration", "assertion"]

# Of the 4xx answers, these mean the request was judged at the door (the producer's own
# validation); the error code is then the verdict. 401 and 429 are not verdicts.
_DOOR_STATUSES: Final = frozenset({400, 413, 422})
_MAX_RATE_LIMITED_RETRIES: Final = 50
# Answers that mean the URL is not the service's API root: no such route, or not our server.
_NO_SUCH_ROUTE: Final = frozenset({"not_found", "method_not_allowed", None})


@dataclass(frozen=True)
class Case:
    """One kind of job a simulated device sends, and the verdicts it may get."""

    name: str
    kind: JobKind
    expected: frozenset[str]
    description: str


REGISTRATION: Final = Case(
    "registration", "registration", frozenset({ACCEPTED}), "a new device registers its key"
)
ASSERTION: Final = Case(
    "assertion", "assertion", frozenset({ACCEPTED}), "a signed request over a fresh challenge"
)
REPLAYED_ASSERTION: Final = Case(
    "replayed_assertion",
    "assertion",
    # The service checks the challenge first, so a replay normally gets challenge_used; a
    # service that checked the counter first would be as right to say counter_replay.
    frozenset({"challenge_used", "counter_replay"}),
    "the last accepted assertion, sent again",
)
REUSED_CHALLENGE: Final = Case(
    "reused_challenge",
    "assertion",
    frozenset({"challenge_used"}),
    "a new, correctly signed assertion over a used challenge",
)
STALE_COUNTER: Final = Case(
    "stale_counter",
    "assertion",
    frozenset({"counter_replay"}),
    "an assertion whose counter does not move forward (a cloned key)",
)
WRONG_APP_ID: Final = Case(
    "wrong_app_id",
    "assertion",
    frozenset({"app_id_mismatch"}),
    "an assertion signed for another App ID",
)
BAD_SIGNATURE: Final = Case(
    "bad_signature",
    "assertion",
    frozenset({"signature_invalid"}),
    "an assertion signed by another key",
)
UNKNOWN_KEY: Final = Case(
    "unknown_key",
    "assertion",
    frozenset({"key_unknown"}),
    "an assertion by a key that never registered",
)
DUPLICATE_REGISTRATION: Final = Case(
    "duplicate_registration",
    "registration",
    frozenset({"key_already_registered"}),
    "a registered key registers again",
)
UNISSUED_CHALLENGE: Final = Case(
    "unissued_challenge",
    "registration",
    frozenset({"challenge_unknown"}),
    "a registration over a challenge the service never issued",
)
NONCE_MISMATCH: Final = Case(
    "nonce_mismatch",
    "registration",
    frozenset({"nonce_mismatch"}),
    "an attestation made over another challenge than the one sent",
)
FOREIGN_APP_REGISTRATION: Final = Case(
    "foreign_app_registration",
    "registration",
    frozenset({"app_id_mismatch"}),
    "a registration by another app",
)
ANDROID_BODY: Final = Case(
    "android_body",
    "registration",
    frozenset({"unsupported_format", "integrity_token_invalid"}),
    "an Android body whose token Google never issued (unsupported_format where no Android app"
    " is configured)",
)
# Android devices (``Plan.android``), against the local fake of Google the service asks.
ANDROID_REGISTRATION: Final = Case(
    "android_registration",
    "registration",
    frozenset({ACCEPTED}),
    "an Android app attests over a fresh challenge (Play Integrity)",
)
ANDROID_ASSERTION: Final = Case(
    "android_assertion",
    "assertion",
    frozenset({ACCEPTED}),
    "an Android request whose payload embeds a fresh challenge",
)
ANDROID_REPLAY: Final = Case(
    "android_replay",
    "registration",
    frozenset({"challenge_used"}),
    "an accepted Android body sent again (same token, same challenge)",
)
ANDROID_FOREIGN_PACKAGE: Final = Case(
    "android_foreign_package",
    "registration",
    frozenset({"integrity_token_invalid"}),
    "a genuine token of another package (Google refuses to decode it for ours)",
)
ANDROID_HASH_MISMATCH: Final = Case(
    "android_hash_mismatch",
    "registration",
    frozenset({"integrity_request_hash_mismatch"}),
    "a token requested over another challenge",
)
ANDROID_STALE: Final = Case(
    "android_stale",
    "registration",
    frozenset({"integrity_token_stale"}),
    "a token requested an hour ago",
)
ANDROID_UNTRUSTED_DEVICE: Final = Case(
    "android_untrusted_device",
    "registration",
    frozenset({"integrity_device_not_trusted"}),
    "a device that meets only basic integrity (rooted, emulator)",
)
ANDROID_SIDELOADED: Final = Case(
    "android_sideloaded",
    "registration",
    frozenset({"integrity_app_unrecognized"}),
    "a build Play does not recognise",
)

HONEST_CASES: Final = (REGISTRATION, ASSERTION)
HOSTILE_CASES: Final = (
    REPLAYED_ASSERTION,
    REUSED_CHALLENGE,
    STALE_COUNTER,
    WRONG_APP_ID,
    BAD_SIGNATURE,
    UNKNOWN_KEY,
    DUPLICATE_REGISTRATION,
    UNISSUED_CHALLENGE,
    NONCE_MISMATCH,
    FOREIGN_APP_REGISTRATION,
    ANDROID_BODY,
)
ANDROID_CASES: Final = (ANDROID_REGISTRATION, ANDROID_ASSERTION)
ANDROID_HOSTILE_CASES: Final = (
    ANDROID_REPLAY,
    ANDROID_FOREIGN_PACKAGE,
    ANDROID_HASH_MISMATCH,
    ANDROID_STALE,
    ANDROID_UNTRUSTED_DEVICE,
    ANDROID_SIDELOADED,
)


@dataclass(frozen=True)
class Outcome:
    """The verdict one job got, and how long the service took to give it."""

    case: Case
    verdict: str
    seconds: float
    key_id: str
    detail: str | None = None

    @property
    def as_expected(self) -> bool:
        """True when the verdict is one the case allows."""
        return self.verdict in self.case.expected


class ServiceError(Exception):
    """The service could not be used: unreachable, API key refused, failed, or too slow."""


@dataclass(frozen=True)
class Plan:
    """What to run: how many devices, how many assertions each, how many at once, and how
    long to wait for verdicts."""

    devices: int
    assertions: int
    concurrency: int
    app_id: str
    hostile: bool = False
    wait_seconds: float = 10.0
    job_timeout_seconds: float = 60.0
    # Android devices, run beside the iOS ones; they need ``simulate``'s ``google``.
    android: int = 0


def planned_jobs(plan: Plan) -> int:
    """How many verdicts the plan asks for when every registration is accepted."""
    per_device = 1 + plan.assertions + (len(HOSTILE_CASES) if plan.hostile else 0)
    per_android = 1 + plan.assertions + (len(ANDROID_HOSTILE_CASES) if plan.hostile else 0)
    return plan.devices * per_device + plan.android * per_android


@dataclass
class Simulation:
    """What a run produced: every outcome, the wall time and the 429 answers it waited out."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    rate_limited: int = 0


class _Service:
    """The service's HTTP API, as a simulated device's backend calls it."""

    def __init__(self, http: httpx.AsyncClient, plan: Plan, simulation: Simulation) -> None:
        self.http = http
        self.plan = plan
        self.simulation = simulation

    async def _call(
        self, method: str, path: str, *, json_body: object = None, wait: float | None = None
    ) -> httpx.Response:
        params = {"wait": wait} if wait is not None else None
        for _ in range(_MAX_RATE_LIMITED_RETRIES):
            try:
                response = await self.http.request(method, path, json=json_body, params=params)
            except httpx.TimeoutException as exc:
                raise ServiceError(f"{method} {path}: no answer in time ({exc!r})") from exc
            except httpx.HTTPError as exc:
                raise ServiceError(f"cannot reach {self.http.base_url}: {exc}") from exc
            if response.status_code != 429:
                break
            self.simulation.rate_limited += 1
            await asyncio.sleep(_retry_after(response))
        else:
            raise ServiceError(f"{method} {path}: still rate limited after many retries")
        if response.status_code == 401:
            raise ServiceError(f"the service refused the API key (401): {_error_text(response)}")
        if response.status_code in (404, 405) and _error_code(response) in _NO_SUCH_ROUTE:
            raise ServiceError(
                f"{method} {path} answered {response.status_code} ({_error_text(response)});"
                " is --url the service's base URL?"
            )
        if response.status_code >= 500 or response.status_code in (403, 404, 405):
            raise ServiceError(
                f"{method} {path} answered {response.status_code}: {_error_text(response)}"
            )
        return response

    async def challenge(self, purpose: JobKind, key_id: str | None = None) -> str:
        """A fresh challenge from ``POST /v1/challenges``."""
        body = {"purpose": purpose} if key_id is None else {"purpose": purpose, "keyId": key_id}
        response = await self._call("POST", "/v1/challenges", json_body=body)
        answer = _json(response)
        challenge = answer.get("challenge")
        if response.status_code != 201 or not isinstance(challenge, str):
            raise ServiceError(
                f"POST /v1/challenges answered {response.status_code}: {_error_text(response)}"
            )
        return challenge

    async def judge(self, case: Case, body: dict[str, str]) -> Outcome:
        """Submit one plugin body, wait for its verdict and time it."""
        path = "/v1/attestations" if case.kind == "registration" else "/v1/assertions"
        started = time.perf_counter()
        deadline = started + self.plan.job_timeout_seconds
        wait = min(self.plan.wait_seconds, self.plan.job_timeout_seconds)
        response = await self._call("POST", path, json_body=body, wait=wait)
        answer = _json(response)
        if response.status_code in _DOOR_STATUSES:
            error = answer.get("error")
            if not isinstance(error, dict) or not isinstance(error.get("code"), str):
                raise ServiceError(f"POST {path} answered {response.status_code} without a code")
            return Outcome(
                case,
                str(error["code"]),
                time.perf_counter() - started,
                body["keyId"],
                str(error.get("detail")),
            )
        while answer.get("status") != "done":
            job_id = answer.get("jobId")
            if answer.get("status") != "pending" and isinstance(answer.get("error"), dict):
                # A job the service gave up on (its message was lost, say): not a verdict.
                state = answer.get("status")
                raise ServiceError(f"job {job_id} of {path} is {state}: {_error_text(response)}")
            if response.status_code not in (200, 202) or not isinstance(job_id, str):
                raise ServiceError(
                    f"POST {path} answered {response.status_code}: {_error_text(response)}"
                )
            left = deadline - time.perf_counter()
            if left <= 0:
                raise ServiceError(
                    f"no verdict for job {job_id} within {self.plan.job_timeout_seconds:g} s;"
                    " are the workers running?"
                )
            wait = max(min(self.plan.wait_seconds, left), 0.1)
            response = await self._call("GET", f"/v1/jobs/{job_id}", wait=wait)
            answer = _json(response)
        seconds = time.perf_counter() - started
        result = answer.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
            raise ServiceError(f"a finished job of POST {path} carries no verdict")
        verdict = ACCEPTED if result["ok"] else str(result.get("reason"))
        return Outcome(case, verdict, seconds, body["keyId"], result.get("detail"))


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("Retry-After", "1")), 0.05), 30.0)
    except ValueError:
        return 1.0


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError as exc:
        raise ServiceError(
            f"{response.request.method} {response.request.url.path} answered"
            f" {response.status_code} with something that is not JSON; is this the service?"
        ) from exc
    if not isinstance(answer, dict):
        raise ServiceError(f"{response.request.url.path} answered a JSON {type(answer).__name__}")
    return answer


def _error_code(response: httpx.Response) -> str | None:
    """The API's error code, or None when the answer is not the API's error JSON (a server
    that is not this service, say)."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return f"{error.get('code')}: {error.get('detail')}"
    except (ValueError, AttributeError):
        return response.text[:200] or response.reason_phrase


def _signed_request(
    device: Device,
    challenge: str,
    label: str,
    *,
    counter: int | None = None,
    rp_id: str | None = None,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
) -> dict[str, str]:
    """An assertion body whose payload is a small request that embeds the challenge."""
    payload = json.dumps(
        {"request": f"POST /simulated/{label}", "challenge": challenge}, separators=(",", ":")
    )
    body = device.assertion_body(payload, counter=counter, rp_id=rp_id, signing_key=signing_key)
    return {**body, "challenge": challenge}


def _now() -> datetime:
    return datetime.now(UTC)


async def _run_device(
    service: _Service, ca: TestCA, plan: Plan, record: Callable[[Outcome], None]
) -> None:
    """One device's life: registration, assertions, then the hostile cases when asked."""
    device = Device(ca=ca, app_id=plan.app_id)
    challenge = await service.challenge("registration")
    registered = await service.judge(REGISTRATION, device.registration_body(challenge, now=_now()))
    record(registered)
    if registered.verdict != ACCEPTED:
        # The key is not stored: its assertions would only repeat that verdict.
        return
    accepted_counter = 0
    last: tuple[str, dict[str, str]] | None = None
    for index in range(plan.assertions):
        challenge = await service.challenge("assertion", device.key_id_b64)
        body = _signed_request(device, challenge, f"{index}")
        outcome = await service.judge(ASSERTION, body)
        record(outcome)
        if outcome.verdict == ACCEPTED:
            accepted_counter, last = device.counter, (challenge, body)
    if plan.hostile:
        await _run_hostile(service, ca, plan, device, accepted_counter, last, record)


async def _run_hostile(
    service: _Service,
    ca: TestCA,
    plan: Plan,
    device: Device,
    accepted_counter: int,
    last: tuple[str, dict[str, str]] | None,
    record: Callable[[Outcome], None],
) -> None:
    """What an attacker would try with or next to a registered device."""
    other_app = f"{plan.app_id}.not-this-app"
    key_id = device.key_id_b64
    if last is not None:
        used_challenge, accepted_body = last
        record(await service.judge(REPLAYED_ASSERTION, accepted_body))
        reused = _signed_request(device, used_challenge, "reused")
        record(await service.judge(REUSED_CHALLENGE, reused))
    stale = _signed_request(
        device, await service.challenge("assertion", key_id), "stale", counter=accepted_counter
    )
    record(await service.judge(STALE_COUNTER, stale))
    foreign = _signed_request(
        device, await service.challenge("assertion", key_id), "foreign", rp_id=other_app
    )
    record(await service.judge(WRONG_APP_ID, foreign))
    forged = _signed_request(
        device,
        await service.challenge("assertion", key_id),
        "forged",
        signing_key=ec.generate_private_key(ec.SECP256R1()),
    )
    record(await service.judge(BAD_SIGNATURE, forged))
    stranger = Device(ca=ca, app_id=plan.app_id)
    unknown = _signed_request(
        stranger, await service.challenge("assertion", stranger.key_id_b64), "unknown"
    )
    record(await service.judge(UNKNOWN_KEY, unknown))
    again = device.registration_body(await service.challenge("registration"), now=_now())
    record(await service.judge(DUPLICATE_REGISTRATION, again))
    unissued = f"simulated-unissued-{secrets.token_urlsafe(24)}"
    record(
        await service.judge(UNISSUED_CHALLENGE, stranger.registration_body(unissued, now=_now()))
    )
    newcomer = Device(ca=ca, app_id=plan.app_id)
    mismatched = {
        **newcomer.registration_body("not the challenge that is sent", now=_now()),
        "challenge": await service.challenge("registration"),
    }
    record(await service.judge(NONCE_MISMATCH, mismatched))
    outsider = Device(ca=ca, app_id=other_app)
    outsider_body = outsider.registration_body(await service.challenge("registration"), now=_now())
    record(await service.judge(FOREIGN_APP_REGISTRATION, outsider_body))
    android = {
        "platform": "android",
        "format": "google-play-integrity-standard",
        "keyId": "android-standard-integrity",
        "challenge": await service.challenge("registration"),
        "token": "c2ltdWxhdGVkIFBsYXkgSW50ZWdyaXR5IHRva2Vu",
    }
    record(await service.judge(ANDROID_BODY, android))


def _android_body(token: str, challenge: str, payload_text: str | None = None) -> dict[str, str]:
    body = {
        "platform": "android",
        "format": "google-play-integrity-standard",
        "keyId": "android-standard-integrity",
        "token": token,
        "challenge": challenge,
    }
    if payload_text is not None:
        body["payload"] = payload_text
    return body


def _token(
    google: FakeGoogle, signed_text: str, *, package: str = SIMULATED_PACKAGE, **verdict: Any
) -> str:
    """A token the fake Google decodes to a verdict over ``signed_text`` (``verdict``: the
    fields a test changes, as ``payload`` takes them)."""
    at = verdict.pop("at", None) or _now()
    answer = payload(
        package_name=SIMULATED_PACKAGE,
        signed_text=signed_text,
        certificate_digest=SIMULATED_CERTIFICATE,
        at=at,
        **verdict,
    )
    return google.add_token(package, answer)


async def _run_android_device(
    service: _Service, google: FakeGoogle, plan: Plan, record: Callable[[Outcome], None]
) -> None:
    """One Android app's life: an attestation, assertions, then the hostile cases."""
    challenge = await service.challenge("registration")
    body = _android_body(_token(google, challenge), challenge)
    registered = await service.judge(ANDROID_REGISTRATION, body)
    record(registered)
    for index in range(plan.assertions):
        nonce = await service.challenge("assertion")
        text = f"simulated request {index};nonce={nonce}"
        asserted = _android_body(_token(google, text), nonce, text)
        record(await service.judge(ANDROID_ASSERTION, asserted))
    if not plan.hostile:
        return
    record(await service.judge(ANDROID_REPLAY, body))
    challenge = await service.challenge("registration")
    foreign = _token(google, challenge, package=SIMULATED_OTHER_PACKAGE)
    record(await service.judge(ANDROID_FOREIGN_PACKAGE, _android_body(foreign, challenge)))
    challenge = await service.challenge("registration")
    other = _token(google, challenge + "-another")
    record(await service.judge(ANDROID_HASH_MISMATCH, _android_body(other, challenge)))
    challenge = await service.challenge("registration")
    stale = _token(google, challenge, at=_now() - timedelta(hours=1))
    record(await service.judge(ANDROID_STALE, _android_body(stale, challenge)))
    challenge = await service.challenge("registration")
    rooted = _token(google, challenge, device_labels=("MEETS_BASIC_INTEGRITY",))
    record(await service.judge(ANDROID_UNTRUSTED_DEVICE, _android_body(rooted, challenge)))
    challenge = await service.challenge("registration")
    sideloaded = _token(google, challenge, app_recognition="UNRECOGNIZED_VERSION")
    record(await service.judge(ANDROID_SIDELOADED, _android_body(sideloaded, challenge)))


async def simulate(
    *,
    url: str,
    api_key: str,
    ca: TestCA,
    plan: Plan,
    on_outcome: Callable[[Outcome], None] | None = None,
    google: FakeGoogle | None = None,
) -> Simulation:
    """Run ``plan``'s devices against the service at ``url``, ``plan.concurrency`` at a time.

    ``plan.android`` Android devices run beside the iOS ones, their tokens made by ``google``
    (the fake the service is pointed at).

    Returns every outcome with the wall time of the run (the first challenge, which checks
    that the service answers and takes the key, is not timed). Raises ``ServiceError`` when the
    service cannot be used; the devices still running are then stopped.
    """
    simulation = Simulation()

    def record(outcome: Outcome) -> None:
        simulation.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    timeout = httpx.Timeout(plan.wait_seconds + 30.0, connect=10.0)
    limits = httpx.Limits(max_connections=plan.concurrency, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=timeout,
        limits=limits,
    ) as http:
        service = _Service(http, plan, simulation)
        await service.challenge("registration")
        slots = asyncio.Semaphore(plan.concurrency)

        async def device() -> None:
            async with slots:
                await _run_device(service, ca, plan, record)

        async def android_device() -> None:
            assert google is not None
            async with slots:
                await _run_android_device(service, google, plan, record)

        if plan.android and google is None:
            raise ValueError("Android devices need the fake Google (google=...)")

        started = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(plan.devices):
                    group.create_task(device())
                for _ in range(plan.android):
                    group.create_task(android_device())
        except BaseExceptionGroup as failures:
            service_errors = failures.subgroup(ServiceError)
            if service_errors is None or len(service_errors.exceptions) != len(failures.exceptions):
                raise
            first = service_errors.exceptions[0]
            raise first if isinstance(first, ServiceError) else ServiceError(str(first)) from None
        simulation.seconds = time.perf_counter() - started
    return simulation
