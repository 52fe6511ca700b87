"""How the producer answers what a route raised: every error is the API's error shape with a
stable code (``producer.errors``), never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from producer.errors import ApiError, ErrorCode, QueueUnavailable, error_body, validation_summary
from worker.contract import Rejected

log = logging.getLogger("appattest.producer")

# The database errors that mean the store cannot be reached (503), not that it refused.
DATABASE_DOWN: Final = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
STORE_UNAVAILABLE: Final = "the challenge store is unavailable; try again later"


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
    return _error(503, ErrorCode.SERVICE_UNAVAILABLE, STORE_UNAVAILABLE)


def add_error_handlers(app: FastAPI) -> None:
    """Answer the API's own errors, contract rejections, validation and HTTP errors, and an
    unreachable queue or database (503), in the API's error shape."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(Rejected, _on_rejected)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(QueueUnavailable, _on_queue_unavailable)
    for error in DATABASE_DOWN:
        app.add_exception_handler(error, _on_database_down)
