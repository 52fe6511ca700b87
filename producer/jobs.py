"""The producer's queue shell: checks plugin bodies against the contract, sends them to the
verify task and reads verdicts back from the result backend.

No cryptography happens here and nothing is decoded: the worker decides. The producer only
refuses what could never be judged (not the contract, not iOS App Attest) so that callers learn
about it at once instead of from a verdict.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
import weakref
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
from worker.celery_app import VERIFY_BATCH_TASK, VERIFY_TASK, read_task_metas
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
        self._watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watcher] = (
            weakref.WeakKeyDictionary()
        )
        self._watchers_lock = threading.Lock()

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

    def _finished_batch(self, batch_id: str) -> list[Any] | None:
        with self._finished_lock:
            return self._finished.get(batch_id)

    def _job_meta(self, job_id: str, metas: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """The task state of a job: its batch's, narrowed to the job, or its own; ``metas``
        holds the stored states read for it (none for a batch already known finished)."""
        located = batch_of(job_id)
        if located is None:
            return metas[job_id]
        batch_id, index = located
        results = self._finished_batch(batch_id)
        if results is None:
            meta = metas[batch_id]
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

    def _status_of(self, job_id: str, meta: dict[str, Any]) -> JobStatus:
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

    def status(self, job_id: str) -> JobStatus:
        """Where the job stands now. An unknown job id is indistinguishable from a pending one.

        A job that failed in the worker (which the verify task never lets happen: it turns
        every error into a verdict) is reported as done with an ``internal_error`` verdict.
        """
        [status] = self.statuses([job_id])
        return status

    def statuses(self, job_ids: Sequence[str]) -> list[JobStatus]:
        """The status of each job, as ``status`` tells it, from one read of the result
        backend for all of them (a batch's jobs share its one stored result)."""
        wanted: dict[str, None] = {}
        for job_id in job_ids:
            located = batch_of(job_id)
            if located is None:
                wanted[job_id] = None
            elif self._finished_batch(located[0]) is None:
                wanted[located[0]] = None
        try:
            metas = read_task_metas(self.celery_app.backend, list(wanted))
            return [self._status_of(j, self._job_meta(j, metas)) for j in job_ids]
        except NotImplementedError as exc:
            # Celery's DisabledBackend: the app was configured without a result backend.
            raise QueueUnavailable("no result backend is configured") from exc
        except self._unreachable() as exc:
            raise QueueUnavailable(
                f"the result backend is unavailable ({type(exc).__name__})"
            ) from exc

    async def wait_many_async(self, job_ids: Sequence[str], timeout: float) -> list[JobStatus]:
        """Wait until every job is done or ``timeout`` seconds passed; return the statuses.

        Every request waiting in this process is served by one watcher per event loop, which
        reads the statuses of all awaited jobs together (one backend read per tick), so a
        thousand waiting requests cost what one does; a long wait holds no thread."""
        loop = asyncio.get_running_loop()
        with self._watchers_lock:
            watcher = self._watchers.get(loop)
            if watcher is None:
                watcher = self._watchers[loop] = _Watcher(self)
        return await watcher.wait(list(job_ids), timeout)

    async def wait_async(self, job_id: str, timeout: float) -> JobStatus:
        """Like ``wait``, for an event loop (see ``wait_many_async``)."""
        [status] = await self.wait_many_async([job_id], timeout)
        return status

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


class _Watcher:
    """Waits for the verdicts of the jobs awaited on one event loop: while any job is awaited,
    a single task reads all their statuses together (in a worker thread), then sleeps a short
    poll interval that grows while nothing changes, and resolves each waiter as its jobs
    finish. A backend that cannot be reached fails every waiter of that read with
    ``QueueUnavailable``."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._waiters: dict[str, list[asyncio.Future[JobStatus]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, job_ids: list[str], timeout: float) -> list[JobStatus]:
        loop = asyncio.get_running_loop()
        futures = {job_id: loop.create_future() for job_id in dict.fromkeys(job_ids)}
        for job_id, future in futures.items():
            self._waiters.setdefault(job_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        try:
            await asyncio.wait(futures.values(), timeout=timeout)
        finally:
            for job_id, future in futures.items():
                waiting = self._waiters.get(job_id)
                if waiting is not None and future in waiting:
                    waiting.remove(future)
                    if not waiting:
                        del self._waiters[job_id]
                future.cancel()
        found: dict[str, JobStatus] = {}
        error: BaseException | None = None
        for job_id, future in futures.items():
            if future.cancelled():
                found[job_id] = JobStatus(jobId=job_id, status="pending")
            elif future.exception() is not None:
                error = future.exception()
            else:
                found[job_id] = future.result()
        if error is not None:
            raise error
        return [found[job_id] for job_id in job_ids]

    async def _run(self) -> None:
        delays = _poll_delays()
        while self._waiters:
            job_ids = list(self._waiters)
            try:
                found = await anyio.to_thread.run_sync(self.queue.statuses, job_ids)
            except QueueUnavailable as exc:
                for waiting in self._waiters.values():
                    for future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                self._waiters.clear()
                return
            progressed = False
            for status in found:
                if status.done:
                    for future in self._waiters.pop(status.job_id, []):
                        if not future.done():
                            future.set_result(status)
                    progressed = True
            if progressed or len(job_ids) != len(self._waiters):
                delays = _poll_delays()  # verdicts are flowing: keep reading often
            await asyncio.sleep(next(delays))
