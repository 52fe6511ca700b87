"""Liveness and readiness: ``GET /healthz`` and ``GET /readyz`` (no API key)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse

from producer.deps import Resources, json_response
from producer.health import readiness
from producer.schemas import Liveness, Readiness
from worker.version import __version__

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers", response_model=Liveness)
async def healthz() -> Liveness:
    """Answers 200 while the process runs; touches no dependency."""
    return Liveness(version=__version__)


@router.get(
    "/readyz",
    summary="Readiness: the broker, the result backend and the database answer",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Some dependency is unavailable."}},
)
async def readyz(resources: Resources) -> JSONResponse:
    """200 when the broker, the result backend and the database answer; 503 otherwise."""
    result = await readiness(resources.queue.celery_app, resources.engine)
    return json_response(result, 200 if result.status == "ready" else 503)
