"""The producer's error codes and the one exception that carries them to an HTTP answer.

Every error the API returns is ``{"error": {"code": <ErrorCode>, "detail": <text>}}``. The codes
are a public contract like the verification reason codes: callers branch on them, new ones may
be added, none is ever renamed. ``detail`` is for humans and may change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from worker.contract import Reason


class ErrorCode(StrEnum):
    """Why the API refused a request (as opposed to a verdict, which carries a ``Reason``)."""

    INVALID_REQUEST = Reason.INVALID_REQUEST.value
    UNSUPPORTED_FORMAT = Reason.UNSUPPORTED_FORMAT.value
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    # No job with this id was accepted for this API key (or its record is gone).
    JOB_NOT_FOUND = "job_not_found"
    # The job was accepted, but no verdict exists and none can come: its queue message was lost
    # with the broker's data. Submit it again.
    JOB_LOST = "job_lost"
    # The job was accepted longer ago than the verdict retention (verdict_retention_days), and
    # its verdict was purged.
    JOB_EXPIRED = "job_expired"
    # An Idempotency-Key was used before with another body.
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    RATE_LIMITED = "rate_limited"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = Reason.INTERNAL_ERROR.value
    INVALID_JSON = "invalid_json"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    REQUEST_TIMEOUT = "request_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOO_MANY_WAITS = "too_many_waits"


class ApiError(Exception):
    """An error answer: the HTTP status, a stable code and a human detail."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


class QueueUnavailable(Exception):
    """The broker or the result backend could not be reached; the request was not handled."""


def error_body(code: str, detail: str) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {"error": {"code": code, "detail": detail}}


def validation_summary(errors: Sequence[Mapping[str, Any]]) -> str:
    """Where and why validation failed, for the first few errors.

    Built from each error's location and message only, never from its ``input``: the input of
    a plugin body is a token or a challenge, which must not be echoed or logged.
    """
    parts = [
        f"{'.'.join(str(part) for part in error.get('loc', ())) or 'body'}: "
        f"{error.get('msg', 'invalid')}"
        for error in errors[:3]
    ]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return ("; ".join(parts) or "invalid request") + more
