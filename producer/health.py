"""Readiness: can the producer reach the broker, the result backend and the database?

Each check runs in a worker thread under a short deadline, all three at once, so a server that
does not answer (rather than refusing at once) costs the deadline, not a TCP timeout. A check
that misses its deadline is abandoned; its thread ends when the network call gives up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import anyio
import anyio.to_thread
from celery import Celery
from celery.backends.base import DisabledBackend
from sqlalchemy import Engine, text

from producer.schemas import Readiness
from worker.store.db import current_revision, head_revision

CHECK_TIMEOUT: Final = 2.0
OK: Final = "ok"
UNCHECKED: Final = "unchecked"


def check_broker(celery_app: Celery, timeout: float = CHECK_TIMEOUT) -> str:
    """Connect to the broker once, without retrying."""
    with celery_app.connection_for_write(connect_timeout=timeout) as connection:
        connection.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0, interval_max=0, timeout=timeout
        )
    return OK


def check_backend(celery_app: Celery) -> str:
    """Reach the result backend: ``PING`` a Redis backend, ``SELECT 1`` on a database one
    (the embedded default); any other kind is reported ``unchecked``, not failed."""
    backend = celery_app.backend
    if isinstance(backend, DisabledBackend):
        raise LookupError("no result backend is configured")
    ping = getattr(getattr(backend, "client", None), "ping", None)
    if callable(ping):
        ping()
        return OK
    open_session = getattr(backend, "ResultSession", None)
    if callable(open_session):
        session = open_session()
        try:
            session.execute(text("SELECT 1"))
        finally:
            session.close()
        return OK
    return UNCHECKED


def check_database(engine: Engine) -> str:
    """Read the schema's revision: the store must answer and be migrated to this release's
    schema, or every job would fail on a missing table or column."""
    with engine.connect() as connection:
        revision = current_revision(connection)
    head = head_revision()
    if revision == head:
        return OK
    found = "has no schema" if revision is None else f"is at schema {revision}, not {head}"
    return f"error: the key store {found}; run `appattest migrate`"


async def _run(check: Callable[[], str], timeout: float) -> str:
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
    except TimeoutError:
        return "error: TimeoutError"
    except Exception as exc:
        # The class name only: messages of connection errors can carry URLs with credentials.
        return f"error: {type(exc).__name__}"


async def readiness(
    celery_app: Celery, engine: Engine, *, timeout: float = CHECK_TIMEOUT
) -> Readiness:
    """Run the three checks concurrently; ``ready`` when none failed."""
    checks: dict[str, str] = {}

    async def run(name: str, check: Callable[[], str]) -> None:
        checks[name] = await _run(check, timeout)

    async with anyio.create_task_group() as group:
        group.start_soon(run, "broker", lambda: check_broker(celery_app, timeout))
        group.start_soon(run, "backend", lambda: check_backend(celery_app))
        group.start_soon(run, "database", lambda: check_database(engine))
    failed = any(value.startswith("error") for value in checks.values())
    ordered = {name: checks[name] for name in ("broker", "backend", "database")}
    return Readiness(status="unavailable" if failed else "ready", checks=ordered)
