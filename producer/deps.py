"""What the producer's routes depend on: the resources the lifespan builds, the caller's API
key, its rate limit and wait budget, and the small helpers every route answers with."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import JSONResponse

from producer.auth import ApiKeys, Caller
from producer.errors import ApiError, ErrorCode
from producer.issuer import ChallengeIssuer
from producer.jobs import JobQueue
from producer.metrics import ProducerMetrics
from producer.ratelimit import RateLimiter, WaitBudget, retry_after_seconds
from producer.schemas import ErrorResponse
from worker.settings import Settings

log = logging.getLogger("appattest.producer")


@dataclass(frozen=True)
class AppResources:
    """What the routes use, built by the lifespan."""

    settings: Settings
    queue: JobQueue
    engine: Engine
    sessions: sessionmaker[Session]
    challenges: ChallengeIssuer


def resources_of(request: Request) -> AppResources:
    """The app's resources; raises ``RuntimeError`` when the lifespan that builds them has not
    run."""
    resources: AppResources | None = getattr(request.app.state, "resources", None)
    if resources is None:
        raise RuntimeError("the app's lifespan has not run (use it as a context manager)")
    return resources


async def app_resources(request: Request) -> AppResources:
    return resources_of(request)


Resources = Annotated[AppResources, Depends(app_resources)]


def charge(request: Request, cost: int, *, take: bool = True) -> None:
    """Take ``cost`` tokens from the bucket of the request's API key, or with ``take=False``
    only check that they are there; 429 with ``Retry-After`` when they are not."""
    limiter: RateLimiter = request.app.state.rate_limiter
    key = request.state.api_key
    wait = limiter.acquire(key, cost) if take else limiter.wait_time(key, cost)
    if wait > 0:
        seconds = retry_after_seconds(wait)
        metrics_of(request).rate_limited.inc()
        log.info("rate limited %s %s: retry after %ds", request.method, request.url.path, seconds)
        raise ApiError(
            429,
            ErrorCode.RATE_LIMITED,
            f"too many requests for this API key; retry after {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


def _identify(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
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


class _Admit(HTTPBearer):
    """A valid API key (401 otherwise) with a token of its rate limit (429 otherwise), taken
    or, with ``take=False``, only checked (for the routes that charge once they know how many
    jobs the request carries).

    One dependency, not one per check, nor a key check depending on the bearer scheme:
    FastAPI's cost is per dependency, on every request. As an ``HTTPBearer``, it is what
    OpenAPI documents as the routes' security scheme."""

    def __init__(self, *, take: bool) -> None:
        super().__init__(
            scheme_name="HTTPBearer",
            auto_error=False,
            description="An API key: `Authorization: Bearer <key>`",
        )
        self.take = take

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        _identify(request, await super().__call__(request))
        charge(request, 1, take=self.take)


def metrics_of(request: Request) -> ProducerMetrics:
    """The app's metrics (``producer.metrics``)."""
    metrics: ProducerMetrics = request.app.state.metrics
    return metrics


def caller_of(request: Request) -> Caller:
    caller: Caller = request.state.caller
    return caller


@contextmanager
def waiting_on(request: Request, count: int) -> Iterator[None]:
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


def waits_in_progress(request: Request) -> int:
    """How many job ids the requests of this process are waiting on now, all keys together."""
    budget: WaitBudget = request.app.state.wait_budget
    return budget.total


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def request_body(model: type[BaseModel], description: str) -> dict[str, Any]:
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


def json_response(
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


def checked_wait(wait: float | None, settings: Settings) -> float | None:
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


# The dependency lists of the routes: an API key and one token of its rate limit (a route that
# waits on a job holds an id of the key's wait budget itself, see ``waiting_on``). The batch
# and status routes charge the rate limit themselves, once they know how many jobs they
# carry; before reading the body, they only check that the key has a token left.
AUTH = [Depends(_Admit(take=True))]
BATCH_AUTH = [Depends(_Admit(take=False))]
# Every route with a body answers these (see producer.middleware.RequestGuard).
REFUSALS = error_responses(400, 401, 408, 413, 415, 422, 429, 500, 503)
