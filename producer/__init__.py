"""The producer: the HTTP API and Python clients in front of the verification workers.

It validates plugin bodies against the contract, issues challenges, queues jobs and answers
with the workers' verdicts; it does no cryptography itself. ``create_app(settings)`` builds the
FastAPI app; ``AppAttestClient`` / ``AsyncAppAttestClient`` call it over HTTP; ``QueueClient``
queues through the broker directly.

Each name is imported when first used: ``from producer import AppAttestClient`` loads the
client's modules (httpx, pydantic) and not the server's (FastAPI, Celery, SQLAlchemy), which
only ``create_app``, ``QueueClient`` and the error codes bring in.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from worker.version import __version__

if TYPE_CHECKING:
    from producer.app import create_app
    from producer.client import AppAttestClient, AppAttestError, AsyncAppAttestClient
    from producer.direct import QueueClient
    from producer.errors import ErrorCode, QueueUnavailable
    from producer.schemas import BatchJob, IssuedChallenge, JobAccepted, JobStatus

# Where each public name is defined, by module.
_EXPORTS = {
    "AppAttestClient": "producer.client",
    "AppAttestError": "producer.client",
    "AsyncAppAttestClient": "producer.client",
    "BatchJob": "producer.schemas",
    "ErrorCode": "producer.errors",
    "IssuedChallenge": "producer.schemas",
    "JobAccepted": "producer.schemas",
    "JobStatus": "producer.schemas",
    "QueueClient": "producer.direct",
    "QueueUnavailable": "producer.errors",
    "create_app": "producer.app",
}

__all__ = [
    "AppAttestClient",
    "AppAttestError",
    "AsyncAppAttestClient",
    "BatchJob",
    "ErrorCode",
    "IssuedChallenge",
    "JobAccepted",
    "JobStatus",
    "QueueClient",
    "QueueUnavailable",
    "__version__",
    "create_app",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
