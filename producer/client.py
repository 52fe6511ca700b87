"""Python clients of the producer's HTTP API, synchronous and asyncio, over httpx.

Both clients have the same methods: issue a challenge, submit registrations and assertions
(one at a time or in a batch), read a job, wait for a verdict, or submit and wait in one call.
Verdicts come back as ``worker.contract.VerificationResult``; a rejection is a verdict, not an
exception. An answer outside 2xx raises ``AppAttestError`` with the API's stable error code;
network failures raise httpx's own exceptions (``httpx.TransportError``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import httpx
from pydantic import BaseModel, TypeAdapter

from producer.schemas import BatchJob, IssuedChallenge, JobStatus, JobType, PurposeName
from worker.contract import AssertionRequest, RegistrationRequest, VerificationResult

Body = Mapping[str, Any] | RegistrationRequest | AssertionRequest

# How long one ``?wait=`` request asks the server to hold on; it must not exceed the server's
# max_wait_seconds (30 by default).
DEFAULT_SERVER_WAIT: Final = 20.0

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


def _attestation_call(body: Body) -> _Call:
    return _Call("POST", "/v1/attestations", json=_plugin_json(body))


def _assertion_call(body: Body, challenge: str | None) -> _Call:
    extra = {"challenge": challenge} if challenge is not None else {}
    return _Call("POST", "/v1/assertions", json=_plugin_json(body, **extra))


def _batch_call(jobs: Sequence[tuple[JobType, Body]]) -> _Call:
    items = [{"type": kind, "body": _plugin_json(body)} for kind, body in jobs]
    return _Call("POST", "/v1/jobs", json={"jobs": items})


def _job_call(job_id: str, wait: float | None) -> _Call:
    if wait is None:
        return _Call("GET", f"/v1/jobs/{job_id}")
    return _Call("GET", f"/v1/jobs/{job_id}", params={"wait": wait}, wait=wait)


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


def _remaining(deadline: float, job_id: str, timeout: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"job {job_id} has no verdict after {timeout} s")
    return remaining


class _Base:
    def __init__(self, api_key: str, timeout: float, server_wait: float) -> None:
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = timeout
        self._server_wait = server_wait

    def _request_args(self, call: _Call) -> dict[str, Any]:
        # A waiting request may take as long as it asked the server to wait, plus the usual.
        return {
            "method": call.method,
            "url": call.url,
            "json": call.json,
            "params": call.params,
            "timeout": self._timeout + call.wait,
        }


class AppAttestClient(_Base):
    """Synchronous client of the producer's HTTP API; use it as a context manager or close it.

    ``transport`` replaces httpx's network transport (tests, proxies); ``server_wait`` is how
    long one waiting request asks the server to hold on (at most its max_wait_seconds).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        server_wait: float = DEFAULT_SERVER_WAIT,
    ) -> None:
        super().__init__(api_key, timeout, server_wait)
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
        return _checked(self._http.request(**self._request_args(call)))

    def create_challenge(self, purpose: PurposeName, key_id: str | None = None) -> IssuedChallenge:
        """Issue a one-time challenge for ``registration`` or ``assertion``, optionally bound
        to one keyId."""
        return IssuedChallenge.model_validate(self._send(_challenge_call(purpose, key_id)).json())

    def submit_attestation(self, body: Body) -> str:
        """Queue a registration (the plugin's attestation body); return the job id."""
        return _job_id(self._send(_attestation_call(body)))

    def submit_assertion(self, body: Body, *, challenge: str | None = None) -> str:
        """Queue an assertion; ``challenge`` names the issued challenge its payload embeds
        (without it, the payload itself is the challenge). Returns the job id."""
        return _job_id(self._send(_assertion_call(body, challenge)))

    def submit_many(self, jobs: Sequence[tuple[JobType, Body]]) -> list[BatchJob]:
        """Queue ``("attestation"|"assertion", body)`` pairs in one request; return one entry
        per pair, in order: queued with a job id, or rejected with an error."""
        response = self._send(_batch_call(jobs))
        return _Batch.validate_python(response.json()["jobs"])

    def get_job(self, job_id: str, *, wait: float | None = None) -> JobStatus:
        """The job's status; with ``wait``, the server holds on up to that many seconds."""
        return JobStatus.model_validate(self._send(_job_call(job_id, wait)).json())

    def get_jobs(self, job_ids: Sequence[str], *, wait: float | None = None) -> list[JobStatus]:
        """The statuses of several jobs in one request (as many as the server's batch limit);
        with ``wait``, the server holds on until all are done or that many seconds passed."""
        return _Statuses.validate_python(self._send(_jobs_call(job_ids, wait)).json()["jobs"])

    def wait_many(
        self, job_ids: Sequence[str], timeout: float = 60.0, *, chunk: int = 1000
    ) -> dict[str, VerificationResult]:
        """Wait for the verdicts of many jobs, ``chunk`` per request; return them by job id.
        Raises ``TimeoutError`` when some are still pending after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        found: dict[str, VerificationResult] = {}
        pending = list(dict.fromkeys(job_ids))
        while pending:
            wait = min(_pending_after(deadline, len(pending), timeout), self._server_wait)
            for start in range(0, len(pending), chunk):
                for status in self.get_jobs(pending[start : start + chunk], wait=wait):
                    if status.result is not None:
                        found[status.job_id] = status.result
            pending = [job_id for job_id in pending if job_id not in found]
        return found

    def wait(self, job_id: str, timeout: float = 30.0) -> VerificationResult:
        """Wait for the job's verdict, asking the server to hold on, until ``timeout`` seconds
        have passed; then raise ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            wait = min(_remaining(deadline, job_id, timeout), self._server_wait)
            status = self.get_job(job_id, wait=wait)
            if status.result is not None:
                return status.result

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
    ) -> None:
        super().__init__(api_key, timeout, server_wait)
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
        return _checked(await self._http.request(**self._request_args(call)))

    async def create_challenge(
        self, purpose: PurposeName, key_id: str | None = None
    ) -> IssuedChallenge:
        """See ``AppAttestClient.create_challenge``."""
        response = await self._send(_challenge_call(purpose, key_id))
        return IssuedChallenge.model_validate(response.json())

    async def submit_attestation(self, body: Body) -> str:
        """See ``AppAttestClient.submit_attestation``."""
        return _job_id(await self._send(_attestation_call(body)))

    async def submit_assertion(self, body: Body, *, challenge: str | None = None) -> str:
        """See ``AppAttestClient.submit_assertion``."""
        return _job_id(await self._send(_assertion_call(body, challenge)))

    async def submit_many(self, jobs: Sequence[tuple[JobType, Body]]) -> list[BatchJob]:
        """See ``AppAttestClient.submit_many``."""
        response = await self._send(_batch_call(jobs))
        return _Batch.validate_python(response.json()["jobs"])

    async def get_job(self, job_id: str, *, wait: float | None = None) -> JobStatus:
        """See ``AppAttestClient.get_job``."""
        return JobStatus.model_validate((await self._send(_job_call(job_id, wait))).json())

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
            for start in range(0, len(pending), chunk):
                for status in await self.get_jobs(pending[start : start + chunk], wait=wait):
                    if status.result is not None:
                        found[status.job_id] = status.result
            pending = [job_id for job_id in pending if job_id not in found]
        return found

    async def wait(self, job_id: str, timeout: float = 30.0) -> VerificationResult:
        """See ``AppAttestClient.wait``."""
        deadline = time.monotonic() + timeout
        while True:
            wait = min(_remaining(deadline, job_id, timeout), self._server_wait)
            status = await self.get_job(job_id, wait=wait)
            if status.result is not None:
                return status.result

    async def verify_attestation(self, body: Body, timeout: float = 30.0) -> VerificationResult:
        """See ``AppAttestClient.verify_attestation``."""
        return await self.wait(await self.submit_attestation(body), timeout)

    async def verify_assertion(
        self, body: Body, *, challenge: str | None = None, timeout: float = 30.0
    ) -> VerificationResult:
        """See ``AppAttestClient.verify_assertion``."""
        return await self.wait(await self.submit_assertion(body, challenge=challenge), timeout)
