"""The job routes: ``POST /v1/attestations`` and ``/v1/assertions`` (one plugin body, with an
optional ``?wait`` for its verdict and an ``Idempotency-Key``), ``POST /v1/jobs`` (many at once),
``GET /v1/jobs/{jobId}`` and ``POST /v1/jobs/status`` (verdicts, for the key that submitted)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Annotated, Any, Final
from uuid import UUID

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from producer.auth import Caller
from producer.deps import (
    AUTH,
    BATCH_AUTH,
    REFUSALS,
    AppResources,
    IdempotencyKeyHeader,
    Resources,
    Wait,
    caller_of,
    charge,
    checked_wait,
    error_responses,
    json_response,
    log,
    metrics_of,
    request_body,
    waiting_on,
    waits_in_progress,
)
from producer.errors import ApiError, ErrorCode, QueueUnavailable, validation_summary
from producer.jobs import JobQueue, Outcome, Submission, check_batch_item, check_request
from producer.metrics import ProducerMetrics
from producer.schemas import (
    BatchJob,
    BatchRequest,
    BatchResponse,
    ErrorDetail,
    JobAccepted,
    JobStatus,
    StatusRequest,
    StatusResponse,
)
from worker.contract import AssertionRequest, Kind, RegistrationRequest, Rejected

router = APIRouter(prefix="/v1", tags=["jobs"])

_JOB_ANSWERS: Final[dict[int | str, dict[str, Any]]] = {
    202: {"model": JobAccepted, "description": "Queued; the verdict is not in yet."},
    200: {"model": JobStatus, "description": "Done within `wait`: the verdict."},
    **REFUSALS,
}

_OUTCOME_STATUS: Final = {
    ErrorCode.IDEMPOTENCY_CONFLICT: 409,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
}


async def _answer(
    request: Request, queue: JobQueue, outcome: Outcome, wait: float | None
) -> JSONResponse:
    """202 with the job id; or, when asked to wait and the verdict came in time, 200 with it.
    Once a job id exists the caller gets it: a wait that fails (the result backend went away)
    answers 202 with the id, never an error."""
    if outcome.error is not None:
        code = ErrorCode(outcome.error.code)
        raise ApiError(_OUTCOME_STATUS.get(code, 422), code, outcome.error.detail)
    assert outcome.job_id is not None
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    if wait is not None:
        try:
            status = await queue.wait_async(outcome.job_id, wait, owner=caller_of(request).owner)
        except QueueUnavailable as exc:
            log.warning("job %s: accepted, but waiting for it failed: %s", outcome.job_id, exc)
        else:
            if status.final:
                # Done with its verdict, or lost (its message died with the broker's data).
                return json_response(status, 200, headers=headers)
            metrics_of(request).wait_timeouts.inc()
    return json_response(JobAccepted(jobId=outcome.job_id), 202, headers=headers)


async def _submit(
    request: Request,
    resources: AppResources,
    kind: Kind,
    wait: float | None,
    idempotency_key: str | None,
) -> JSONResponse:
    wait = checked_wait(wait, resources.settings)
    if len(request.headers.getlist("idempotency-key")) > 1:
        # Which of two keys would the retry match? Neither is taken.
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "send at most one Idempotency-Key header")
    # A wait holds an id of the key's wait budget from before the job is accepted (429
    # too_many_waits refuses the request, never a job already queued) until it ends.
    with waiting_on(request, 1) if wait is not None else nullcontext():
        plugin = check_request(await request.body(), expected=kind)
        outcome = await resources.queue.accept_async(
            plugin,
            owner=caller_of(request).owner,
            idempotency_key=idempotency_key,
            # Waiting alone (no other wait in this process): not the first of a burst, so its
            # job goes at once instead of waiting for company that will not come.
            at_once=wait is not None and waits_in_progress(request) == 1,
        )
        if outcome.error is None and not outcome.replayed:
            metrics_of(request).jobs_submitted.labels(kind).inc()
        return await _answer(request, resources.queue, outcome, wait)


@router.post(
    "/attestations",
    summary="Queue a registration (the plugin's attestation body)",
    status_code=202,
    response_model=None,
    responses=_JOB_ANSWERS,
    dependencies=AUTH,
    openapi_extra=request_body(RegistrationRequest, "The plugin's registration body."),
)
async def submit_attestation(
    request: Request,
    resources: Resources,
    wait: Wait = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    """Queue a registration body; 202 with the job id, or 200 with the verdict within
    ``wait``."""
    return await _submit(request, resources, "registration", wait, idempotency_key)


@router.post(
    "/assertions",
    summary="Queue an assertion (the plugin's assertion body, optionally naming its challenge)",
    status_code=202,
    response_model=None,
    responses=_JOB_ANSWERS,
    dependencies=AUTH,
    openapi_extra=request_body(
        AssertionRequest,
        "The plugin's assertion body. With `challenge`, the payload must contain it.",
    ),
)
async def submit_assertion(
    request: Request,
    resources: Resources,
    wait: Wait = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    """Queue an assertion body; 202 with the job id, or 200 with the verdict within
    ``wait``."""
    return await _submit(request, resources, "assertion", wait, idempotency_key)


def _batch_items(raw: bytes, max_jobs: int) -> list[Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "body is not valid JSON") from exc
    if not isinstance(data, dict) or set(data) != {"jobs"} or not isinstance(data["jobs"], list):
        raise ApiError(422, ErrorCode.INVALID_REQUEST, 'body must be {"jobs": [...]}')
    items: list[Any] = data["jobs"]
    if not items:
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "jobs is empty")
    if len(items) > max_jobs:
        raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"at most {max_jobs} jobs per batch")
    return items


def _submit_batch(
    raw: bytes,
    resources: AppResources,
    pay: Callable[[int], None],
    caller: Caller,
    metrics: ProducerMetrics,
) -> BatchResponse:
    # A batch costs one token per job, in one charge, so that a batch larger than the burst
    # is admitted on a full bucket (see RateLimiter.acquire); a refused batch costs one.
    try:
        items = _batch_items(raw, resources.settings.max_batch_jobs)
    except ApiError:
        pay(1)
        raise
    pay(len(items))
    outcomes: list[BatchJob] = []
    valid: list[tuple[int, Submission]] = []
    for index, item in enumerate(items):
        try:
            request, idempotency_key = check_batch_item(item)
        except Rejected as exc:
            error = ErrorDetail(code=exc.reason.value, detail=exc.detail)
            outcomes.append(BatchJob(index=index, status="rejected", error=error))
        else:
            valid.append((index, Submission(request, caller.owner, idempotency_key)))
    accepted = resources.queue.accept_many([s for _, s in valid]) if valid else []
    for (index, submission), outcome in zip(valid, accepted, strict=True):
        if outcome.error is None and not outcome.replayed:
            assertion = isinstance(submission.request, AssertionRequest)
            metrics.jobs_submitted.labels("assertion" if assertion else "registration").inc()
        if outcome.error is None:
            outcomes.append(BatchJob(index=index, jobId=outcome.job_id, status="pending"))
        else:
            outcomes.append(BatchJob(index=index, status="rejected", error=outcome.error))
    return BatchResponse(jobs=sorted(outcomes, key=lambda outcome: outcome.index))


@router.post(
    "/jobs",
    summary="Queue several jobs at once; each item is accepted or rejected on its own",
    status_code=202,
    response_model=None,
    responses={202: {"model": BatchResponse}, **REFUSALS},
    dependencies=BATCH_AUTH,
    openapi_extra=request_body(BatchRequest, "Up to max_batch_jobs items."),
)
async def submit_jobs(request: Request, resources: Resources) -> JSONResponse:
    """Queue ``{"jobs": [{"type", "body"}, ...]}``; one entry per item, queued or rejected."""
    # Parsing and queueing a large batch takes a while: in a worker thread, off the loop.
    result = await run_in_threadpool(
        _submit_batch,
        await request.body(),
        resources,
        partial(charge, request),
        caller_of(request),
        metrics_of(request),
    )
    # Without nulls: an accepted item has no error, a rejected one no job id.
    return json_response(result, 202, exclude_none=True)


@router.get(
    "/jobs/{jobId}",
    summary="A job's status and, once done, its verdict",
    response_model=JobStatus,
    responses=error_responses(401, 422, 429, 500, 503),
    dependencies=AUTH,
)
async def get_job(
    request: Request,
    job_id: Annotated[UUID, Path(alias="jobId")],
    resources: Resources,
    wait: Wait = None,
) -> JobStatus:
    """The job's status; with ``wait``, hold on for the verdict up to that many seconds. A job
    this API key did not submit is 404 ``job_not_found``, like one that never existed."""
    wait = checked_wait(wait, resources.settings)
    owner = caller_of(request).owner
    if wait is None:
        status = await run_in_threadpool(partial(resources.queue.status, str(job_id), owner=owner))
    else:
        with waiting_on(request, 1):
            status = await resources.queue.wait_async(str(job_id), wait, owner=owner)
        if not status.final:
            metrics_of(request).wait_timeouts.inc()
    if status.status == "not_found":
        assert status.error is not None
        # job_not_found, or job_expired for a job older than the verdicts kept.
        raise ApiError(404, ErrorCode(status.error.code), status.error.detail)
    return status


@router.post(
    "/jobs/status",
    summary="The statuses of many jobs at once",
    response_model=StatusResponse,
    responses=REFUSALS,
    dependencies=BATCH_AUTH,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": StatusRequest.model_json_schema()}},
        }
    },
)
async def get_jobs(request: Request, resources: Resources, wait: Wait = None) -> StatusResponse:
    """The statuses of up to ``max_batch_jobs`` jobs at once; with ``wait``, hold on until all
    are done or that many seconds passed. Collecting the verdicts of a bulk submission this
    way costs one request per batch instead of one per job."""
    try:
        wait = checked_wait(wait, resources.settings)
        asked = _status_request(await request.body(), resources.settings.max_batch_jobs)
    except ApiError:
        charge(request, 1)  # a refused request costs one token, like any other
        raise
    # One token per id read, like a batch: polling many ids costs what polling each would.
    charge(request, len(asked.job_ids))
    owner = caller_of(request).owner
    if wait is None:
        found = await run_in_threadpool(
            partial(resources.queue.statuses, asked.job_ids, owner=owner)
        )
    else:
        with waiting_on(request, len(asked.job_ids)):
            found = await resources.queue.wait_many_async(asked.job_ids, wait, owner=owner)
        if not all(status.final for status in found):
            metrics_of(request).wait_timeouts.inc()
    return StatusResponse(jobs=found)


def _status_request(raw: bytes, max_jobs: int) -> StatusRequest:
    try:
        asked = StatusRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise ApiError(422, ErrorCode.INVALID_REQUEST, validation_summary(errors)) from exc
    if len(asked.job_ids) > max_jobs:
        raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"at most {max_jobs} jobs per request")
    for job_id in asked.job_ids:
        try:
            UUID(job_id)
        except ValueError as exc:
            raise ApiError(422, ErrorCode.INVALID_REQUEST, "jobIds must be UUIDs") from exc
    return asked
