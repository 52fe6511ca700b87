"""The producer's queue shell: checks plugin bodies against the contract, sends them to the
verify task and reads verdicts back from the result backend.

No cryptography happens here and nothing is decoded: the worker decides. The producer only
refuses what could never be judged (not the contract, not iOS App Attest) so that callers learn
about it at once instead of from a verdict.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, Literal

import anyio.to_thread
from celery import Celery, states
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError

from producer.batching import MicroBatcher, batch_of, new_batch
from producer.errors import QueueUnavailable, validation_summary
from producer.schemas import BatchItem, JobStatus, JobType
from worker.celery_app import VERIFY_BATCH_TASK, VERIFY_TASK
from worker.contract import (
    FORMAT_APPLE_APP_ATTEST,
    PLATFORM_IOS,
    AssertionRequest,
    Kind,
    PluginRequest,
    RegistrationRequest,
    VerificationResult,
    parse_request,
)
from worker.core import Reason, Rejected
from worker.ledger import Ledger, ledger_for, publish_task

log = logging.getLogger("appattest.producer")

PluginBody = str | bytes | Mapping[str, Any] | RegistrationRequest | AssertionRequest

# Polling the result backend: start fast (most verdicts take milliseconds), back off to a
# modest ceiling so that a slow job costs a few reads per second, not hundreds.
FIRST_POLL_DELAY: Final = 0.005
# Finished batches kept decoded in memory (at most 200 verdicts each).
_FINISHED_BATCHES: Final = 512
MAX_POLL_DELAY: Final = 0.1

# Errors meaning "the broker or the result backend is not reachable", whatever the backend.
_UNREACHABLE: Final[tuple[type[BaseException], ...]] = (
    KombuOperationalError,
    RedisConnectionError,
    RedisTimeoutError,
    SQLAlchemyOperationalError,
    OSError,
)


def check_request(body: PluginBody, *, expected: Kind | None = None) -> PluginRequest:
    """Validate a plugin body as far as the producer can without decoding anything.

    Takes JSON text, a decoded object or a contract model, and optionally the kind the caller
    expects. Returns the validated request. Raises ``Rejected`` with ``invalid_request`` for
    anything that is not the contract, for a body of the other kind, and for an assertion
    whose ``challenge`` is not in its payload; with ``unsupported_format`` for anything but iOS
    App Attest (the plugin's Android and web fallbacks included).
    """
    if isinstance(body, RegistrationRequest | AssertionRequest):
        request: PluginRequest = body
    elif isinstance(body, Mapping):
        request = parse_request(dict(body))
    else:
        request = parse_request(body)
    kind: Kind = "assertion" if isinstance(request, AssertionRequest) else "registration"
    if expected is not None and kind != expected:
        raise Rejected(Reason.INVALID_REQUEST, f"expected a {expected} body, got a {kind} body")
    # A plain comparison of the claims; the worker checks them again along with everything else.
    if request.platform != PLATFORM_IOS or request.format != FORMAT_APPLE_APP_ATTEST:
        raise Rejected(
            Reason.UNSUPPORTED_FORMAT,
            f"only platform {PLATFORM_IOS!r} with format {FORMAT_APPLE_APP_ATTEST!r} is supported",
        )
    if (
        isinstance(request, AssertionRequest)
        and request.challenge is not None
        and request.challenge not in request.payload
    ):
        raise Rejected(Reason.INVALID_REQUEST, "payload does not contain the given challenge")
    return request


KIND_OF_TYPE: Final[dict[JobType, Kind]] = {
    "attestation": "registration",
    "assertion": "assertion",
}


def check_batch_item(item: object) -> PluginRequest:
    """Check one batch item, ``{"type": "attestation"|"assertion", "body": {...}}``, like a
    single submission of that type. Returns the request; raises ``Rejected`` like
    ``check_request``."""
    try:
        parsed = BatchItem.model_validate(item)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise Rejected(Reason.INVALID_REQUEST, validation_summary(errors)) from exc
    return check_request(parsed.body, expected=KIND_OF_TYPE[parsed.type])


def plugin_json(request: PluginRequest) -> dict[str, Any]:
    """The request as the plugin's JSON object, the form the verify task takes."""
    return request.model_dump(mode="json", by_alias=True, exclude_none=True)


def _internal_error(detail: str) -> VerificationResult:
    return VerificationResult.rejection(
        kind=None, key_id=None, reason=Reason.INTERNAL_ERROR, detail=detail
    )


def _poll_delays() -> Iterator[float]:
    delay = FIRST_POLL_DELAY
    while True:
        yield delay
        delay = min(delay * 2, MAX_POLL_DELAY)


class JobQueue:
    """Sends verification jobs through a Celery app and reads their verdicts by polling.

    Results are read with ``backend.get_task_meta``, never with ``AsyncResult.get()``, which
    would wait on a pub/sub subscription per job. Every method raises ``QueueUnavailable``
    when the broker or the result backend cannot be reached.
    """

    def __init__(
        self,
        celery_app: Celery,
        *,
        batch_window: float = 0.002,
        max_batch: int = 200,
        ledger: Ledger | Literal["auto"] | None = "auto",
    ) -> None:
        self.celery_app = celery_app
        # Every published job is entered in the ledger first when the broker is Redis, whose
        # transport can lose a message taken off the queue as the server dies.
        self.ledger = ledger_for(celery_app) if ledger == "auto" else ledger
        self.max_batch = max_batch
        # Single submissions arriving together (a burst of HTTP requests) share one message.
        self._batcher: MicroBatcher[PluginRequest] = MicroBatcher(
            self._submit_chunk, window=batch_window, max_size=max_batch
        )
        # Finished batches, decoded once: a batch's result is immutable once written, and
        # reading it again (and decoding every verdict in it) for each of its jobs would cost
        # the producer far more than the verification cost the worker.
        self._finished: OrderedDict[str, list[Any]] = OrderedDict()
        self._finished_lock = threading.Lock()

    def close(self) -> None:
        """Release the ledger's connections."""
        if self.ledger is not None:
            self.ledger.close()

    def _unreachable(self) -> tuple[type[BaseException], ...]:
        extra = getattr(self.celery_app.backend, "connection_errors", ())
        return _UNREACHABLE + tuple(extra)

    def _send_batch(self, requests: Sequence[PluginRequest], producer: Any) -> list[str]:
        """Publish one batch message for these requests; return their job ids."""
        batch_id, job_ids = new_batch(len(requests))
        jobs = [
            {"jobId": job_id, "body": plugin_json(request)}
            for job_id, request in zip(job_ids, requests, strict=True)
        ]
        self._publish(producer, VERIFY_BATCH_TASK, batch_id, {"jobs": jobs})
        return job_ids

    def _publish(self, producer: Any, task: str, task_id: str, job: dict[str, Any]) -> None:
        """Enter the job in the ledger, then publish it (see ``worker.ledger``).

        With a ledger, the entry is what accepts the job: a publish that fails after it leaves
        the job to the ledger's sweep (it is sent within ``APPATTEST_LEDGER_RESEND_SECONDS``)
        rather than refusing a job that may already be queued.
        """
        if self.ledger is None:
            publish_task(self.celery_app, producer, task, task_id, job)
            return
        self.ledger.record([(task_id, task, job)])
        try:
            publish_task(self.celery_app, producer, task, task_id, job)
        except self._unreachable() as exc:
            log.warning(
                "task %s: publish failed (%s); the ledger will send it", task_id, type(exc).__name__
            )

    def _submit_chunk(self, requests: Sequence[PluginRequest]) -> list[str]:
        try:
            with self.celery_app.producer_or_acquire() as producer:
                return self._send_batch(requests, producer)
        except self._unreachable() as exc:
            raise QueueUnavailable(f"the broker is unavailable ({type(exc).__name__})") from exc

    def _send(self, request: PluginRequest, producer: Any) -> str:
        job_id = str(uuid.uuid4())
        while batch_of(job_id) is not None:  # never mistaken for a batch job (1 in 65,536)
            job_id = str(uuid.uuid4())
        self._publish(producer, VERIFY_TASK, job_id, {"body": plugin_json(request)})
        return job_id

    def submit(self, request: PluginRequest) -> str:
        """Queue one validated request; return its job id (a UUID string).

        Requests submitted together from several threads travel in one batch message; each
        caller waits at most the batching window before its job is queued.
        """
        return self._batcher.submit(request)

    def submit_many(self, requests: Sequence[PluginRequest]) -> list[str]:
        """Queue several validated requests in batch messages; return their job ids.

        When the broker fails midway, the batches sent before the failure stay queued.
        """
        job_ids: list[str] = []
        for start in range(0, len(requests), self.max_batch):
            job_ids += self._submit_chunk(requests[start : start + self.max_batch])
        return job_ids

    def submit_one(self, request: PluginRequest) -> str:
        """Queue one request as a task of its own, outside any batch."""
        try:
            with self.celery_app.producer_or_acquire() as producer:
                return self._send(request, producer)
        except self._unreachable() as exc:
            raise QueueUnavailable(f"the broker is unavailable ({type(exc).__name__})") from exc

    def _meta(self, job_id: str) -> dict[str, Any]:
        """The task state of a job: its batch's, narrowed to the job, or its own."""
        backend = self.celery_app.backend
        located = batch_of(job_id)
        if located is not None:
            batch_id, index = located
            with self._finished_lock:
                results = self._finished.get(batch_id)
            if results is None:
                meta: dict[str, Any] = backend.get_task_meta(batch_id, cache=False)
                if meta.get("status") in states.READY_STATES - {states.SUCCESS}:
                    return meta
                if meta.get("status") == states.SUCCESS:
                    results = list((meta.get("result") or {}).get("results") or [])
                    with self._finished_lock:
                        self._finished[batch_id] = results
                        while len(self._finished) > _FINISHED_BATCHES:
                            self._finished.popitem(last=False)
            if results is not None:
                if index < len(results):
                    return {"status": states.SUCCESS, "result": results[index]}
                return {"status": states.FAILURE, "result": None}
            # A pending batch: its jobs were never sent on their own (see ``submit_one``).
            return {"status": states.PENDING, "result": None}
        own: dict[str, Any] = backend.get_task_meta(job_id, cache=False)
        return own

    def status(self, job_id: str) -> JobStatus:
        """Where the job stands now. An unknown job id is indistinguishable from a pending one.

        A job that failed in the worker (which the verify task never lets happen: it turns
        every error into a verdict) is reported as done with an ``internal_error`` verdict.
        """
        try:
            meta = self._meta(job_id)
        except NotImplementedError as exc:
            # Celery's DisabledBackend: the app was configured without a result backend.
            raise QueueUnavailable("no result backend is configured") from exc
        except self._unreachable() as exc:
            raise QueueUnavailable(
                f"the result backend is unavailable ({type(exc).__name__})"
            ) from exc
        state = meta.get("status")
        if state == states.SUCCESS:
            try:
                result = VerificationResult.model_validate(meta.get("result"))
            except ValidationError:
                log.error("job %s: the stored result is not a verdict", job_id)
                result = _internal_error("the worker returned an unreadable result")
            return JobStatus(jobId=job_id, status="done", result=result)
        if state in states.READY_STATES:
            log.error("job %s ended in state %s", job_id, state)
            return JobStatus(
                jobId=job_id,
                status="done",
                result=_internal_error(f"the job ended in state {state}"),
            )
        return JobStatus(jobId=job_id, status="pending")

    def statuses(self, job_ids: Sequence[str]) -> list[JobStatus]:
        """The status of each job; the jobs of one batch cost one read of the backend."""
        pending_batches: set[str] = set()
        found: list[JobStatus] = []
        for job_id in job_ids:
            located = batch_of(job_id)
            if located is not None and located[0] in pending_batches:
                found.append(JobStatus(jobId=job_id, status="pending"))
                continue
            status = self.status(job_id)
            if located is not None and not status.done:
                pending_batches.add(located[0])
            found.append(status)
        return found

    async def wait_many_async(self, job_ids: Sequence[str], timeout: float) -> list[JobStatus]:
        """Poll until every job is done or ``timeout`` seconds passed; return the statuses."""
        deadline = time.monotonic() + timeout
        delays = _poll_delays()
        while True:
            found = await anyio.to_thread.run_sync(self.statuses, job_ids)
            remaining = deadline - time.monotonic()
            if all(status.done for status in found) or remaining <= 0:
                return found
            await anyio.sleep(min(next(delays), remaining))

    def wait(self, job_id: str, timeout: float) -> JobStatus:
        """Poll until the job is done or ``timeout`` seconds passed; return its last status."""
        deadline = time.monotonic() + timeout
        delays = _poll_delays()
        while True:
            status = self.status(job_id)
            remaining = deadline - time.monotonic()
            if status.done or remaining <= 0:
                return status
            time.sleep(min(next(delays), remaining))

    async def wait_async(self, job_id: str, timeout: float) -> JobStatus:
        """Like ``wait``, for an event loop: each read runs in a worker thread, and the pauses
        between reads sleep on the loop, so a long wait holds no thread."""
        deadline = time.monotonic() + timeout
        delays = _poll_delays()
        while True:
            status = await anyio.to_thread.run_sync(self.status, job_id)
            remaining = deadline - time.monotonic()
            if status.done or remaining <= 0:
                return status
            await anyio.sleep(min(next(delays), remaining))
