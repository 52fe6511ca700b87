"""The Python clients of the HTTP API, under the names this package has always given them.

They live in ``appattest_client.client``, which a team that only calls the service can install
on its own (``clients/python``) without the server's dependencies. Importing this module loads
httpx and pydantic, and none of the server's (FastAPI, Celery, SQLAlchemy).
"""

from __future__ import annotations

from appattest_client.client import (
    DEFAULT_RETRIES,
    DEFAULT_SERVER_WAIT,
    RETRY_DELAY,
    AppAttestClient,
    AppAttestError,
    AsyncAppAttestClient,
    Body,
)

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_SERVER_WAIT",
    "RETRY_DELAY",
    "AppAttestClient",
    "AppAttestError",
    "AsyncAppAttestClient",
    "Body",
]
