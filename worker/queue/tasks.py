"""Celery tasks: thin adapters from a queued job to the verification service."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import redis
from celery import Celery, Task, states
from sqlalchemy import text
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from worker.contract import (
    PLATFORM_ANDROID,
    AssertionRequest,
    PluginRequest,
    VerificationResult,
    kind_of,
    parse_request,
)
from worker.core import IntermediateCache, Reason, Rejected
from worker.queue.ledger import Ledger, ledger_for
from worker.queue.messaging import (
    MAX_BATCH_JOBS,
    REFRESH_TASK,
    REVERIFY_TASK,
    VERIFY_ANDROID_BATCH_TASK,
    VERIFY_BATCH_TASK,
    VERIFY_TASK,
    MessageError,
    RefreshReceipts,
    ReverifyBatch,
    UnsupportedMessage,
    VerifyAndroidBatch,
    VerifyBatch,
    VerifyOne,
    decode,
    encode,
)
from worker.queue.metrics import CacheCounts, WorkerMetrics, observe_verdicts, worker_metrics
from worker.queue.play_integrity import PlayIntegrityClient
from worker.service import VerificationService
from worker.service.integrity import IntegrityService
from worker.service.refresh_runs import RefreshRunner
from worker.service.reverify import Reverifier
from worker.settings import Settings
from worker.store.db import create_store_engine, session_factory

log = logging.getLogger("appattest.worker")

# Errors of the infrastructure, not of the request: these retry, everything else is a verdict.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
# A pooled connection idle longer than this is tested before use (worker.store.db).
_PING_WHEN_IDLE_FOR = 2.0


@dataclass
class ProcessResources:
    """Everything a worker process holds for its tasks: the services (their database pool and
    the intermediate cache) and the ledger client. One object per process, built by the
    worker's process-init hook (``start_process``), never at import and never inherited
    across a fork: it is checked against the pid of the process using it."""

    pid: int
    service: VerificationService
    offline: VerificationService
    reverifier: Reverifier
    cache: IntermediateCache
    ledger: Ledger | None
    # --- metrics (issue 11): this process's worker metrics, the App IDs that may be labels,
    # and what the caches had counted when the metrics last saw them.
    metrics: WorkerMetrics = field(default_factory=worker_metrics)
    known_apps: frozenset[str] = frozenset()
    intermediate_counts: CacheCounts = field(default_factory=lambda: CacheCounts("intermediate"))
    key_counts: CacheCounts = field(default_factory=lambda: CacheCounts("public_key"))

    def observe(
        self, results: list[dict[str, Any]], seconds: float, submitted_at: datetime | None
    ) -> None:
        """Count one task's verdicts and the caches' hits and misses in the metrics."""
        observe_verdicts(
            self.metrics,
            results,
            known_apps=self.known_apps,
            seconds=seconds,
            submitted_at=submitted_at,
            now=datetime.now(UTC),
        )
        self.intermediate_counts.update(self.metrics, self.cache.hits, self.cache.misses)
        self.key_counts.update(
            self.metrics,
            self.service.public_key_hits + self.offline.public_key_hits,
            self.service.public_key_misses + self.offline.public_key_misses,
        )

    # Built by the first refresh task of the process (``refresh_runner``): only workers of the
    # receipts queue talk to Apple.
    runner: RefreshRunner | None = None

    def refresh_runner(self, settings: Settings) -> RefreshRunner:
        """This process's receipt refresher; raises ``RefreshNotConfigured`` without the
        DeviceCheck key, ``ValueError`` or ``OSError`` for a key file that is not one."""
        if self.runner is None:
            from worker.queue.receipts_setup import build_runner, redis_client

            self.runner, _ = build_runner(
                settings, sessions=self._pinged_sessions(settings), client=redis_client(settings)
            )
        return self.runner

    settings: Settings | None = None
    _android: dict[bool, IntegrityService] = field(default_factory=dict)
    _android_lock: threading.Lock = field(default_factory=threading.Lock)
    _pinged: sessionmaker[Session] | None = None
    _pinged_lock: threading.Lock = field(default_factory=threading.Lock)

    def _pinged_sessions(self, settings: Settings) -> sessionmaker[Session]:
        """Sessions whose connections are tested before every use, for the services that
        call Google or Apple between their reads and their writes: a connection the server
        dropped during such a call is replaced rather than failing the write, which would
        retry the batch and repeat the calls (the verification batches, which call nobody,
        test theirs only after a while idle). Built on first use."""
        with self._pinged_lock:
            if self._pinged is None:
                self._pinged = session_factory(create_store_engine(settings.store_url))
            return self._pinged

    def android(self, *, issued_challenges: bool = True) -> IntegrityService | None:
        """The Android service (Google's client, its pool of threads for the decode calls),
        built on first use, so that a process serving only Apple's queue never signs in to
        Google; None when no Android app is configured."""
        if self.settings is None:
            return None
        credentials = self.settings.google_credentials_file
        if not self.settings.android_apps or credentials is None:
            return None
        with self._android_lock:
            service = self._android.get(issued_challenges)
            if service is None:
                first = next(iter(self._android.values()), None)
                if first is not None:
                    decoder, executor = first.decoder, first.executor
                else:
                    settings = self.settings
                    decoder = PlayIntegrityClient(
                        credentials_file=credentials,
                        base_url=settings.play_integrity_url,
                        timeout_seconds=settings.play_integrity_timeout_seconds,
                        attempts=settings.play_integrity_attempts,
                        max_connections=settings.play_integrity_concurrency,
                    )
                    executor = ThreadPoolExecutor(
                        max_workers=settings.play_integrity_concurrency,
                        thread_name_prefix="play-integrity",
                    )
                service = IntegrityService(
                    policy=self.settings.android_policy(),
                    decoder=decoder,
                    sessions=self._pinged_sessions(self.settings),
                    issued_challenges=issued_challenges,
                    executor=executor,
                )
                self._android[issued_challenges] = service
        return service

    @classmethod
    def build(cls, app: Celery, settings: Settings) -> ProcessResources:
        # A failed statement retries the batch (see run_batch): connections are tested only
        # after a while idle, not before every batch.
        engine = create_store_engine(settings.store_url, ping_when_idle_for=_PING_WHEN_IDLE_FOR)
        sessions = session_factory(engine)
        cache = IntermediateCache()
        policy = settings.policy()
        service = partial(
            VerificationService,
            policy=policy,
            sessions=sessions,
            cache=cache,
            public_key_cache_size=settings.public_key_cache_size,
            max_risk_metric=settings.max_risk_metric,
        )
        return cls(
            pid=os.getpid(),
            service=service(issued_challenges=True),
            # Bulk imports of registrations made elsewhere: their challenges were checked by
            # the system that issued them, so they are taken as given, as in `appattest verify`.
            offline=service(issued_challenges=False),
            reverifier=Reverifier(sessions=sessions, cache=cache),
            cache=cache,
            ledger=ledger_for(app),
            known_apps=frozenset(settings.app_ids) | frozenset(settings.dev_app_ids),
            settings=settings,
        )


# The attribute of the Celery app (one per process, like the app itself) holding the resources.
_RESOURCES_ATTR = "appattest_resources"


def resources_of(app: Celery, settings: Settings) -> ProcessResources:
    """The resources of this process for ``app``; built here when the process-init hook did
    not run (a task run eagerly, or in a pool without process init)."""
    resources: ProcessResources | None = getattr(app, _RESOURCES_ATTR, None)
    if resources is None or resources.pid != os.getpid():
        resources = ProcessResources.build(app, settings)
        setattr(app, _RESOURCES_ATTR, resources)
    return resources


def start_process(app: Celery, settings: Settings) -> None:
    """The worker's process-init hook: build this process's resources and open one database
    connection now, so that the first batch a fresh worker process takes does not also pay
    for them. A store that cannot be reached is left to the first task, which retries."""
    try:
        resources = resources_of(app, settings)
        with resources.service.sessions() as session:
            session.execute(text("SELECT 1"))
    except (*INFRASTRUCTURE_ERRORS, OSError) as exc:
        log.warning("warm-up: the store is not reachable yet (%s)", type(exc).__name__)


def _rejection(body: Any, reason: Reason, detail: str) -> dict[str, Any]:
    kind = kind_of(body) if isinstance(body, dict) else None
    key_id = body.get("keyId") if isinstance(body, dict) else None
    key_id = key_id if isinstance(key_id, str) and len(key_id) <= 128 else None
    result = VerificationResult.rejection(kind=kind, key_id=key_id, reason=reason, detail=detail)
    return result.to_json_dict()


def _refused(task: Task, exc: MessageError) -> None:
    """Log a message this worker cannot read: a newer producer's version, or a malformed one.
    Its task ends with a result saying so (the caller returns it); it is not retried."""
    if isinstance(exc, UnsupportedMessage):
        log.error(
            "task %s: refused, %s; upgrade this worker to read it (the job ends unverified)",
            task.request.id,
            exc,
        )
    else:
        log.error("task %s: refused, not a valid message: %s", task.request.id, exc)


def run_job(task: Task, settings: Settings, payload: Any) -> dict[str, Any]:
    """Decide one job, a ``VerifyOne`` message; return the result's JSON.

    Rejections are results. Infrastructure errors retry with exponential backoff up to the
    configured bound, then end as ``internal_error``; any other exception is a bug, logged
    with its traceback and reported as ``internal_error`` without retrying. A message this
    worker cannot read is an ``invalid_request`` result naming why.
    """
    job_id: str = task.request.id
    body = payload.get("body") if isinstance(payload, dict) else None
    try:
        message = decode(VERIFY_TASK, payload)
    except MessageError as exc:
        _refused(task, exc)
        return _rejection(body, Reason.INVALID_REQUEST, exc.detail)
    assert isinstance(message, VerifyOne)
    started = time.perf_counter()
    try:
        if message.body is None:
            raise Rejected(Reason.INVALID_REQUEST, "job has no body")
        request = parse_request(message.body)
        resources = resources_of(task.app, settings)
        # Operator imports may verify as of the instant the registrations were made.
        at = message.at if message.challenges_given else None
        if request.platform == PLATFORM_ANDROID:
            android = _android_service(resources, issued=not message.challenges_given)
            verdict = android.handle(request, job_id=job_id, now=at).to_json_dict()
        else:
            service = resources.offline if message.challenges_given else resources.service
            verdict = service.handle(request, job_id=job_id, now=at).to_json_dict()
    except Rejected as exc:
        verdict = _rejection(body, exc.reason, exc.detail)
    except INFRASTRUCTURE_ERRORS as exc:
        _retry_or_raise(task, settings, exc)
        log.error("job %s: %s, retries exhausted", job_id, type(exc).__name__)
        detail = "the store was unavailable; retries exhausted"
        verdict = _rejection(body, Reason.INTERNAL_ERROR, detail)
    except Exception:
        log.exception("job %s: unexpected error", job_id)
        verdict = _rejection(body, Reason.INTERNAL_ERROR, "unexpected error; see the worker log")
    # Every verdict is counted and logged, those reached without the service included.
    elapsed = time.perf_counter() - started
    resources_of(task.app, settings).observe([verdict], elapsed, message.submitted_at)
    if settings.log_verdicts:
        _log_verdict(job_id, verdict, None)
    return verdict


def _refused_batch(payload: Any, exc: MessageError) -> dict[str, Any]:
    """The result of a batch this worker cannot read: an ``invalid_request`` verdict for every
    job id it can still find in it, so that those jobs end instead of staying pending."""
    jobs = payload.get("jobs") if isinstance(payload, dict) else None
    job_ids = [
        job.get("jobId")
        for job in (jobs if isinstance(jobs, list) else [])[:MAX_BATCH_JOBS]
        if isinstance(job, dict) and isinstance(job.get("jobId"), str)
    ]
    return {
        "results": [_rejection(None, Reason.INVALID_REQUEST, exc.detail) for _ in job_ids],
        "jobIds": job_ids,
        "error": exc.detail,
    }


def _android_service(resources: ProcessResources, *, issued: bool = True) -> IntegrityService:
    service = resources.android(issued_challenges=issued)
    if service is None:
        raise Rejected(
            Reason.UNSUPPORTED_FORMAT,
            "no Android app is configured (APPATTEST_ANDROID_APPS and "
            "APPATTEST_GOOGLE_CREDENTIALS_FILE)",
        )
    return service


def _decide(
    resources: ProcessResources,
    items: list[tuple[str | None, PluginRequest | VerificationResult]],
    owners: list[str | None],
    request_ids: list[str | None],
) -> list[VerificationResult]:
    """Decide a batch's items: Android requests by the Android service (Google decodes them),
    the rest (and the rejections already made) by Apple's; verdicts in the items' order.
    (Android verdict rows carry no request id.)"""
    android = [
        n
        for n, (_, item) in enumerate(items)
        if not isinstance(item, VerificationResult) and item.platform == PLATFORM_ANDROID
    ]
    if not android:
        return resources.service.handle_batch(items, submitted_by=owners, request_ids=request_ids)
    results: list[VerificationResult | None] = [None] * len(items)
    chosen = set(android)
    apple = [n for n in range(len(items)) if n not in chosen]
    try:
        service = _android_service(resources)
    except Rejected as exc:
        # Recorded as verdicts like any other rejection, through the Apple service's batch.
        for n in android:
            job_id, item = items[n]
            assert not isinstance(item, VerificationResult)
            rejection = VerificationResult.rejection(
                kind="assertion" if isinstance(item, AssertionRequest) else "registration",
                key_id=item.key_id,
                reason=exc.reason,
                detail=exc.detail,
                platform=PLATFORM_ANDROID,
            )
            items[n] = (job_id, rejection)
        return resources.service.handle_batch(items, submitted_by=owners, request_ids=request_ids)
    decided = service.handle_batch(
        [items[n] for n in android], submitted_by=[owners[n] for n in android]
    )
    for n, verdict in zip(android, decided, strict=True):
        results[n] = verdict
    if apple:
        decided = resources.service.handle_batch(
            [items[n] for n in apple],
            submitted_by=[owners[n] for n in apple],
            request_ids=[request_ids[n] for n in apple],
        )
        for n, verdict in zip(apple, decided, strict=True):
            results[n] = verdict
    return [verdict for verdict in results if verdict is not None]


def run_batch(
    task: Task, settings: Settings, payload: Any, *, task_name: str = VERIFY_BATCH_TASK
) -> dict[str, Any]:
    """Decide a ``VerifyBatch`` (or a ``VerifyAndroidBatch``: ``task_name``); return
    ``{"results": [...], "jobIds": [...]}`` in job order,
    one result backend write for the whole batch. ``submittedBy`` (an API key's name) is
    recorded with each verdict.

    Bodies that fail the contract get their rejection; the rest are decided together by the
    service, which records every verdict under its own job id, so a redelivered batch returns
    the first verdicts. Infrastructure errors retry the whole batch with bounded backoff, then
    end every job not yet decided as ``internal_error``. A message this worker cannot read
    ends every job id found in it as ``invalid_request``, with ``error`` saying why.
    """
    try:
        batch = decode(task_name, payload)
    except MessageError as exc:
        _refused(task, exc)
        return _refused_batch(payload, exc)
    assert isinstance(batch, VerifyBatch | VerifyAndroidBatch)
    items: list[tuple[str | None, PluginRequest | VerificationResult]] = []
    job_ids: list[str | None] = [job.job_id for job in batch.jobs]
    owners: list[str | None] = [job.submitted_by for job in batch.jobs]
    for job in batch.jobs:
        try:
            body = job.body if isinstance(job.body, dict) else ""
            items.append((job.job_id, parse_request(body)))
        except Rejected as exc:
            rejection = _rejection(job.body, exc.reason, exc.detail)
            items.append((job.job_id, VerificationResult.model_validate(rejection)))
    request_ids: list[str | None] = [job.request_id for job in batch.jobs]
    resources = resources_of(task.app, settings)
    started = time.perf_counter()
    try:
        results = _decide(resources, items, owners, request_ids)
        decided = [result.to_json_dict() for result in results]
    except INFRASTRUCTURE_ERRORS as exc:
        _retry_or_raise(task, settings, exc)
        log.error("batch %s: %s, retries exhausted", task.request.id, type(exc).__name__)
        detail = "the store was unavailable; retries exhausted"
        decided = [_rejection(j.body, Reason.INTERNAL_ERROR, detail) for j in batch.jobs]
    except Exception:
        log.exception("batch %s: unexpected error", task.request.id)
        detail = "unexpected error; see the worker log"
        decided = [_rejection(j.body, Reason.INTERNAL_ERROR, detail) for j in batch.jobs]
    # Every verdict is counted and logged, internal errors included.
    resources.observe(decided, time.perf_counter() - started, batch.submitted_at)
    resources.metrics.batch_jobs.observe(len(decided))
    if settings.log_verdicts:
        for job_id, request_id, result in zip(job_ids, request_ids, decided, strict=True):
            _log_verdict(job_id, result, request_id)
    # The job ids beside the results: a reader finds a job's verdict by its id.
    return {"results": decided, "jobIds": job_ids}


def _log_verdict(job_id: str | None, result: dict[str, Any], request_id: str | None) -> None:
    """One line per decided job: its ids, kind, App ID and reason (never its body)."""
    if not log.isEnabledFor(logging.INFO):
        return
    reason = "ok" if result.get("ok") else result.get("reason")
    kind, app_id = result.get("kind"), result.get("appId")
    log.info(
        "job %s: %s %s (app %s, request %s)",
        job_id,
        kind,
        reason,
        app_id,
        request_id,
        extra={
            "job_id": job_id,
            "kind": kind,
            "reason": reason,
            "app_id": app_id,
            "request_id": request_id,
        },
    )


def _retry_or_raise(task: Task, settings: Settings, exc: Exception) -> None:
    retries = task.request.retries
    if retries < settings.task_max_retries:
        resources_of(task.app, settings).metrics.retries.labels(task.name).inc()
        countdown = min(settings.task_retry_backoff_max, 2**retries)
        log.warning(
            "task %s: %s, retry %d in %ds",
            task.request.id,
            type(exc).__name__,
            retries + 1,
            countdown,
        )
        raise task.retry(exc=exc, countdown=countdown) from exc


def run_reverify(task: Task, settings: Settings, payload: Any) -> dict[str, Any]:
    """Decide one ``ReverifyBatch`` of a re-verification run."""
    try:
        batch = decode(REVERIFY_TASK, payload)
    except MessageError as exc:
        _refused(task, exc)
        return {"decided": 0, "error": exc.detail}
    assert isinstance(batch, ReverifyBatch)
    try:
        reverifier = resources_of(task.app, settings).reverifier
        decided = reverifier.decide_batch(batch.run_id, list(batch.key_ids))
    except INFRASTRUCTURE_ERRORS as exc:
        _retry_or_raise(task, settings, exc)
        log.error("reverify batch %s: retries exhausted", task.request.id)
        return {"decided": 0, "error": "the store was unavailable; retries exhausted"}
    return {"decided": decided}


def run_refresh(task: Task, settings: Settings, payload: Any) -> dict[str, Any]:
    """Decide one ``RefreshReceipts`` batch: exchange its keys at Apple, record the outcomes.

    Keys Apple asked to retry later (429, 5xx, network) are sent again by this task, alone,
    after Apple's ``Retry-After`` or a jittered backoff, up to ``receipt_refresh_retries``
    times (a backoff longer than half the broker's visibility timeout is not waited for);
    then their run rows end as ``retry_later`` (the keys stay due, so a later run or
    the periodic refresh takes them up). A refused token (401) stops the run. Store and Redis
    errors retry the batch like the other tasks. A worker without the DeviceCheck key ends
    the task with an error and decides nothing: the keys stay pending and due.
    """
    from worker.queue.receipts_setup import RefreshNotConfigured

    try:
        message = decode(REFRESH_TASK, payload)
    except MessageError as exc:
        _refused(task, exc)
        return {"decided": 0, "error": exc.detail}
    assert isinstance(message, RefreshReceipts)
    try:
        runner = resources_of(task.app, settings).refresh_runner(settings)
    except (RefreshNotConfigured, ValueError, OSError) as exc:
        log.error("refresh %s: receipts cannot be refreshed: %s", task.request.id, exc)
        return {"decided": 0, "error": f"not configured: {exc}"}
    try:
        step = runner.decide(message.run_id, message.key_ids)
    except (*INFRASTRUCTURE_ERRORS, redis.RedisError) as exc:
        _retry_or_raise(task, settings, exc)
        log.error("refresh %s: %s, retries exhausted", task.request.id, type(exc).__name__)
        return {"decided": 0, "error": "the store or Redis was unavailable; retries exhausted"}
    if step.stopped:
        log.error("refresh %s: run stopped: %s", task.request.id, step.stopped)
    elif step.retry:
        # A message waiting longer than the broker's visibility timeout would be delivered a
        # second time meanwhile: a longer backoff leaves the keys to their due time instead.
        backoff = step.backoff or 0.0
        waits = backoff <= settings.visibility_timeout_seconds / 2
        if waits and task.request.retries < settings.receipt_refresh_retries:
            again = RefreshReceipts(run_id=message.run_id, key_ids=step.retry)
            log.warning(
                "refresh %s: Apple asked to slow down; %d keys again in %.1f s",
                task.request.id,
                len(step.retry),
                step.backoff or 0.0,
            )
            raise task.retry(
                args=(encode(again),),
                countdown=step.backoff,
                max_retries=settings.receipt_refresh_retries,
            )
        detail = (
            "Apple asked to retry later; retries ended"
            if waits
            else f"Apple asked to retry in {backoff:.0f} s; the keys are due then"
        )
        runner.give_up(message.run_id, step.retry, detail)
    return {"decided": step.decided, "retry": len(step.retry), "stopped": step.stopped}


class LedgeredTask(Task):  # type: ignore[misc]
    """A task whose message is in the ledger (see ``worker.queue.messaging.publish``): once its
    result is stored, its entry leaves the ledger."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Any,
        kwargs: Any,
        einfo: Any,
    ) -> None:
        if status != states.SUCCESS:
            return  # retried, or failed: the ledger keeps it until a result is final
        settings = self.app.conf.appattest_settings
        ledger = resources_of(self.app, settings).ledger
        if ledger is None:
            return
        try:
            ledger.forget([task_id])
        except redis.RedisError as exc:
            # The sweeper drops entries whose result is stored; nothing is resent for this.
            log.warning("task %s: ledger not updated (%s)", task_id, type(exc).__name__)


def register(app: Celery, settings: Settings) -> None:
    """Register the tasks on ``app``: one per message of ``worker.queue.messaging``, each decoding
    its message there."""

    def task(name: str) -> Any:
        return app.task(
            name=name, bind=True, base=LedgeredTask, max_retries=settings.task_max_retries
        )

    @task(VERIFY_TASK)  # type: ignore[untyped-decorator]
    def verify(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return run_job(self, settings, payload)

    @task(VERIFY_BATCH_TASK)  # type: ignore[untyped-decorator]
    def verify_batch(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return run_batch(self, settings, payload)

    @task(VERIFY_ANDROID_BATCH_TASK)  # type: ignore[untyped-decorator]
    def verify_android_batch(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return run_batch(self, settings, payload, task_name=VERIFY_ANDROID_BATCH_TASK)

    @task(REVERIFY_TASK)  # type: ignore[untyped-decorator]
    def reverify(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return run_reverify(self, settings, payload)

    @task(REFRESH_TASK)  # type: ignore[untyped-decorator]
    def refresh_receipts(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return run_refresh(self, settings, payload)
