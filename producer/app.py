"""The HTTP producer: issues challenges, queues plugin bodies for the workers, answers verdicts.

Routes are adapters (``producer.routes``): they validate the contract, call the challenge store
or the job queue, and answer with a model. The producer does no cryptography; the workers
decide every verdict. Everything the app holds (the Celery app, the database engine) is built
by ``create_app`` and its lifespan from the settings given, never at import.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final

from celery import Celery
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from producer.auth import ApiKeys
from producer.deps import AppResources
from producer.docs import add_offline_docs
from producer.handlers import add_error_handlers
from producer.issuer import ChallengeIssuer
from producer.jobs import JobQueue
from producer.metrics import ProducerMetrics, RequestContext
from producer.middleware import InternalErrors, RequestGuard
from producer.ratelimit import RateLimiter, WaitBudget
from producer.routes import ROUTERS, api_routes
from worker.queue.app import queue_app
from worker.queue.messaging import queues as messaging_queues
from worker.queue.metrics import BrokerQueues
from worker.settings import Settings, load_settings
from worker.store.db import create_store_engine, session_factory
from worker.version import __version__

log = logging.getLogger("appattest.producer")

# A batch carries up to max_batch_jobs bodies, but is never read past this many bytes (a
# registration body is about 6 KiB; parsed, a batch takes about four times its size).
MAX_BATCH_BODY_BYTES: Final = 16 * 1024 * 1024


def _lifespan(
    settings: Settings, celery_app: Celery | None, metrics: ProducerMetrics
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Build the app's resources on startup (the Celery app unless one is given, the database
    engine, the job queue, the reader of the broker's queues for the metrics) and release them
    on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = celery_app is None
        celery = queue_app(settings) if celery_app is None else celery_app
        engine = create_store_engine(settings.store_url)
        sessions = session_factory(engine)
        app.state.resources = AppResources(
            # The keys themselves stay out of what the app keeps: it has their hashes.
            settings=settings.model_copy(update={"api_keys": []}),
            queue=JobQueue(
                celery,
                sessions=sessions,
                idempotency_ttl=settings.idempotency_ttl_seconds,
                verdict_retention_days=settings.verdict_retention_days,
                batch_window=settings.batch_window_seconds,
            ),
            engine=engine,
            sessions=sessions,
            challenges=ChallengeIssuer(
                engine, ttl=timedelta(seconds=settings.challenge_ttl_seconds)
            ),
        )
        queues = BrokerQueues(settings.broker_url, messaging_queues())
        metrics.registry.register(queues)
        try:
            yield
        finally:
            metrics.registry.unregister(queues)
            queues.close()
            await app.state.resources.queue.aclose()
            app.state.resources.queue.close()
            del app.state.resources
            engine.dispose()
            if owned:
                celery.close()

    return lifespan


def _add_guard(app: FastAPI, settings: Settings, api_keys: ApiKeys) -> None:
    """Put ``RequestGuard`` before every route (key, media type, size, time, bytes held), and
    ``InternalErrors`` outermost, so that it also answers what the guard might raise."""
    batch_limit = max(
        settings.max_body_bytes,
        min(settings.max_body_bytes * settings.max_batch_jobs, MAX_BATCH_BODY_BYTES),
    )
    # Every POST route takes a JSON body (none has a path parameter, so paths match exactly).
    json_routes = {route.path for route in api_routes() if "POST" in (route.methods or ())}
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
    app.add_middleware(InternalErrors)


# FastAPI's own OpenTelemetry instrumentation (releases that have it) stays off: the service
# counts and times its requests itself (``GET /metrics``), the framework's check for an
# OpenTelemetry provider on every request took about 5 % of the API CPU of a job request in a
# profile, and its log records would quote request data that the service keeps out of its logs.
_NO_FRAMEWORK_TELEMETRY: Final[dict[str, Any]] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(
    settings: Settings,
    *,
    celery_app: Celery | None = None,
    rate_limiter: RateLimiter | None = None,
    worker_metrics_dir: Path | None = None,
) -> FastAPI:
    """Build the producer's FastAPI app for these settings.

    ``celery_app`` is the Celery app to queue jobs through; without one, the lifespan builds
    it from the settings and closes it on shutdown (one passed in stays the caller's). The
    database engine for challenges is built by the lifespan and disposed on shutdown, so the
    app must run with its lifespan (uvicorn does; use ``TestClient`` as a context manager).
    ``rate_limiter`` holds the per-key limits; without one, it is built from the settings
    (``rate_limit_per_second``, ``rate_limit_burst``). Raises ``ValueError`` when those are
    out of range, or when an API key name is configured twice. ``worker_metrics_dir`` is the
    folder of an embedded worker's metrics (``appattest serve``), which ``GET /metrics`` then
    shows too.
    """
    api_keys = ApiKeys(settings.api_keys)
    metrics = ProducerMetrics()
    if worker_metrics_dir is not None:
        metrics.add_worker_folder(worker_metrics_dir)
    limiter = rate_limiter if rate_limiter is not None else RateLimiter.from_settings(settings)
    if not api_keys:
        log.warning("no API keys are configured: every /v1 request will be refused")
    app = FastAPI(
        title="App Attest verification",
        summary="Queues App Attest attestations and assertions for verification.",
        version=__version__,
        lifespan=_lifespan(settings, celery_app, metrics),
        docs_url=None,
        redoc_url=None,
        **_NO_FRAMEWORK_TELEMETRY,
    )
    add_offline_docs(app)
    app.state.api_keys = api_keys
    app.state.metrics = metrics
    app.state.rate_limiter = limiter
    app.state.wait_budget = WaitBudget(settings.max_waits_per_key)
    for router in ROUTERS:
        app.include_router(router)
    if settings.metrics_enabled:
        # Prometheus scrapes without an API key; APPATTEST_METRICS_ENABLED=false removes it.
        app.add_api_route(
            "/metrics", partial(_metrics_page, metrics), methods=["GET"], include_in_schema=False
        )
    add_error_handlers(app)
    _add_guard(app, settings, api_keys)
    # Outside even InternalErrors: every answer, a 500 included, carries the request id and
    # is counted.
    # Routes are matched one by one for their path template: the API's (an included router is
    # one entry of app.routes), then the app's own (/metrics, the documentation).
    app.add_middleware(RequestContext, metrics=metrics, routes=[*api_routes(), *app.routes])
    return app


def _metrics_page(metrics: ProducerMetrics) -> Response:
    """The Prometheus text exposition of the producer (and of an embedded worker)."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def from_environment() -> FastAPI:
    """The app with settings read from the ``APPATTEST_*`` environment variables, for
    ``uvicorn --factory producer.app:from_environment``."""
    return create_app(load_settings())
