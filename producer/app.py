"""The HTTP producer: issues challenges, queues plugin bodies for the workers, answers verdicts.

Routes are adapters: they validate the contract, call the challenge store or the job queue,
and answer with a model. The producer does no cryptography; the workers decide every verdict.
Everything the app holds (the Celery app, the database engine) is built by ``create_app`` and
its lifespan from the settings given, never at import.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any, Final
from uuid import UUID

from celery import Celery
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from producer.auth import ApiKeys, Caller
from producer.docs import add_offline_docs
from producer.errors import ApiError, ErrorCode, QueueUnavailable, error_body, validation_summary
from producer.health import readiness
from producer.jobs import (
    JobQueue,
    Outcome,
    Submission,
    check_batch_item,
    check_request,
)
from producer.keys import KeyIdPath, read_key_state_async
from producer.middleware import InternalErrors, RequestGuard
from producer.ratelimit import RateLimiter, WaitBudget, retry_after_seconds
from producer.schemas import (
    BatchJob,
    BatchRequest,
    BatchResponse,
    ChallengeRequest,
    ErrorDetail,
    ErrorResponse,
    IssuedChallenge,
    JobAccepted,
    JobStatus,
    KeyStateResponse,
    Liveness,
    Readiness,
    StatusRequest,
    StatusResponse,
)
from worker.celery_app import create_celery_app
from worker.contract import AssertionRequest, Kind, RegistrationRequest
from worker.core import Rejected
from worker.settings import Settings, load_settings
from worker.store.challenges import Purpose, issue_challenge
from worker.store.db import create_store_engine, session_factory
from worker.version import __version__

log = logging.getLogger("appattest.producer")

# A batch carries up to max_batch_jobs bodies, but is never read past this many bytes (a
# registration body is about 6 KiB; parsed, a batch takes about four times its size).
MAX_BATCH_BODY_BYTES: Final = 16 * 1024 * 1024

_DATABASE_DOWN = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)


@dataclass(frozen=True)
class _Resources:
    """What the routes use, built by the lifespan."""

    settings: Settings
    queue: JobQueue
    engine: Engine
    sessions: sessionmaker[Session]


def _resources(request: Request) -> _Resources:
    resources: _Resources | None = getattr(request.app.state, "resources", None)
    if resources is None:
        raise RuntimeError("the app's lifespan has not run (use it as a context manager)")
    return resources


Resources = Annotated[_Resources, Depends(_resources)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


def _charge(request: Request, cost: int, *, take: bool = True) -> None:
    """Take ``cost`` tokens from the bucket of the request's API key, or with ``take=False``
    only check that they are there; 429 with ``Retry-After`` when they are not."""
    limiter: RateLimiter = request.app.state.rate_limiter
    key = request.state.api_key
    wait = limiter.acquire(key, cost) if take else limiter.wait_time(key, cost)
    if wait > 0:
        seconds = retry_after_seconds(wait)
        log.info("rate limited %s %s: retry after %ds", request.method, request.url.path, seconds)
        raise ApiError(
            429,
            ErrorCode.RATE_LIMITED,
            f"too many requests for this API key; retry after {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


async def _authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admit a request with a valid API key (401 otherwise), and note which key it was."""
    keys: ApiKeys = request.app.state.api_keys
    matched = keys.match(credentials.credentials if credentials else None)
    if matched is None:
        raise ApiError(
            401,
            ErrorCode.UNAUTHORIZED,
            "a valid API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # The key's stored hash identifies it to the limiter; the key itself is not kept.
    request.state.api_key = matched.digest
    request.state.caller = matched


def _caller(request: Request) -> Caller:
    caller: Caller = request.state.caller
    return caller


async def _rate_limit(request: Request) -> None:
    """Charge one request to its key (after ``_authenticate``)."""
    _charge(request, 1)


async def _rate_limit_check(request: Request) -> None:
    """Refuse a request whose key has no token left, taking none: for the batch route, which
    charges once it knows how many jobs the batch carries."""
    _charge(request, 1, take=False)


@contextmanager
def _waiting_on(request: Request, count: int) -> Iterator[None]:
    """Hold ``count`` ids of the wait budget of the request's key while the block runs; 429
    ``too_many_waits`` when the key is already waiting on its share."""
    budget: WaitBudget = request.app.state.wait_budget
    key = request.state.api_key
    if not budget.take(key, count):
        log.info("refused a wait on %d jobs: %d held by its key", count, budget.held(key))
        raise ApiError(
            429,
            ErrorCode.TOO_MANY_WAITS,
            f"this API key is already waiting on {budget.held(key)} jobs (at most "
            f"{budget.limit} at once); retry later or ask without wait",
            headers={"Retry-After": "1"},
        )
    try:
        yield
    finally:
        budget.release(key, count)


async def _wait_budget(request: Request) -> AsyncIterator[None]:
    """A request for one job with ``?wait`` holds one id of its key's wait budget (after
    ``_authenticate``)."""
    if "wait" not in request.query_params:
        yield
        return
    with _waiting_on(request, 1):
        yield


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def _request_body(model: type[BaseModel], description: str) -> dict[str, Any]:
    """OpenAPI for a body that the route reads and validates itself."""
    schema = model.model_json_schema(by_alias=True)
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": inline(schema)}},
        }
    }


def _json(
    model: BaseModel,
    status: int,
    *,
    exclude_none: bool = False,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    content = model.model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    return JSONResponse(content, status_code=status, headers=headers)


Wait = Annotated[
    float | None,
    Query(
        gt=0,
        allow_inf_nan=False,
        description="Wait up to this many seconds for the verdict (at most the server's "
        "max_wait_seconds); without it, answer at once.",
    ),
]


def _checked_wait(wait: float | None, settings: Settings) -> float | None:
    if wait is not None and not (math.isfinite(wait) and wait <= settings.max_wait_seconds):
        raise ApiError(
            422,
            ErrorCode.INVALID_REQUEST,
            f"wait must be above 0 and at most {settings.max_wait_seconds} seconds",
        )
    return wait


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r"^[\x21-\x7e]{1,255}$",
        description="Makes retries safe: the same key with the same body within "
        "idempotency_ttl_seconds answers with the first job (and its verdict once known); "
        "with another body, 409 idempotency_conflict.",
    ),
]

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
            status = await queue.wait_async(outcome.job_id, wait, owner=_caller(request).owner)
        except QueueUnavailable as exc:
            log.warning("job %s: accepted, but waiting for it failed: %s", outcome.job_id, exc)
        else:
            if status.final:
                # Done with its verdict, or lost (its message died with the broker's data).
                return _json(status, 200, headers=headers)
    return _json(JobAccepted(jobId=outcome.job_id), 202, headers=headers)


async def _submit(
    request: Request,
    resources: _Resources,
    kind: Kind,
    wait: float | None,
    idempotency_key: str | None,
) -> JSONResponse:
    wait = _checked_wait(wait, resources.settings)
    if len(request.headers.getlist("idempotency-key")) > 1:
        # Which of two keys would the retry match? Neither is taken.
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "send at most one Idempotency-Key header")
    plugin = check_request(await request.body(), expected=kind)
    outcome = await run_in_threadpool(
        partial(
            resources.queue.accept,
            plugin,
            owner=_caller(request).owner,
            idempotency_key=idempotency_key,
        )
    )
    return await _answer(request, resources.queue, outcome, wait)


# Routes -------------------------------------------------------------------------------------


async def healthz() -> Liveness:
    """Answers 200 while the process runs; touches no dependency."""
    return Liveness(version=__version__)


async def readyz(resources: Resources) -> JSONResponse:
    """200 when the broker, the result backend and the database answer; 503 otherwise."""
    result = await readiness(resources.queue.celery_app, resources.engine)
    return _json(result, 200 if result.status == "ready" else 503)


def create_challenge(body: ChallengeRequest, resources: Resources) -> IssuedChallenge:
    """A fresh challenge for one registration or assertion, valid for the configured TTL;
    with ``keyId``, only that key may use it."""
    # A plain function: FastAPI runs it in a worker thread, so the database call blocks no one.
    with resources.sessions() as session, session.begin():
        challenge, expires_at = issue_challenge(
            session,
            purpose=Purpose(body.purpose),
            key_id=body.key_id,
            ttl=timedelta(seconds=resources.settings.challenge_ttl_seconds),
            now=datetime.now(UTC),
        )
    return IssuedChallenge(
        challenge=challenge, expiresAt=expires_at, purpose=body.purpose, keyId=body.key_id
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
    raw: bytes, resources: _Resources, charge: Callable[[int], None], caller: Caller
) -> BatchResponse:
    # A batch costs one token per job, in one charge, so that a batch larger than the burst
    # is admitted on a full bucket (see RateLimiter.acquire); a refused batch costs one.
    try:
        items = _batch_items(raw, resources.settings.max_batch_jobs)
    except ApiError:
        charge(1)
        raise
    charge(len(items))
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
    for (index, _), outcome in zip(valid, accepted, strict=True):
        if outcome.error is None:
            outcomes.append(BatchJob(index=index, jobId=outcome.job_id, status="pending"))
        else:
            outcomes.append(BatchJob(index=index, status="rejected", error=outcome.error))
    return BatchResponse(jobs=sorted(outcomes, key=lambda outcome: outcome.index))


async def submit_jobs(request: Request, resources: Resources) -> JSONResponse:
    """Queue ``{"jobs": [{"type", "body"}, ...]}``; one entry per item, queued or rejected."""
    # Parsing and queueing a large batch takes a while: in a worker thread, off the loop.
    result = await run_in_threadpool(
        _submit_batch, await request.body(), resources, partial(_charge, request), _caller(request)
    )
    # Without nulls: an accepted item has no error, a rejected one no job id.
    return _json(result, 202, exclude_none=True)


async def get_job(
    request: Request,
    job_id: Annotated[UUID, Path(alias="jobId")],
    resources: Resources,
    wait: Wait = None,
) -> JobStatus:
    """The job's status; with ``wait``, hold on for the verdict up to that many seconds. A job
    this API key did not submit is 404 ``job_not_found``, like one that never existed."""
    wait = _checked_wait(wait, resources.settings)
    owner = _caller(request).owner
    if wait is None:
        status = await run_in_threadpool(partial(resources.queue.status, str(job_id), owner=owner))
    else:
        status = await resources.queue.wait_async(str(job_id), wait, owner=owner)
    if status.status == "not_found":
        assert status.error is not None
        raise ApiError(404, ErrorCode.JOB_NOT_FOUND, status.error.detail)
    return status


async def get_jobs(request: Request, resources: Resources, wait: Wait = None) -> StatusResponse:
    """The statuses of up to ``max_batch_jobs`` jobs at once; with ``wait``, hold on until all
    are done or that many seconds passed. Collecting the verdicts of a bulk submission this
    way costs one request per batch instead of one per job."""
    try:
        wait = _checked_wait(wait, resources.settings)
        asked = _status_request(await request.body(), resources.settings.max_batch_jobs)
    except ApiError:
        _charge(request, 1)  # a refused request costs one token, like any other
        raise
    # One token per id read, like a batch: polling many ids costs what polling each would.
    _charge(request, len(asked.job_ids))
    owner = _caller(request).owner
    if wait is None:
        found = await run_in_threadpool(
            partial(resources.queue.statuses, asked.job_ids, owner=owner)
        )
    else:
        with _waiting_on(request, len(asked.job_ids)):
            found = await resources.queue.wait_many_async(asked.job_ids, wait, owner=owner)
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


async def get_key(request: Request, key_id: KeyIdPath, resources: Resources) -> KeyStateResponse:
    """A registered key's state, for the API key that registered it (404 ``not_found`` for
    any other, like a key never registered; see producer.keys)."""
    owner = _caller(request).owner
    return await read_key_state_async(resources.sessions, key_id, owner.name)


def _add_routes(app: FastAPI) -> None:
    """Register the routes on ``app`` itself (not through an included router), so that
    ``app.routes`` lists every path."""
    auth = [Depends(_authenticate), Depends(_rate_limit)]
    waiting = [*auth, Depends(_wait_budget)]
    # The batch and status routes charge the rate limit themselves, once they know how many
    # jobs they carry; before reading the body, they only check that the key has a token left.
    batch_auth = [Depends(_authenticate), Depends(_rate_limit_check)]
    # Every route with a body answers these (see producer.middleware.RequestGuard).
    refusals = _errors(400, 401, 408, 413, 415, 422, 429, 500, 503)
    job_answers: dict[int | str, dict[str, Any]] = {
        202: {"model": JobAccepted, "description": "Queued; the verdict is not in yet."},
        200: {"model": JobStatus, "description": "Done within `wait`: the verdict."},
        **refusals,
    }
    app.add_api_route(
        "/healthz",
        healthz,
        methods=["GET"],
        summary="Liveness: the process answers",
        response_model=Liveness,
        tags=["health"],
    )
    app.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        summary="Readiness: the broker, the result backend and the database answer",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Some dependency is unavailable."}},
        tags=["health"],
    )
    app.add_api_route(
        "/v1/challenges",
        create_challenge,
        methods=["POST"],
        summary="Issue a one-time challenge",
        status_code=201,
        response_model=IssuedChallenge,
        responses=refusals,
        dependencies=auth,
        tags=["challenges"],
    )
    app.add_api_route(
        "/v1/attestations",
        submit_attestation,
        methods=["POST"],
        summary="Queue a registration (the plugin's attestation body)",
        status_code=202,
        response_model=None,
        responses=job_answers,
        dependencies=waiting,
        openapi_extra=_request_body(RegistrationRequest, "The plugin's registration body."),
        tags=["jobs"],
    )
    app.add_api_route(
        "/v1/assertions",
        submit_assertion,
        methods=["POST"],
        summary="Queue an assertion (the plugin's assertion body, optionally naming its challenge)",
        status_code=202,
        response_model=None,
        responses=job_answers,
        dependencies=waiting,
        openapi_extra=_request_body(
            AssertionRequest,
            "The plugin's assertion body. With `challenge`, the payload must contain it.",
        ),
        tags=["jobs"],
    )
    app.add_api_route(
        "/v1/jobs",
        submit_jobs,
        methods=["POST"],
        summary="Queue several jobs at once; each item is accepted or rejected on its own",
        status_code=202,
        response_model=None,
        responses={202: {"model": BatchResponse}, **refusals},
        dependencies=batch_auth,
        openapi_extra=_request_body(BatchRequest, "Up to max_batch_jobs items."),
        tags=["jobs"],
    )
    app.add_api_route(
        "/v1/keys/{keyId:path}",
        get_key,
        methods=["GET"],
        summary="A registered key's state: counter, revocation, receipt dates, risk metric",
        response_model=KeyStateResponse,
        responses=_errors(401, 404, 422, 429, 500, 503),
        dependencies=auth,
        tags=["keys"],
    )
    app.add_api_route(
        "/v1/jobs/{jobId}",
        get_job,
        methods=["GET"],
        summary="A job's status and, once done, its verdict",
        response_model=JobStatus,
        responses=_errors(401, 422, 429, 500, 503),
        dependencies=waiting,
        tags=["jobs"],
    )
    app.add_api_route(
        "/v1/jobs/status",
        get_jobs,
        methods=["POST"],
        summary="The statuses of many jobs at once",
        response_model=StatusResponse,
        responses=refusals,
        dependencies=batch_auth,
        tags=["jobs"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": StatusRequest.model_json_schema()}},
            }
        },
    )


# Errors -------------------------------------------------------------------------------------


def _error(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, detail), status_code=status, headers=headers)


async def _on_api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.code, exc.detail, exc.headers)


async def _on_rejected(_request: Request, exc: Exception) -> JSONResponse:
    # The producer rejects only what is not the contract or not iOS App Attest.
    assert isinstance(exc, Rejected)
    return _error(422, exc.reason.value, exc.detail)


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _error(422, ErrorCode.INVALID_REQUEST, validation_summary(exc.errors()))


_HTTP_CODES: Final = {
    400: ErrorCode.INVALID_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    422: ErrorCode.INVALID_REQUEST,
}


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    fallback = ErrorCode.INVALID_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL_ERROR
    code = _HTTP_CODES.get(exc.status_code, fallback)
    return _error(exc.status_code, code, str(exc.detail), exc.headers)


async def _on_queue_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("queue unavailable: %s", exc)
    return _error(503, ErrorCode.SERVICE_UNAVAILABLE, f"{exc}; try again later")


async def _on_database_down(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", type(exc).__name__)
    return _error(
        503, ErrorCode.SERVICE_UNAVAILABLE, "the challenge store is unavailable; try again later"
    )


# The app -----------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    *,
    celery_app: Celery | None = None,
    rate_limiter: RateLimiter | None = None,
) -> FastAPI:
    """Build the producer's FastAPI app for these settings.

    ``celery_app`` is the Celery app to queue jobs through; without one, the lifespan builds
    it from the settings and closes it on shutdown (one passed in stays the caller's). The
    database engine for challenges is built by the lifespan and disposed on shutdown, so the
    app must run with its lifespan (uvicorn does; use ``TestClient`` as a context manager).
    ``rate_limiter`` holds the per-key limits; without one, it is built from the settings
    (``rate_limit_per_second``, ``rate_limit_burst``). Raises ``ValueError`` when those are
    out of range.
    """
    api_keys = ApiKeys(settings.api_keys)
    limiter = rate_limiter if rate_limiter is not None else RateLimiter.from_settings(settings)
    if not api_keys:
        log.warning("no API keys are configured: every /v1 request will be refused")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = celery_app is None
        celery = create_celery_app(settings) if celery_app is None else celery_app
        engine = create_store_engine(settings.store_url)
        sessions = session_factory(engine)
        app.state.resources = _Resources(
            # The keys themselves stay out of what the app keeps: it has their hashes.
            settings=settings.model_copy(update={"api_keys": []}),
            queue=JobQueue(
                celery,
                sessions=sessions,
                idempotency_ttl=settings.idempotency_ttl_seconds,
            ),
            engine=engine,
            sessions=sessions,
        )
        try:
            yield
        finally:
            app.state.resources.queue.close()
            del app.state.resources
            engine.dispose()
            if owned:
                celery.close()

    app = FastAPI(
        title="App Attest verification",
        summary="Queues App Attest attestations and assertions for verification.",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    add_offline_docs(app)
    app.state.api_keys = api_keys
    app.state.rate_limiter = limiter
    app.state.wait_budget = WaitBudget(settings.max_waits_per_key)
    _add_routes(app)

    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(Rejected, _on_rejected)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(QueueUnavailable, _on_queue_unavailable)
    for error in _DATABASE_DOWN:
        app.add_exception_handler(error, _on_database_down)

    batch_limit = max(
        settings.max_body_bytes,
        min(settings.max_body_bytes * settings.max_batch_jobs, MAX_BATCH_BODY_BYTES),
    )
    # Every POST route takes a JSON body (none has a path parameter, so paths match exactly).
    json_routes = {
        route.path
        for route in app.routes
        if isinstance(route, APIRoute) and "POST" in (route.methods or ())
    }
    app.add_middleware(
        RequestGuard,
        authorized=api_keys.accepts,
        json_routes=json_routes,
        limit=settings.max_body_bytes,
        per_path={"/v1/jobs": batch_limit},
        body_timeout=settings.body_timeout_seconds,
        max_in_flight_per_client=settings.max_connections_per_client,
        max_body_bytes_in_flight=settings.max_body_bytes_in_flight,
    )
    # Added last, so outermost: it also catches what the guard might raise.
    app.add_middleware(InternalErrors)
    return app


def from_environment() -> FastAPI:
    """The app with settings read from the ``APPATTEST_*`` environment variables, for
    ``uvicorn --factory producer.app:from_environment``."""
    return create_app(load_settings())
