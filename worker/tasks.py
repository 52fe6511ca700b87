"""Celery tasks: thin adapters from a queued job to the verification service."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import redis
from celery import Celery, Task, states
from sqlalchemy import text
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from worker.contract import VerificationResult, kind_of, parse_request
from worker.core import IntermediateCache, Reason, Rejected
from worker.ledger import Ledger, ledger_for
from worker.service import VerificationService
from worker.service.reverify import Reverifier
from worker.settings import Settings
from worker.store.db import create_store_engine, session_factory

log = logging.getLogger("appattest.worker")

# Errors of the infrastructure, not of the request: these retry, everything else is a verdict.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)


@dataclass
class _ProcessResources:
    pid: int
    service: VerificationService
    offline: VerificationService
    reverifier: Reverifier
    cache: IntermediateCache


_resources: _ProcessResources | None = None


def process_resources(settings: Settings) -> _ProcessResources:
    """The services of this worker process, created on first use.

    Built per process (checked by pid), never at import and never inherited across a fork:
    a database connection pool and the intermediate cache belong to one process.
    """
    global _resources
    pid = os.getpid()
    if _resources is None or _resources.pid != pid:
        sessions = session_factory(create_store_engine(settings.store_url))
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
        _resources = _ProcessResources(
            pid=pid,
            service=service(issued_challenges=True),
            # Bulk imports of registrations made elsewhere: their challenges were checked by
            # the system that issued them, so they are taken as given, as in `appattest verify`.
            offline=service(issued_challenges=False),
            reverifier=Reverifier(sessions=sessions, cache=cache),
            cache=cache,
        )
    return _resources


def warm_up_process(settings: Settings) -> None:
    """Create this process's resources and open one database connection now, so that the
    first batch a fresh worker process takes does not also pay for them. A store that cannot
    be reached is left to the first task, which retries."""
    try:
        resources = process_resources(settings)
        with resources.service.sessions() as session:
            session.execute(text("SELECT 1"))
    except (*INFRASTRUCTURE_ERRORS, OSError) as exc:
        log.warning("warm-up: the store is not reachable yet (%s)", type(exc).__name__)


def process_service(settings: Settings) -> VerificationService:
    """The verification service (issued challenges required) of this worker process."""
    return process_resources(settings).service


def _rejection(job: Any, reason: Reason, detail: str) -> dict[str, Any]:
    body = job.get("body") if isinstance(job, dict) else None
    kind = kind_of(body) if isinstance(body, dict) else None
    key_id = body.get("keyId") if isinstance(body, dict) else None
    key_id = key_id if isinstance(key_id, str) and len(key_id) <= 128 else None
    result = VerificationResult.rejection(kind=kind, key_id=key_id, reason=reason, detail=detail)
    return result.to_json_dict()


def run_job(task: Task, settings: Settings, job: Any) -> dict[str, Any]:
    """Decide one job: ``{"body": <plugin body>}``; return the result's JSON.

    Rejections are results. Infrastructure errors retry with exponential backoff up to the
    configured bound, then end as ``internal_error``; any other exception is a bug, logged
    with its traceback and reported as ``internal_error`` without retrying.
    """
    job_id: str = task.request.id
    try:
        body = job.get("body") if isinstance(job, dict) else None
        if body is None:
            raise Rejected(Reason.INVALID_REQUEST, "job has no body")
        request = parse_request(body)
        resources = process_resources(settings)
        # Only a job put on the queue by `appattest verify --queue` (an operator with broker
        # access) may ask for given challenges; the HTTP producer never sets this.
        offline = job.get("challenges") == "given"
        service = resources.offline if offline else resources.service
        # Operator imports may verify as of the instant the registrations were made.
        at = datetime.fromisoformat(job["at"]) if offline and job.get("at") else None
        if at is not None and at.tzinfo is None:
            raise Rejected(Reason.INVALID_REQUEST, "job instant has no time zone")
        result: dict[str, Any] = service.handle(request, job_id=job_id, now=at).to_json_dict()
        return result
    except Rejected as exc:
        return _rejection(job, exc.reason, exc.detail)
    except INFRASTRUCTURE_ERRORS as exc:
        _retry_or_raise(task, settings, exc)
        log.error("job %s: %s, retries exhausted", job_id, type(exc).__name__)
        return _rejection(
            job, Reason.INTERNAL_ERROR, "the store was unavailable; retries exhausted"
        )
    except Exception:
        log.exception("job %s: unexpected error", job_id)
        return _rejection(job, Reason.INTERNAL_ERROR, "unexpected error; see the worker log")


# The largest batch a message may carry: bounds the memory and the transaction of one task.
MAX_BATCH_JOBS = 1000


def run_batch(task: Task, settings: Settings, batch: Any) -> dict[str, Any]:
    """Decide a batch ``{"jobs": [{"jobId", "body", "submittedBy"?}, ...]}``; return
    ``{"results": [...], "jobIds": [...]}`` in job order, one result backend write for the
    whole batch. ``submittedBy`` (an API key's name) is recorded with each verdict.

    Bodies that fail the contract get their rejection; the rest are decided together by the
    service, which records every verdict under its own job id, so a redelivered batch returns
    the first verdicts. Infrastructure errors retry the whole batch with bounded backoff, then
    end every job not yet decided as ``internal_error``.
    """
    jobs = batch.get("jobs") if isinstance(batch, dict) else None
    if not isinstance(jobs, list) or not 0 < len(jobs) <= MAX_BATCH_JOBS:
        return {"results": [], "jobIds": [], "error": "a batch holds 1 to 1000 jobs"}
    items: list[tuple[str | None, Any]] = []
    owners: list[str | None] = []
    job_ids: list[str | None] = []
    for job in jobs:
        job_id = job.get("jobId") if isinstance(job, dict) else None
        job_id = job_id if isinstance(job_id, str) and len(job_id) <= 64 else None
        owner = job.get("submittedBy") if isinstance(job, dict) else None
        owners.append(owner if isinstance(owner, str) and len(owner) <= 64 else None)
        job_ids.append(job_id)
        body = job.get("body") if isinstance(job, dict) else None
        try:
            items.append((job_id, parse_request(body if isinstance(body, dict) else "")))
        except Rejected as exc:
            rejection = _rejection(job, exc.reason, exc.detail)
            items.append((job_id, VerificationResult.model_validate(rejection)))
    try:
        results = process_resources(settings).service.handle_batch(items, submitted_by=owners)
    except INFRASTRUCTURE_ERRORS as exc:
        _retry_or_raise(task, settings, exc)
        log.error("batch %s: %s, retries exhausted", task.request.id, type(exc).__name__)
        return {
            "results": [
                _rejection(
                    job, Reason.INTERNAL_ERROR, "the store was unavailable; retries exhausted"
                )
                for job in jobs
            ],
            "jobIds": job_ids,
        }
    except Exception:
        log.exception("batch %s: unexpected error", task.request.id)
        return {
            "results": [
                _rejection(job, Reason.INTERNAL_ERROR, "unexpected error; see the worker log")
                for job in jobs
            ],
            "jobIds": job_ids,
        }
    # The job ids beside the results: a reader finds a job's verdict by its id.
    return {"results": [result.to_json_dict() for result in results], "jobIds": job_ids}


def _retry_or_raise(task: Task, settings: Settings, exc: Exception) -> None:
    retries = task.request.retries
    if retries < settings.task_max_retries:
        countdown = min(settings.task_retry_backoff_max, 2**retries)
        log.warning(
            "task %s: %s, retry %d in %ds",
            task.request.id,
            type(exc).__name__,
            retries + 1,
            countdown,
        )
        raise task.retry(exc=exc, countdown=countdown) from exc


def run_reverify(task: Task, settings: Settings, batch: Any) -> dict[str, Any]:
    """Decide one batch ``{"runId", "keyIds"}`` of a re-verification run."""
    if not isinstance(batch, dict) or not isinstance(batch.get("runId"), str):
        return {"decided": 0, "error": "invalid batch"}
    key_ids = [k for k in batch.get("keyIds", []) if isinstance(k, str)]
    try:
        decided = process_resources(settings).reverifier.decide_batch(batch["runId"], key_ids)
    except INFRASTRUCTURE_ERRORS as exc:
        _retry_or_raise(task, settings, exc)
        log.error("reverify batch %s: retries exhausted", task.request.id)
        return {"decided": 0, "error": "the store was unavailable; retries exhausted"}
    return {"decided": decided}


_ledger: tuple[int, Ledger | None] | None = None


def process_ledger(app: Celery) -> Ledger | None:
    """The ledger client of this worker process (None when the broker needs no ledger)."""
    global _ledger
    if _ledger is None or _ledger[0] != os.getpid():
        _ledger = (os.getpid(), ledger_for(app))
    return _ledger[1]


class VerifyTask(Task):  # type: ignore[misc]
    """A verification task: once its result is stored, its job leaves the ledger."""

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
        ledger = process_ledger(self.app)
        if ledger is None:
            return
        try:
            ledger.forget([task_id])
        except redis.RedisError as exc:
            # The sweeper drops entries whose result is stored; nothing is resent for this.
            log.warning("task %s: ledger not updated (%s)", task_id, type(exc).__name__)


def register(app: Celery, settings: Settings) -> None:
    """Register the tasks on ``app``."""
    from worker.celery_app import REVERIFY_TASK, VERIFY_BATCH_TASK, VERIFY_TASK

    @app.task(  # type: ignore[untyped-decorator]
        name=VERIFY_TASK, bind=True, base=VerifyTask, max_retries=settings.task_max_retries
    )
    def verify(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        return run_job(self, settings, job)

    @app.task(  # type: ignore[untyped-decorator]
        name=VERIFY_BATCH_TASK,
        bind=True,
        base=VerifyTask,
        max_retries=settings.task_max_retries,
    )
    def verify_batch(self: Task, batch: dict[str, Any]) -> dict[str, Any]:
        return run_batch(self, settings, batch)

    @app.task(  # type: ignore[untyped-decorator]
        name=REVERIFY_TASK, bind=True, max_retries=settings.task_max_retries
    )
    def reverify(self: Task, batch: dict[str, Any]) -> dict[str, Any]:
        return run_reverify(self, settings, batch)
