"""The producer's queue shell: checks plugin bodies against the contract, sends them to the
verify task and reads verdicts back from the result backend.

No cryptography happens here and nothing is decoded: the worker decides. The producer only
refuses what could never be judged (not the contract, not iOS App Attest) so that callers learn
about it at once instead of from a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, Literal, TypeVar

import anyio.to_thread
from celery import Celery, states
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError, InterfaceError
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from producer.batching import (
    MicroBatcher,
    Owner,
    batch_day,
    new_batch_id,
    open_job_id,
    seal_job_id,
)
from producer.errors import ErrorCode, QueueUnavailable, validation_summary
from producer.schemas import BatchItem, ErrorDetail, JobStatus, JobType
from producer.wakeups import result_wakeups
from worker.contract import (
    PLATFORM_ANDROID,
    SUPPORTED_FORMATS,
    AssertionRequest,
    Kind,
    PluginRequest,
    Reason,
    RegistrationRequest,
    Rejected,
    VerificationResult,
    parse_request,
)
from worker.queue.ledger import Ledger, ledger_for
from worker.queue.logs import request_id_var
from worker.queue.messaging import (
    Message,
    VerifyAndroidBatch,
    VerifyBatch,
    VerifyJob,
    publish,
    read_task_metas,
)
from worker.store import bulk, idempotency

log = logging.getLogger("appattest.producer")

_T = TypeVar("_T")

PluginBody = str | bytes | Mapping[str, Any] | RegistrationRequest | AssertionRequest

# Polling the result backend: start fast (most verdicts take milliseconds), back off to a
# modest ceiling so that a slow job costs a few reads per second, not hundreds.
FIRST_POLL_DELAY: Final = 0.005
# Finished batches kept decoded in memory (at most 200 verdicts each).
_FINISHED_BATCHES: Final = 512
MAX_POLL_DELAY: Final = 0.1
# While every awaited batch is subscribed to (``producer.wakeups``), a stored result wakes the
# waiting requests, and polls only catch what no message announces (a lost message needs a
# broken connection, which is noticed; a verdict only the store has is consulted once a
# second anyway): they back off to this ceiling instead.
SUBSCRIBED_POLL_CEILING: Final = 1.0
# A woken read comes at least this long after the previous read, unless every awaited job's
# result was announced, so that under load one read serves many batches, as one poll did.
_WOKEN_READ_SPACING: Final = FIRST_POLL_DELAY

# Errors meaning "the broker or the result backend is not reachable", whatever the backend.
_UNREACHABLE: Final[tuple[type[BaseException], ...]] = (
    KombuOperationalError,
    RedisConnectionError,
    RedisTimeoutError,
    SQLAlchemyOperationalError,
    OSError,
)
# Errors meaning "the store is not reachable".
_STORE_DOWN: Final[tuple[type[BaseException], ...]] = (
    SQLAlchemyOperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeoutError,
)
# How long a batch may be in the ledger before a status read looks for its jobs in the store
# too (a verdict whose result write is retrying); younger batches are just on their way.
_HELD_LOOKUP_AFTER: Final = 5.0
# How often a waiting request consults the store for jobs that no result names.
_STORE_CONSULT_SECONDS: Final = 1.0


def check_request(body: PluginBody, *, expected: Kind | None = None) -> PluginRequest:
    """Validate a plugin body as far as the producer can without decoding anything.

    Takes JSON text, a decoded object or a contract model, and optionally the kind the caller
    expects. Returns the validated request. Raises ``Rejected`` with ``invalid_request`` for
    anything that is not the contract, for a body of the other kind, and for an assertion
    whose ``challenge`` is not in its payload; with ``unsupported_format`` for anything but iOS
    App Attest and Android Play Integrity (the plugin's web fallback included).
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
    if (request.platform, request.format) not in SUPPORTED_FORMATS:
        supported = ", ".join(f"{p} {f}" for p, f in sorted(SUPPORTED_FORMATS))
        raise Rejected(Reason.UNSUPPORTED_FORMAT, f"only {supported} are supported")
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


def check_batch_item(item: object) -> tuple[PluginRequest, str | None]:
    """Check one batch item, ``{"type": "attestation"|"assertion", "body": {...},
    "idempotencyKey"?}``, like a single submission of that type. Returns the request and the
    item's idempotency key; raises ``Rejected`` like ``check_request``."""
    try:
        parsed = BatchItem.model_validate(item)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise Rejected(Reason.INVALID_REQUEST, validation_summary(errors)) from exc
    return check_request(parsed.body, expected=KIND_OF_TYPE[parsed.type]), parsed.idempotency_key


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


def request_hash(request: PluginRequest) -> bytes:
    """What an idempotent retry must repeat: the kind of job and its plugin body."""
    kind = "assertion" if isinstance(request, AssertionRequest) else "registration"
    canonical = json.dumps(
        [kind, plugin_json(request)], sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode("ascii")).digest()


def _key_hash(idempotency_key: str) -> bytes:
    return hashlib.sha256(b"idempotency-key:" + idempotency_key.encode("utf-8")).digest()


class IdempotencyConflict(Exception):
    """An idempotency key was used before with another body."""


@dataclass(frozen=True)
class Submission:
    """One job to queue: the validated request, who submits it, and optionally the caller's
    idempotency key."""

    request: PluginRequest
    owner: Owner
    idempotency_key: str | None = None
    # The X-Request-ID of the HTTP request that submitted it (log correlation).
    request_id: str | None = field(default_factory=request_id_var.get)


@dataclass(frozen=True)
class Outcome:
    """What became of a submission: accepted with a job id (``replayed`` when an earlier
    submission with the same idempotency key created it), or refused with an error."""

    job_id: str | None = None
    replayed: bool = False
    error: ErrorDetail | None = None


def _refused(code: ErrorCode, detail: str) -> Outcome:
    return Outcome(error=ErrorDetail(code=code.value, detail=detail))


def _not_found(job_id: str) -> JobStatus:
    detail = "no job with this id was accepted for this API key, or its record expired"
    error = ErrorDetail(code=ErrorCode.JOB_NOT_FOUND.value, detail=detail)
    return JobStatus(jobId=job_id, status="not_found", error=error)


def _expired(job_id: str) -> JobStatus:
    detail = (
        "the job was accepted longer ago than the verdict retention, and its verdict was purged"
    )
    error = ErrorDetail(code=ErrorCode.JOB_EXPIRED.value, detail=detail)
    return JobStatus(jobId=job_id, status="not_found", error=error)


def _lost(job_id: str) -> JobStatus:
    detail = (
        "the job was accepted, but its queue message was lost with the broker's data and no "
        "verdict exists; submit it again"
    )
    return JobStatus(
        jobId=job_id, status="lost", error=ErrorDetail(code=ErrorCode.JOB_LOST.value, detail=detail)
    )


class JobQueue:
    """Sends verification jobs through a Celery app and reads their verdicts.

    Jobs travel in batch messages (``producer.batching``); each job id is sealed for the owner
    that submitted it, and only that owner's lookups find it. Verdicts are read from the result
    backend, polled (never ``AsyncResult.get()``, which would wait on a pub/sub subscription
    per job) or, with Redis, as soon as the backend announces them (one subscription per batch
    awaited, see ``wait_many_async``); a job the result backend does not know is looked up in
    the store's ``verdicts`` table, the durable record, when the queue has ``sessions``.
    Idempotency keys need ``sessions`` too. Every method raises ``QueueUnavailable`` when the
    broker or the result backend cannot be reached.
    """

    def __init__(
        self,
        celery_app: Celery,
        *,
        sessions: sessionmaker[Session] | None = None,
        owner: Owner | None = None,
        idempotency_ttl: float = 86_400.0,
        batch_window: float = 0.002,
        max_batch: int = 200,
        ledger: Ledger | Literal["auto"] | None = "auto",
        verdict_retention_days: int = 0,
    ) -> None:
        self.celery_app = celery_app
        # Verdicts older than this many days are purged (0: kept); a job older than that and
        # found nowhere answers job_expired, not lost.
        self.verdict_retention_days = verdict_retention_days
        self.sessions = sessions
        # The owner of jobs submitted without one (direct Python callers).
        self.owner = owner if owner is not None else Owner.ephemeral("direct")
        self.idempotency_ttl = idempotency_ttl
        # Every published job is entered in the ledger first when the broker is Redis, whose
        # transport can lose a message taken off the queue as the server dies.
        self.ledger = ledger_for(celery_app) if ledger == "auto" else ledger
        self.max_batch = max_batch
        # Single submissions arriving together (a burst of HTTP requests) share one message.
        self._batcher: MicroBatcher[Submission, Outcome] = MicroBatcher(
            self._submit_chunk, window=batch_window, max_size=max_batch
        )
        # Finished batches, decoded once: a batch's result is immutable once written, and
        # reading it again (and decoding every verdict in it) for each of its jobs would cost
        # the producer far more than the verification cost the worker.
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._finished_lock = threading.Lock()
        self._watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watcher] = (
            weakref.WeakKeyDictionary()
        )
        self._watchers_lock = threading.Lock()

    def close(self) -> None:
        """Release the ledger's connections."""
        if self.ledger is not None:
            self.ledger.close()

    async def aclose(self) -> None:
        """Release what waiting holds on the running event loop: its watcher's pub/sub
        connection (see ``wait_many_async``). Waits that follow on this loop poll."""
        with self._watchers_lock:
            watcher = self._watchers.get(asyncio.get_running_loop())
        if watcher is not None:
            await watcher.aclose()

    def _unreachable(self) -> tuple[type[BaseException], ...]:
        extra = getattr(self.celery_app.backend, "connection_errors", ())
        return _UNREACHABLE + tuple(extra)

    # Submitting ----------------------------------------------------------------------------

    def _publish(self, producer: Any, task_id: str, message: Message) -> None:
        """Publish through ``worker.queue.messaging.publish``, the ledger included.

        With a ledger, the entry is what accepts the job: a publish that fails after it leaves
        the job to the ledger's sweep (it is sent within ``APPATTEST_LEDGER_RESEND_SECONDS``)
        rather than refusing a job that may already be queued.
        """
        sent = publish(
            self.celery_app,
            task_id,
            message,
            ledger=self.ledger,
            producer=producer,
            unreachable=self._unreachable(),
        )
        if not sent:
            log.warning("task %s: publish failed; the ledger will send it", task_id)

    def _publish_jobs(
        self,
        producer: Any,
        batch_id: str,
        submissions: Sequence[Submission],
        job_ids: Sequence[str],
        positions: Sequence[int],
        message: type[VerifyBatch | VerifyAndroidBatch] = VerifyBatch,
    ) -> None:
        """Publish one batch message (of type ``message``) for the submissions at
        ``positions``."""
        if not positions:
            return
        jobs = tuple(
            VerifyJob(
                job_id=job_ids[i],
                body=plugin_json(submissions[i].request),
                submitted_by=submissions[i].owner.name,
                request_id=submissions[i].request_id,
            )
            for i in positions
        )
        self._publish(producer, batch_id, message(jobs=jobs))

    def _send_batch(
        self,
        submissions: Sequence[Submission],
        producer: Any,
        message: type[VerifyBatch | VerifyAndroidBatch] = VerifyBatch,
    ) -> list[Outcome]:
        """Publish one batch message (of type ``message``) for these submissions; return their
        outcomes.

        Idempotency keys are claimed in a transaction that commits only once the batch is in
        the ledger (or published): a concurrent request with the same key waits for it, and
        never sees a job that is not yet on its way. When the publish fails, the claims stay
        with a ledger (a retry answers with the job if its entry was written after all, and
        replaces it, found lost, if not) and roll back without one."""
        batch_id = new_batch_id()
        job_ids = [seal_job_id(s.owner, batch_id, i) for i, s in enumerate(submissions)]
        outcomes = [Outcome(job_id=job_id) for job_id in job_ids]
        keyed = [i for i, s in enumerate(submissions) if s.idempotency_key is not None]
        plain = [i for i, s in enumerate(submissions) if s.idempotency_key is None]
        if not keyed:
            self._publish_jobs(producer, batch_id, submissions, job_ids, plain, message)
            return outcomes
        if self.sessions is None:
            for i in keyed:
                outcomes[i] = _refused(
                    ErrorCode.INVALID_REQUEST, "idempotency keys need the service's store"
                )
            self._publish_jobs(producer, batch_id, submissions, job_ids, plain, message)
            return outcomes
        published = False
        refused: BaseException | None = None
        try:
            with self.sessions() as session, session.begin():
                send = self._claim_keys(session, submissions, job_ids, outcomes)
                try:
                    self._publish_jobs(
                        producer, batch_id, submissions, job_ids, sorted(send), message
                    )
                except self._unreachable() as exc:
                    if self.ledger is None:
                        raise  # nothing was queued: the claims roll back
                    # The ledger write failed, or its reply was lost after it was written. The
                    # claims stay: a retry with the same key finds the job in the ledger and
                    # answers with it, or finds it nowhere (lost) and creates it anew.
                    refused = exc
                else:
                    published = True
        except _STORE_DOWN as exc:
            if published:
                # Queued, but the claims may not have been recorded: the jobs stand (a retry
                # with the same key would create another job).
                log.warning(
                    "batch %s queued, but its idempotency keys may not be recorded: %s",
                    batch_id,
                    type(exc).__name__,
                )
                return outcomes
            log.warning("idempotency keys not recorded: the store is down (%s)", type(exc).__name__)
            for i in keyed:
                outcomes[i] = _refused(
                    ErrorCode.SERVICE_UNAVAILABLE, "the store is unavailable; try again later"
                )
            self._publish_jobs(producer, batch_id, submissions, job_ids, plain, message)
        if refused is not None:
            raise refused
        return outcomes

    def _claim_keys(
        self,
        session: Session,
        submissions: Sequence[Submission],
        job_ids: list[str],
        outcomes: list[Outcome],
    ) -> set[int]:
        """Claim the idempotency keys of the chunk in ``session``; return the positions to
        publish. Sets the outcome of every submission whose key is held (a replay or a
        conflict)."""
        send = {i for i, s in enumerate(submissions) if s.idempotency_key is None}
        keyed = [i for i, s in enumerate(submissions) if s.idempotency_key is not None]
        first: dict[tuple[str, bytes], int] = {}
        repeats: dict[int, int] = {}
        for i in keyed:
            pair = (submissions[i].owner.name, _key_hash(submissions[i].idempotency_key or ""))
            if pair in first:
                repeats[i] = first[pair]
            else:
                first[pair] = i
        hashes = {i: request_hash(submissions[i].request) for i in keyed}
        claims = [
            idempotency.IdempotencyClaim(owner, key_hash, hashes[i], job_ids[i])
            for (owner, key_hash), i in first.items()
        ]
        now = datetime.now(UTC)
        held = idempotency.claim(
            session,
            claims,
            now=now,
            expired_before=now - timedelta(seconds=self.idempotency_ttl),
        )
        replays: dict[tuple[str, bytes], tuple[int, str]] = {}
        for pair, i in first.items():
            found = held.get(pair)
            if found is None:
                send.add(i)
            elif found.request_hash != hashes[i]:
                outcomes[i] = _refused(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    "this Idempotency-Key was used with another body",
                )
            else:
                replays[pair] = (i, found.job_id)
        # Where the replayed jobs stand, in one read for the chunk.
        statuses = self._read(
            [(submissions[i].owner, job_id) for i, job_id in replays.values()],
            consult_store=True,
            session=session,
        )
        for (pair, (i, job_id)), status in zip(replays.items(), statuses, strict=True):
            if status.status != "lost":
                outcomes[i] = Outcome(job_id=job_id, replayed=True)
            elif idempotency.replace_job(
                session, *pair, old_job_id=job_id, new_job_id=job_ids[i], now=now
            ):
                # Accepted before, but its message was lost with the broker's data (the job
                # is buried: no late delivery can decide it now). The key moves to a fresh
                # job for this retry.
                send.add(i)
            else:
                # A concurrent retry moved the key first: answer with its job.
                current = idempotency.held_job(session, *pair)
                outcomes[i] = Outcome(job_id=current or job_id, replayed=True)
        for i, j in repeats.items():
            # The same key twice in one chunk: the second answers as a retry of the first.
            if hashes[i] != hashes[j]:
                outcomes[i] = _refused(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    "this Idempotency-Key was used with another body",
                )
            elif outcomes[j].error is not None:
                outcomes[i] = outcomes[j]
            else:
                outcomes[i] = Outcome(job_id=outcomes[j].job_id, replayed=True)
        return send

    def _submit_chunk(self, submissions: Sequence[Submission]) -> list[Outcome]:
        """Publish a chunk: its Android jobs in a ``VerifyAndroidBatch`` on their own queue
        (their workers wait on Google), the others in a ``VerifyBatch``. A mixed chunk is two
        batches, each with its own id; a chunk refused by the broker after its first batch
        was published keeps that batch and refuses the rest's jobs."""
        android = [i for i, s in enumerate(submissions) if s.request.platform == PLATFORM_ANDROID]
        try:
            with self.celery_app.producer_or_acquire() as producer:
                if not android:
                    return self._send_batch(submissions, producer)
                if len(android) == len(submissions):
                    return self._send_batch(submissions, producer, VerifyAndroidBatch)
                chosen = set(android)
                apple = [i for i in range(len(submissions)) if i not in chosen]
                outcomes: list[Outcome | None] = [None] * len(submissions)
                groups: tuple[tuple[list[int], type[VerifyBatch | VerifyAndroidBatch]], ...] = (
                    (apple, VerifyBatch),
                    (android, VerifyAndroidBatch),
                )
                for n, (positions, kind) in enumerate(groups):
                    try:
                        sent = self._send_batch([submissions[i] for i in positions], producer, kind)
                    except self._unreachable() as exc:
                        if n == 0:
                            raise
                        detail = f"the broker is unavailable ({type(exc).__name__}); not accepted"
                        sent = [_refused(ErrorCode.SERVICE_UNAVAILABLE, detail)] * len(positions)
                    for i, outcome in zip(positions, sent, strict=True):
                        outcomes[i] = outcome
                return [outcome for outcome in outcomes if outcome is not None]
        except self._unreachable() as exc:
            raise QueueUnavailable(f"the broker is unavailable ({type(exc).__name__})") from exc

    def _submission(
        self, request: PluginRequest, owner: Owner | None, idempotency_key: str | None
    ) -> Submission:
        return Submission(request, owner or self.owner, idempotency_key)

    def accept(
        self,
        request: PluginRequest,
        *,
        owner: Owner | None = None,
        idempotency_key: str | None = None,
        at_once: bool = False,
    ) -> Outcome:
        """Queue one validated request; return its outcome.

        Requests submitted together from several threads travel in one batch message; each
        caller waits at most the batching window before its job is queued. With ``at_once``
        (a caller that knows it is alone), a job that finds no batch open is sent without
        waiting for company. Raises ``QueueUnavailable`` when the broker cannot be reached
        (nothing was accepted).
        """
        return self._batcher.submit(
            self._submission(request, owner, idempotency_key), at_once=at_once
        )

    async def accept_async(
        self,
        request: PluginRequest,
        *,
        owner: Owner | None = None,
        idempotency_key: str | None = None,
        at_once: bool = False,
    ) -> Outcome:
        """Like ``accept``, on an event loop: the request's coroutine waits for its batch to
        be sent without taking a thread (the batch's first job takes one to send it)."""
        return await self._batcher.submit_async(
            self._submission(request, owner, idempotency_key), at_once=at_once
        )

    def submit(
        self,
        request: PluginRequest,
        *,
        owner: Owner | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Like ``accept``, returning the job id; raises ``IdempotencyConflict`` when the key
        was used with another body and ``QueueUnavailable`` when the job was not accepted."""
        return _job_id_of(self.accept(request, owner=owner, idempotency_key=idempotency_key))

    def submit_one(self, request: PluginRequest, *, owner: Owner | None = None) -> str:
        """Queue one request in a message of its own, outside the micro-batching."""
        return _job_id_of(self._submit_chunk([self._submission(request, owner, None)])[0])

    def accept_many(self, submissions: Sequence[Submission]) -> list[Outcome]:
        """Queue several submissions in batch messages; return their outcomes in order.

        When the broker fails midway, the batches sent before the failure stay accepted and
        every later submission is refused with ``service_unavailable``; when the first batch
        fails, nothing was accepted and ``QueueUnavailable`` is raised.
        """
        outcomes: list[Outcome] = []
        for start in range(0, len(submissions), self.max_batch):
            chunk = submissions[start : start + self.max_batch]
            try:
                outcomes += self._submit_chunk(chunk)
            except QueueUnavailable as exc:
                if start == 0:
                    raise
                refusal = _refused(ErrorCode.SERVICE_UNAVAILABLE, f"{exc}; not accepted")
                outcomes += [refusal] * (len(submissions) - start)
                break
        return outcomes

    def submit_many(
        self, requests: Sequence[PluginRequest], *, owner: Owner | None = None
    ) -> list[str]:
        """Queue several validated requests; return their job ids. Raises
        ``QueueUnavailable`` when any was not accepted (those before it stay queued)."""
        outcomes = self.accept_many([self._submission(r, owner, None) for r in requests])
        return [_job_id_of(outcome) for outcome in outcomes]

    # Reading -------------------------------------------------------------------------------

    def _finished_batch(self, batch_id: str) -> dict[str, Any] | None:
        with self._finished_lock:
            return self._finished.get(batch_id)

    def _remember(self, batch_id: str, meta: Mapping[str, Any]) -> dict[str, Any] | None:
        """Decode a finished batch's result into results by job id, and keep it; None when
        the stored result is not a batch's."""
        stored = meta.get("result")
        results = stored.get("results") if isinstance(stored, dict) else None
        job_ids = stored.get("jobIds") if isinstance(stored, dict) else None
        if not isinstance(results, list) or not isinstance(job_ids, list):
            log.error("batch %s: the stored result is not a batch's verdicts", batch_id)
            return None
        by_job = dict(zip(job_ids, results, strict=False))
        with self._finished_lock:
            self._finished[batch_id] = by_job
            while len(self._finished) > _FINISHED_BATCHES:
                self._finished.popitem(last=False)
        return by_job

    def _status_of(self, job_id: str, meta: Mapping[str, Any]) -> JobStatus:
        state = meta.get("status")
        if state == states.SUCCESS:
            try:
                result = VerificationResult.model_validate(meta.get("result"))
            except ValidationError:
                log.error("job %s: the stored result is not a verdict", job_id)
                result = _internal_error("the worker returned an unreadable result")
            if result.reason == Reason.JOB_LOST:
                # Buried as lost (see ``_read``); a late delivery returned that verdict.
                return _lost(job_id)
            return JobStatus(jobId=job_id, status="done", result=result)
        log.error("job %s ended in state %s", job_id, state)
        return JobStatus(
            jobId=job_id, status="done", result=_internal_error(f"the job ended in state {state}")
        )

    def _read(
        self,
        wanted: Sequence[tuple[Owner, str]],
        *,
        consult_store: bool,
        session: Session | None = None,
    ) -> list[JobStatus]:
        """The statuses of (owner, job id) pairs.

        Order of the reads: the batches' results (one read for all); for jobs no result
        names, the ledger (is the batch still on its way?), then the store's verdicts. A
        worker stores a verdict in the store, then the result, then removes the ledger entry,
        so a job missing from the result and then from the ledger is in the store if it was
        ever decided; a job in the store is done whatever the ledger says.

        A job found nowhere was lost with the broker's data. It is buried before it is
        answered ``lost``: a verdict row that says so, which a worker still holding its
        message (one that took it before Redis forgot it) finds when it records its own, so
        that it decides nothing and ``lost`` stays true. ``session``, when given, is the
        transaction the burial joins.
        """
        answers: dict[int, JobStatus] = {}
        located: dict[int, tuple[str, int]] = {}
        for n, (owner, job_id) in enumerate(wanted):
            found = open_job_id(owner, job_id)
            if found is None:
                answers[n] = _not_found(job_id)
            else:
                located[n] = found
        missing = self._from_results(wanted, located, answers)
        if not missing:
            return [answers[n] for n in range(len(wanted))]
        on_the_way: set[int] = set()
        look_up = dict(missing)
        if self.ledger is not None:
            held = self.ledger.holding(sorted(set(missing.values())))
            on_the_way = {n for n, batch_id in missing.items() if batch_id in held}
            # A job the ledger holds is looked up too once its batch is a while on its way:
            # the store is the truth, and a verdict stored there by a worker whose result
            # write is still retrying (a result backend that restarted) is final already.
            # A batch sent moments ago is just on its way: no query for it.
            settled = time.time() - _HELD_LOOKUP_AFTER
            look_up = {n: b for n, b in missing.items() if held.get(b, 0.0) <= settled}
        if consult_store and self.sessions is not None:
            if look_up:
                self._from_store(wanted, look_up, answers, session)
            gone = [n for n in missing if n not in on_the_way and n not in answers]
            for n in [n for n in gone if self._purged(missing[n])]:
                # Older than the verdicts kept: purged, not lost (and not buried again).
                answers[n] = _expired(wanted[n][1])
            gone = [n for n in gone if n not in answers]
            if gone and self.ledger is not None:
                answers.update(self._bury({n: wanted[n] for n in gone}, session))
        for n in missing:
            if n not in answers:
                # On its way (in the ledger), or: without a look at the store nothing final
                # can be said; brokers without a ledger keep queued messages themselves.
                answers[n] = JobStatus(jobId=wanted[n][1], status="pending")
        return [answers[n] for n in range(len(wanted))]

    def _from_results(
        self,
        wanted: Sequence[tuple[Owner, str]],
        located: Mapping[int, tuple[str, int]],
        answers: dict[int, JobStatus],
    ) -> dict[int, str]:
        """Answer the jobs whose batch result names them (one read of the result backend for
        every batch not already decoded); return the others, with their batch ids."""
        batch_ids = {
            batch_id for batch_id, _ in located.values() if self._finished_batch(batch_id) is None
        }
        metas = read_task_metas(self.celery_app.backend, sorted(batch_ids))
        missing: dict[int, str] = {}
        for n, (batch_id, _) in located.items():
            job_id = wanted[n][1]
            by_job = self._finished_batch(batch_id)
            if by_job is None:
                meta = metas[batch_id]
                status = meta.get("status")
                if status == states.SUCCESS:
                    by_job = self._remember(batch_id, meta)
                    if by_job is None:
                        answers[n] = self._status_of(job_id, {"status": states.SUCCESS})
                        continue
                elif status in states.READY_STATES:
                    answers[n] = self._status_of(job_id, meta)
                    continue
            if by_job is not None and job_id in by_job:
                answers[n] = self._status_of(
                    job_id, {"status": states.SUCCESS, "result": by_job[job_id]}
                )
            else:
                missing[n] = batch_id
        return missing

    def _from_store(
        self,
        wanted: Sequence[tuple[Owner, str]],
        missing: Mapping[int, str],
        answers: dict[int, JobStatus],
        session: Session | None,
    ) -> None:
        """Answer the missing jobs whose verdict the store has (for their owner)."""
        recorded = self._recorded([wanted[n] for n in missing], session)
        for n in missing:
            owner, job_id = wanted[n]
            verdict = recorded.get(job_id)
            if verdict is not None and verdict[0] in (None, owner.name):
                answers[n] = self._status_of(
                    job_id, {"status": states.SUCCESS, "result": verdict[1]}
                )

    def _purged(self, batch_id: str) -> bool:
        """Whether a batch is older than the verdict retention: made at least a whole day more
        than ``verdict_retention_days`` ago (its verdicts were decided after it was made)."""
        if not self.verdict_retention_days:
            return False
        day = batch_day(batch_id)
        today = int(time.time() // 86_400)
        return day is not None and day + 1 + self.verdict_retention_days < today

    def _in_store(self, session: Session | None, action: Callable[[Session], _T]) -> _T:
        """Run ``action`` in ``session``, or in a transaction of its own; a store that cannot
        be reached raises ``QueueUnavailable``."""
        assert self.sessions is not None
        try:
            if session is not None:
                return action(session)
            with self.sessions() as own, own.begin():
                return action(own)
        except _STORE_DOWN as exc:
            raise QueueUnavailable(f"the store is unavailable ({type(exc).__name__})") from exc

    def _recorded(
        self, wanted: Sequence[tuple[Owner, str]], session: Session | None = None
    ) -> dict[str, tuple[str | None, dict[str, Any]]]:
        job_ids = [job_id for _, job_id in wanted]
        return self._in_store(session, lambda s: bulk.get_verdicts_of(s, job_ids))

    def _bury(
        self, gone: Mapping[int, tuple[Owner, str]], session: Session | None
    ) -> dict[int, JobStatus]:
        """Record a ``job_lost`` verdict for each job found nowhere, unless a verdict appeared
        meanwhile; return their statuses (``lost``, or ``done`` with that verdict)."""
        now = datetime.now(UTC)
        tombstone = VerificationResult.rejection(
            kind=None,
            key_id=None,
            reason=Reason.JOB_LOST,
            detail="the job's queue message was lost with the broker's data",
        ).to_json_dict()
        rows = [
            {
                "job_id": job_id,
                "kind": "lost",
                "key_id": None,
                "app_id": None,
                "ok": False,
                "reason": Reason.JOB_LOST.value,
                "result": tombstone,
                "decided_at": now,
                "submitted_by": owner.name,
            }
            for owner, job_id in gone.values()
        ]

        def bury(s: Session) -> tuple[set[str], dict[str, tuple[str | None, dict[str, Any]]]]:
            buried = bulk.record_verdicts(s, rows)
            late = [job_id for _, job_id in gone.values() if job_id not in buried]
            return buried, bulk.get_verdicts_of(s, late) if late else {}

        buried, recorded = self._in_store(session, bury)
        answers: dict[int, JobStatus] = {}
        for n, (owner, job_id) in gone.items():
            verdict = recorded.get(job_id)
            if job_id in buried:
                log.warning("job %s: lost with the broker's data; recorded as lost", job_id)
                answers[n] = _lost(job_id)
            elif verdict is not None and verdict[0] in (None, owner.name):
                answers[n] = self._status_of(
                    job_id, {"status": states.SUCCESS, "result": verdict[1]}
                )
        return answers

    def statuses_of(
        self, wanted: Sequence[tuple[Owner, str]], *, consult_store: bool = True
    ) -> list[JobStatus]:
        """The status of each (owner, job id): ``done`` with the verdict, ``pending``,
        ``not_found`` for an id that owner was never given (or whose records expired), or
        ``lost``. One read of the result backend serves all of them."""
        # Ids are read in their canonical form (a client may send them in upper case) and
        # answered as they were asked.
        canonical = [(owner, _canonical_id(job_id)) for owner, job_id in wanted]
        try:
            found = self._read(canonical, consult_store=consult_store)
            return [
                status if status.job_id == asked else status.model_copy(update={"job_id": asked})
                for status, (_, asked) in zip(found, wanted, strict=True)
            ]
        except NotImplementedError as exc:
            # Celery's DisabledBackend: the app was configured without a result backend.
            raise QueueUnavailable("no result backend is configured") from exc
        except self._unreachable() as exc:
            raise QueueUnavailable(
                f"the result backend is unavailable ({type(exc).__name__})"
            ) from exc

    def statuses(self, job_ids: Sequence[str], *, owner: Owner | None = None) -> list[JobStatus]:
        """The statuses of jobs of one owner (see ``statuses_of``)."""
        who = owner or self.owner
        return self.statuses_of([(who, job_id) for job_id in job_ids])

    def status(self, job_id: str, *, owner: Owner | None = None) -> JobStatus:
        """Where one job stands now (see ``statuses_of``)."""
        [status] = self.statuses([job_id], owner=owner)
        return status

    async def wait_many_async(
        self, job_ids: Sequence[str], timeout: float, *, owner: Owner | None = None
    ) -> list[JobStatus]:
        """Wait until every job's status is final or ``timeout`` seconds passed; return the
        statuses.

        Every request waiting in this process is served by one watcher per event loop, which
        reads the statuses of the awaited jobs together (one backend read per tick), so a
        thousand waiting requests cost what one does; a long wait holds no thread. With a
        Redis result backend the watcher reads as soon as a result it awaits is stored (it
        subscribes to the channels on which the backend announces the results of the batches
        awaited), and polls only as a fallback; ``aclose`` releases that connection."""
        loop = asyncio.get_running_loop()
        with self._watchers_lock:
            watcher = self._watchers.get(loop)
            if watcher is None:
                watcher = self._watchers[loop] = _Watcher(self)
        who = owner or self.owner
        return await watcher.wait([(who, job_id) for job_id in job_ids], timeout)

    async def wait_async(
        self, job_id: str, timeout: float, *, owner: Owner | None = None
    ) -> JobStatus:
        """Like ``wait``, for an event loop (see ``wait_many_async``)."""
        [status] = await self.wait_many_async([job_id], timeout, owner=owner)
        return status

    def wait(self, job_id: str, timeout: float, *, owner: Owner | None = None) -> JobStatus:
        """Poll until the job's status is final or ``timeout`` seconds passed; return it."""
        deadline = time.monotonic() + timeout
        delays = _poll_delays()
        while True:
            status = self.status(job_id, owner=owner)
            remaining = deadline - time.monotonic()
            if status.final or remaining <= 0:
                return status
            time.sleep(min(next(delays), remaining))


def _canonical_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        return job_id


def _job_id_of(outcome: Outcome) -> str:
    if outcome.error is not None:
        if outcome.error.code == ErrorCode.IDEMPOTENCY_CONFLICT:
            raise IdempotencyConflict(outcome.error.detail)
        raise QueueUnavailable(outcome.error.detail)
    assert outcome.job_id is not None
    return outcome.job_id


_Wanted = tuple[Owner, str]


class _Watcher:
    """Waits for the verdicts of the jobs awaited on one event loop: while any job is awaited,
    a single task reads their statuses (in a worker thread) and resolves each waiter as its
    jobs finish. The store is consulted for jobs no result names at most once a second, in a
    read of every awaited job. A backend that cannot be reached fails every waiter of that
    read with ``QueueUnavailable``.

    With a Redis result backend the watcher subscribes to the channels of the batches awaited
    (``producer.wakeups``; each batch while it has a waiter) and reads when a result is
    announced, only the jobs of the batches announced; while every awaited batch is
    subscribed, polls back off to ``SUBSCRIBED_POLL_CEILING``. Without wake-ups (another
    backend, or a connection that broke), it polls as before: every awaited job, after a
    short interval that grows while nothing changes."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._waiters: dict[_Wanted, list[asyncio.Future[JobStatus]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wakeups = result_wakeups(
            queue.celery_app.backend, on_wake=self._woken, on_lost=self._lost
        )
        # With wake-ups: each awaited job's batch, and the awaited jobs of each batch.
        self._batch_of: dict[_Wanted, str] = {}
        self._by_batch: dict[str, set[_Wanted]] = {}
        # The jobs the next read covers even when it is not a read of every job, the ones
        # among them whose result was announced, and whether it must cover every job.
        self._due: set[_Wanted] = set()
        self._announced: set[_Wanted] = set()
        self._read_all = False
        self._changed = False
        # Set when a read is due; ``_urgent`` too when the results of every awaited job were
        # announced (or the connection broke): other reads wait for the spacing.
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        # Reads of the result backend, and jobs whose verdict a read found after the
        # announcement of their batch's result (the wake-up path), for tests and benchmarks.
        self.reads = 0
        self.found_on_wakeup = 0

    async def aclose(self) -> None:
        """Close the pub/sub connection (waits that follow poll)."""
        if self._wakeups is not None:
            await self._wakeups.aclose()

    async def wait(self, wanted: list[_Wanted], timeout: float) -> list[JobStatus]:
        loop = asyncio.get_running_loop()
        futures = {pair: loop.create_future() for pair in dict.fromkeys(wanted)}
        for pair, future in futures.items():
            waiting = self._waiters.get(pair)
            if waiting is None:
                waiting = self._add(pair)
            waiting.append(future)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        try:
            await asyncio.wait(futures.values(), timeout=timeout)
        finally:
            for pair, future in futures.items():
                waiting = self._waiters.get(pair)
                if waiting is not None and future in waiting:
                    waiting.remove(future)
                    if not waiting:
                        self._remove(pair)
                future.cancel()
        found: dict[_Wanted, JobStatus] = {}
        error: BaseException | None = None
        for pair, future in futures.items():
            if future.cancelled():
                found[pair] = JobStatus(jobId=pair[1], status="pending")
            elif future.exception() is not None:
                error = future.exception()
            else:
                found[pair] = future.result()
        if error is not None:
            raise error
        return [found[pair] for pair in wanted]

    def _add(self, pair: _Wanted) -> list[asyncio.Future[JobStatus]]:
        """Start awaiting a job (subscribing to its batch's channel with wake-ups); return
        its list of waiters."""
        waiting: list[asyncio.Future[JobStatus]] = []
        self._waiters[pair] = waiting
        self._changed = True
        if self._wakeups is None:
            return waiting
        found = open_job_id(*pair)
        if found is None:
            # Not an id of this owner: the next read answers not_found.
            self._due.add(pair)
            self._wake.set()
            return waiting
        batch_id = found[0]
        self._batch_of[pair] = batch_id
        pairs = self._by_batch.setdefault(batch_id, set())
        pairs.add(pair)
        if len(pairs) == 1:
            self._wakeups.want(batch_id)  # the subscription, once confirmed, wakes a read
        if batch_id in self._wakeups.subscribed:
            # Subscribed already: the batch's result may have been announced before this
            # waiter came, after the last read.
            self._due.add(pair)
            self._wake.set()
        return waiting

    def _remove(self, pair: _Wanted) -> list[asyncio.Future[JobStatus]]:
        """Stop awaiting a job (unsubscribing from its batch's channel when no other job of
        the batch is awaited); return its waiters."""
        waiting = self._waiters.pop(pair)
        self._changed = True
        self._due.discard(pair)
        self._announced.discard(pair)
        batch_id = self._batch_of.pop(pair, None)
        if batch_id is not None and self._wakeups is not None:
            pairs = self._by_batch[batch_id]
            pairs.discard(pair)
            if not pairs:
                del self._by_batch[batch_id]
                self._wakeups.drop(batch_id)
        return waiting

    def _woken(self, batch_id: str, stored: bool) -> None:
        """A subscription took effect, or a result was stored: read the batch's jobs."""
        pairs = self._by_batch.get(batch_id)
        if pairs:
            self._due.update(pairs)
            if stored:
                self._announced.update(pairs)
                if len(self._announced) == len(self._waiters):
                    # Nothing else is awaited: no other verdict to share the read with.
                    self._urgent.set()
            self._wake.set()

    def _lost(self) -> None:
        """The pub/sub connection broke: announcements may have been lost; read every job."""
        self._read_all = True
        self._urgent.set()
        self._wake.set()

    def _covered(self) -> bool:
        """Whether a stored result of every awaited job will wake the watcher."""
        return (
            self._wakeups is not None
            and len(self._batch_of) == len(self._waiters)
            and self._wakeups.covers(self._by_batch)
        )

    async def _run(self) -> None:
        delays = _poll_delays()
        last_consult = float("-inf")
        last_read = float("-inf")
        read_all = True
        while self._waiters:
            consult = time.monotonic() - last_consult >= _STORE_CONSULT_SECONDS
            if read_all or consult or self._read_all:
                wanted = list(self._waiters)
            else:
                wanted = list(self._due)
            announced = self._announced
            self._due, self._announced = set(), set()
            self._read_all = self._changed = False
            self._wake.clear()
            self._urgent.clear()
            progressed = False
            if wanted:
                self.reads += 1
                try:
                    found = await anyio.to_thread.run_sync(
                        partial(self.queue.statuses_of, wanted, consult_store=consult)
                    )
                except QueueUnavailable as exc:
                    for pair in list(self._waiters):
                        for future in self._remove(pair):
                            if not future.done():
                                future.set_exception(exc)
                    return
                last_read = time.monotonic()
                if consult:
                    last_consult = last_read
                for pair, status in zip(wanted, found, strict=True):
                    if status.final and pair in self._waiters:
                        waiting = self._remove(pair)
                        for future in waiting:
                            if not future.done():
                                future.set_result(status)
                        if pair in announced:
                            self.found_on_wakeup += 1
                        progressed = True
            if progressed or self._changed:
                delays = _poll_delays()  # verdicts are flowing: keep reading often
            if not self._waiters:
                return
            # Sleep until the next poll, or until a read is due: at once when the results of
            # every awaited job were announced (light load), otherwise once the last read is
            # _WOKEN_READ_SPACING old, so that under load one read answers many batches and
            # their callers together, as a poll did (answering each batch on its own spreads
            # the callers' next requests into more, smaller batches). A woken read covers only
            # the jobs it is due for.
            delay = SUBSCRIBED_POLL_CEILING if self._covered() else next(delays)
            if self._wakeups is None:
                await asyncio.sleep(delay)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                read_all = True
            else:
                read_all = False
                spacing = last_read + _WOKEN_READ_SPACING - time.monotonic()
                if spacing > 0 and not self._urgent.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._urgent.wait(), spacing)
