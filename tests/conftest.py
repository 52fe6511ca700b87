"""Shared fixtures: the test CA, fixed instants, and real PostgreSQL databases."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text

from tests.factory import TestCA
from tests.stack import Stack, fresh_database

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
PG_ADMIN_URL = os.environ.get(
    "APPATTEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def ca() -> TestCA:
    return TestCA.create()


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc.__class__.__name__}: {exc}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (required under CI)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """The admin URL of the real PostgreSQL server; fails under CI when it is down."""
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        _unavailable(f"PostgreSQL at {PG_ADMIN_URL}", exc)
    finally:
        engine.dispose()
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with fresh_database(pg_server_url, "appattest_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh key store on each supported backend: an SQLite file and real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('store') / 'keys.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The real Redis server; fails under CI when it is down."""
    import redis

    from tests.stack import REDIS_URL

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        _unavailable(f"Redis at {REDIS_URL}", exc)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def pg_session_url(pg_server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database shared by one test session's integration tests."""
    with fresh_database(pg_server_url, "appattest_stack") as url:
        yield url


@pytest.fixture(scope="session")
def stack(
    ca: TestCA, pg_session_url: str, redis_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Redis + PostgreSQL + two real worker processes (prefork, one child each), shared by the
    integration tests of a session. Tests use their own devices and challenges."""
    from tests.factory import APP_ID
    from tests.stack import service_stack

    with service_stack(
        store_url=pg_session_url,
        root_pem=ca.root_pem,
        workdir=tmp_path_factory.mktemp("stack"),
        app_ids=APP_ID,
        dev_app_ids="TEAMID1234.com.example.devapp",
    ) as running:
        running.start_worker(concurrency=1, name="a")
        running.start_worker(concurrency=1, name="b")
        yield running
