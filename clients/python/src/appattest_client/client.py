"""Python clients of the service's HTTP API, synchronous and asyncio, over httpx.

Both clients have the same methods: issue a challenge, submit registrations and assertions
(one at a time or in a batch), read a job, wait for a verdict, or submit and wait in one call.
Verdicts come back as ``appattest_client.contract.VerificationResult``; a rejection is a
verdict, not an exception. An answer outside 2xx raises ``AppAttestError`` with the API's
stable error code; network failures raise httpx's own exceptions (``httpx.TransportError``).

Every submission carries an ``Idempotency-Key`` (one the caller gives, or a fresh random one),
and a submission that fails on the network or with 503 is sent again, a bounded number of
times, with the same key: the server answers a retry with the job the first attempt created,
so a retry never queues a job twice nor spends its challenge twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import httpx
from pydantic import BaseModel, TypeAdapter

from appattest_client.api import (
    BatchJob,
    IssuedChallenge,
    JobStatus,
    JobType,
    KeyStateResponse,
    PurposeName,
)
from appattest_client.contract import AssertionRequest, RegistrationRequest, VerificationResult

Body = Mapping[str, Any] | RegistrationRequest | AssertionRequest

# How long one ``?wait=`` request asks the server to hold on; it must not exceed the server's
# max_wait_seconds (30 by default).
DEFAULT_SERVER_WAIT: Final = 20.0
# Submissions are sent at most this many times more after a network failure or a 503, with
# the same idempotency key, waiting RETRY_DELAY, then twice that, and so on.
DEFAULT_RETRIES: Final = 3
RETRY_DELAY: Final = 0.2
_RETRY_STATUSES: Final = frozenset({502, 503, 504})

_Batch = TypeAdapter(list[BatchJob])


class AppAttestError(Exception):
    """The API refused a request: the HTTP status, the stable error code and a detail."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class _Call:
    """One API request, independent of the transport that sends it."""

    method: str
    url: str
    json: Any = None
    params: dict[str, float] | None = None
    wait: float = 0.0
    headers: dict[str, str] | None = None
    idempotent: bool = False

    @property
    def retryable(self) -> bool:
        """Whether sending it again is safe: reads, and submissions under idempotency keys
        (challenges are not retried: each call issues a new one)."""
        return self.method == "GET" or self.url == "/v1/jobs/status" or self.idempotent


def _plugin_json(body: Body, **extra: str) -> dict[str, Any]:
    if isinstance(body, BaseModel):
        data = body.model_dump(mode="json", by_alias=True, exclude_none=True)
    else:
        data = dict(body)
    data.update(extra)
    return data


def _challenge_call(purpose: PurposeName, key_id: str | None) -> _Call:
    data: dict[str, str] = {"purpose": purpose}
    if key_id is not None:
        data["keyId"] = key_id
    return _Call("POST", "/v1/challenges", json=data)


def _new_key() -> str:
    return str(uuid.uuid4())


def _attestation_call(body: Body, idempotency_key: str | None) -> _Call:
    headers = {"Idempotency-Key": idempotency_key or _new_key()}
    return _Call(
        "POST", "/v1/attestations", json=_plugin_json(body), headers=headers, idempotent=True
    )


def _assertion_call(body: Body, challenge: str | None, idempotency_key: str | None) -> _Call:
    extra = {"challenge": challenge} if challenge is not None else {}
    headers = {"Idempotency-Key": idempotency_key or _new_key()}
    return _Call(
        "POST",
        "/v1/assertions",
        json=_plugin_json(body, **extra),
        headers=headers,
        idempotent=True,
    )


def _batch_call(jobs: Sequence[tuple[JobType, Body]]) -> _Call:
    # Each item carries its own key, so a retried batch is answered item by item with the
    # jobs of the first attempt.
    items = [
        {"type": kind, "body": _plugin_json(body), "idempotencyKey": _new_key()}
        for kind, body in jobs
    ]
    return _Call("POST", "/v1/jobs", json={"jobs": items}, idempotent=True)


def _job_call(job_id: str, wait: float | None) -> _Call:
    if wait is None:
        return _Call("GET", f"/v1/jobs/{job_id}")
    return _Call("GET", f"/v1/jobs/{job_id}", params={"wait": wait}, wait=wait)


def _key_call(key_id: str) -> _Call:
    # The keyId is standard base64: its "/" stay in the path (the route takes them).
    return _Call("GET", f"/v1/keys/{key_id}")


def _jobs_call(job_ids: Sequence[str], wait: float | None) -> _Call:
    params = None if wait is None else {"wait": wait}
    return _Call(
        "POST", "/v1/jobs/status", json={"jobIds": list(job_ids)}, params=params, wait=wait or 0.0
    )


_Statuses = TypeAdapter(list[JobStatus])


def _pending_after(deadline: float, pending: int, timeout: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"{pending} jobs have no verdict after {timeout} s")
    return remaining


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    code, detail = "unexpected_response", response.reason_phrase
    try:
        error = response.json()["error"]
        code, detail = str(error["code"]), str(error["detail"])
    except (ValueError, KeyError, TypeError):
        pass  # not the API's error shape (a proxy's page, say): keep the HTTP status
    raise AppAttestError(response.status_code, code, detail)


def _job_id(response: httpx.Response) -> str:
    return str(response.json()["jobId"])


def _verdict_of(status: JobStatus) -> VerificationResult | None:
    """The verdict of a done job; None while pending; raises ``AppAttestError`` for a job that
    can have none (``job_not_found``, ``job_lost``)."""
    if status.result is not None:
        return status.result
    if status.final:
        code = status.error.code if status.error else status.status
        detail = status.error.detail if status.error else "the job has no verdict"
        raise AppAttestError(200, code, f"job {status.job_id}: {detail}")
    return None


def _should_retry(call: _Call, attempt: int, retries: int, error: Exception) -> bool:
    if not call.retryable or attempt >= retries:
        return False
    if isinstance(error, AppAttestError):
        return error.status in _RETRY_STATUSES
    return isinstance(error, httpx.TransportError)


def _remaining(deadline: float, job_id: str, timeout: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"job {job_id} has no verdict after {timeout} s")
    return remaining


class _Base:
    def __init__(self, api_key: str, timeout: float, server_wait: float, retries: int) -> None:
        if retries < 0:
            raise ValueError("retries must not be negative")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = timeout
        self._server_wait = server_wait
        self._retries = retries

    def _request_args(self, call: _Call) -> dict[str, Any]:
        # A waiting request may take as long as it asked the server to wait, plus the usual.
        return {
            "method": call.method,
            "url": call.url,
            "json": call.json,
            "params": call.params,
            "headers": call.headers,
            "timeout": self._timeout + call.wait,
        }


class AppAttestClient(_Base):
    """Synchronous client of the producer's HTTP API; use it as a context manager or close it.

    ``transport`` replaces httpx's network transport (tests, proxies); ``server_wait`` is how
    long one waiting request asks the server to hold on (at most its max_wait_seconds);
    ``retries`` bounds how often a submission or a read is sent again after a network failure
    or a 502/503/504 (submissions with the same idempotency key).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        server_wait: float = DEFAULT_SERVER_WAIT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        super().__init__(api_key, timeout, server_wait, retries)
        self._http = httpx.Client(
            base_url=base_url, headers=self._headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return _checked(self._http.request(**self._request_args(call)))
            except (httpx.TransportError, AppAttestError) as error:
                if not _should_retry(call, attempt, self._retries, error):
                    raise
            time.sleep(RETRY_DELAY * 2**attempt)
            attempt += 1

    def create_challenge(self, purpose: PurposeName, key_id: str | None = None) -> IssuedChallenge:
        """Issue a one-time challenge for ``registration`` or ``assertion``, optionally bound
        to one keyId."""
        return IssuedChallenge.model_validate(self._send(_challenge_call(purpose, key_id)).json())

    def submit_attestation(self, body: Body, *, idempotency_key: str | None = None) -> str:
        """Queue a registration (the plugin's attestation body); return the job id. Without
        ``idempotency_key`` a fresh one is used (and reused by this call's retries)."""
        return _job_id(self._send(_attestation_call(body, idempotency_key)))

    def submit_assertion(
        self, body: Body, *, challenge: str | None = None, idempotency_key: str | None = None
    ) -> str:
        """Queue an assertion; ``challenge`` names the issued challenge its payload embeds
        (without it, the payload itself is the challenge). Returns the job id."""
        return _job_id(self._send(_assertion_call(body, challenge, idempotency_key)))

    def submit_many(self, jobs: Sequence[tuple[JobType, Body]]) -> list[BatchJob]:
        """Queue ``("attestation"|"assertion", body)`` pairs in one request; return one entry
        per pair, in order: queued with a job id, or rejected with an error."""
        response = self._send(_batch_call(jobs))
        return _Batch.validate_python(response.json()["jobs"])

    def get_job(self, job_id: str, *, wait: float | None = None) -> JobStatus:
        """The job's status; with ``wait``, the server holds on up to that many seconds."""
        return JobStatus.model_validate(self._send(_job_call(job_id, wait)).json())

    def get_key(self, key_id: str) -> KeyStateResponse:
        """A key's state: counter, revocation, receipt dates, risk metric and its history.
        Raises ``AppAttestError`` (404 ``not_found``) for a key that is unknown or that
        another API key registered."""
        return KeyStateResponse.model_validate(self._send(_key_call(key_id)).json())

    def get_jobs(self, job_ids: Sequence[str], *, wait: float | None = None) -> list[JobStatus]:
        """The statuses of several jobs in one request (as many as the server's batch limit);
        with ``wait``, the server holds on until all are done or that many seconds passed."""
        return _Statuses.validate_python(self._send(_jobs_call(job_ids, wait)).json()["jobs"])

    def wait_many(
        self, job_ids: Sequence[str], timeout: float = 60.0, *, chunk: int = 1000
    ) -> dict[str, VerificationResult]:
        """Wait for the verdicts of many jobs, ``chunk`` per request; return them by job id.
        Jobs that can have no verdict (``not_found``, ``lost``) are left out of the answer.
        Raises ``TimeoutError`` when some are still pending after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        found: dict[str, VerificationResult] = {}
        pending = list(dict.fromkeys(job_ids))
        while pending:
            wait = min(_pending_after(deadline, len(pending), timeout), self._server_wait)
            ended: set[str] = set()
            for start in range(0, len(pending), chunk):
                for status in self.get_jobs(pending[start : start + chunk], wait=wait):
                    if status.result is not None:
                        found[status.job_id] = status.result
                    elif status.final:
                        ended.add(status.job_id)
            pending = [job_id for job_id in pending if job_id not in found and job_id not in ended]
        return found

    def wait(self, job_id: str, timeout: float = 30.0) -> VerificationResult:
        """Wait for the job's verdict, asking the server to hold on, until ``timeout`` seconds
        have passed; then raise ``TimeoutError``. A job that can have no verdict raises
        ``AppAttestError`` (``job_not_found``, ``job_lost``)."""
        deadline = time.monotonic() + timeout
        while True:
            wait = min(_remaining(deadline, job_id, timeout), self._server_wait)
            verdict = _verdict_of(self.get_job(job_id, wait=wait))
            if verdict is not None:
                return verdict

    def verify_attestation(self, body: Body, timeout: float = 30.0) -> VerificationResult:
        """Submit a registration and wait for its verdict."""
        return self.wait(self.submit_attestation(body), timeout)

    def verify_assertion(
        self, body: Body, *, challenge: str | None = None, timeout: float = 30.0
    ) -> VerificationResult:
        """Submit an assertion and wait for its verdict."""
        return self.wait(self.submit_assertion(body, challenge=challenge), timeout)


class AsyncAppAttestClient(_Base):
    """The asyncio twin of ``AppAttestClient``; use it as an async context manager or
    ``await aclose()``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        server_wait: float = DEFAULT_SERVER_WAIT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        super().__init__(api_key, timeout, server_wait, retries)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=self._headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return _checked(await self._http.request(**self._request_args(call)))
            except (httpx.TransportError, AppAttestError) as error:
                if not _should_retry(call, attempt, self._retries, error):
                    raise
            await asyncio.sleep(RETRY_DELAY * 2**attempt)
            attempt += 1

    async def create_challenge(
        self, purpose: PurposeName, key_id: str | None = None
    ) -> IssuedChallenge:
        """See ``AppAttestClient.create_challenge``."""
        response = await self._send(_challenge_call(purpose, key_id))
        return IssuedChallenge.model_validate(response.json())

    async def submit_attestation(self, body: Body, *, idempotency_key: str | None = None) -> str:
        """See ``AppAttestClient.submit_attestation``."""
        return _job_id(await self._send(_attestation_call(body, idempotency_key)))

    async def submit_assertion(
        self, body: Body, *, challenge: str | None = None, idempotency_key: str | None = None
    ) -> str:
        """See ``AppAttestClient.submit_assertion``."""
        return _job_id(await self._send(_assertion_call(body, challenge, idempotency_key)))

    async def submit_many(self, jobs: Sequence[tuple[JobType, Body]]) -> list[BatchJob]:
        """See ``AppAttestClient.submit_many``."""
        response = await self._send(_batch_call(jobs))
        return _Batch.validate_python(response.json()["jobs"])

    async def get_job(self, job_id: str, *, wait: float | None = None) -> JobStatus:
        """See ``AppAttestClient.get_job``."""
        return JobStatus.model_validate((await self._send(_job_call(job_id, wait))).json())

    async def get_key(self, key_id: str) -> KeyStateResponse:
        """See ``AppAttestClient.get_key``."""
        return KeyStateResponse.model_validate((await self._send(_key_call(key_id))).json())

    async def get_jobs(
        self, job_ids: Sequence[str], *, wait: float | None = None
    ) -> list[JobStatus]:
        """See ``AppAttestClient.get_jobs``."""
        response = await self._send(_jobs_call(job_ids, wait))
        return _Statuses.validate_python(response.json()["jobs"])

    async def wait_many(
        self, job_ids: Sequence[str], timeout: float = 60.0, *, chunk: int = 1000
    ) -> dict[str, VerificationResult]:
        """See ``AppAttestClient.wait_many``."""
        deadline = time.monotonic() + timeout
        found: dict[str, VerificationResult] = {}
        pending = list(dict.fromkeys(job_ids))
        while pending:
            wait = min(_pending_after(deadline, len(pending), timeout), self._server_wait)
            ended: set[str] = set()
            for start in range(0, len(pending), chunk):
                for status in await self.get_jobs(pending[start : start + chunk], wait=wait):
                    if status.result is not None:
                        found[status.job_id] = status.result
                    elif status.final:
                        ended.add(status.job_id)
            pending = [job_id for job_id in pending if job_id not in found and job_id not in ended]
        return found

    async def wait(self, job_id: str, timeout: float = 30.0) -> VerificationResult:
        """See ``AppAttestClient.wait``."""
        deadline = time.monotonic() + timeout
        while True:
            wait = min(_remaining(deadline, job_id, timeout), self._server_wait)
            verdict = _verdict_of(await self.get_job(job_id, wait=wait))
            if verdict is not None:
                return verdict

    async def verify_attestation(self, body: Body, timeout: float = 30.0) -> VerificationResult:
        """See ``AppAttestClient.verify_attestation``."""
        return await self.wait(await self.submit_attestation(body), timeout)

    async def verify_assertion(
        self, body: Body, *, challenge: str | None = None, timeout: float = 30.0
    ) -> VerificationResult:
        """See ``AppAttestClient.verify_assertion``."""
        return await self.wait(await self.submit_assertion(body, challenge=challenge), timeout)
