"""Engines, sessions and schema migrations for the key store."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

# The store of `appattest serve` under its default --data-dir, so that every command that is
# given no store (verify, migrate, api, worker, reverify) uses the same one.
DEFAULT_STORE_URL = "sqlite:///appattest-data/keys.db"

POSTGRES_DRIVER_MISSING = (
    "the PostgreSQL driver (psycopg) is not installed; install the package with its "
    "postgres extra: pip install 'appattest-backend[postgres]'"
)


class MissingDriver(ImportError):
    """The database driver a store URL needs is not installed."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed beside the one writer; the busy timeout makes a second process
    # wait for the write lock instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _ping_when_idle(engine: Engine, seconds: float) -> None:
    """Test a pooled connection before use only when it sat idle in the pool for more than
    ``seconds`` (SQLAlchemy's pessimistic disconnect handling, on checkout): a connection in
    steady use costs no extra round trip, one left idle is tested as ``pool_pre_ping`` would
    and replaced when the server is gone (a ``DisconnectionError`` makes the pool retry with a
    fresh connection)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since <= seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)  # what pool_pre_ping runs
        except Exception as exc:
            raise DisconnectionError(f"a pooled connection failed its test: {exc}") from exc


def create_store_engine(
    url: str, *, ping_when_idle_for: float | None = None, **kwargs: Any
) -> Engine:
    """Create an engine for any SQLAlchemy URL; SQLite files get WAL and a busy timeout.

    Statement parameters are hidden from error messages: they hold attestations and challenge
    digests, and errors end up in logs. A PostgreSQL connection is tested before each use
    (``pool_pre_ping``), or with ``ping_when_idle_for`` only after that many seconds idle in
    the pool: for a caller that retries a statement failing on a connection the server
    dropped (the workers), which saves a round trip per transaction.
    """
    kwargs.setdefault("hide_parameters", True)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            # The default store lives in a folder of its own, created on first use.
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":
        # A URL that names no driver gets the one the postgres extra installs, not
        # SQLAlchemy's default (psycopg2), which the package does not depend on.
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs.setdefault("pool_pre_ping", ping_when_idle_for is None)
    try:
        engine = create_engine(parsed, **kwargs)
    except ImportError as exc:
        if parsed.get_backend_name() == "postgresql":
            raise MissingDriver(POSTGRES_DRIVER_MISSING) from exc
        raise
    if ping_when_idle_for is not None:
        _ping_when_idle(engine, ping_when_idle_for)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine | None = None) -> Config:
    config = Config()
    script_location = resources.files("worker.store").joinpath("migrations")
    config.set_main_option("script_location", str(script_location))
    if engine is not None:
        config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


@functools.cache
def head_revision() -> str:
    """The latest revision of the packaged migrations."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the package ships migrations"
    return head


def current_revision(connection: Connection) -> str | None:
    """The schema revision of the store, or None for a store never migrated."""
    return MigrationContext.configure(connection).get_current_revision()


@dataclass(frozen=True, slots=True)
class SchemaChange:
    """What ``upgrade`` did: the revision before (None: no schema yet) and after."""

    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def upgrade(engine: Engine, revision: str = "head") -> SchemaChange:
    """Bring the schema to ``revision`` (the latest by default) with the packaged migrations;
    return the revisions before and after."""
    config = _alembic_config(engine)
    with engine.begin() as connection:
        before = current_revision(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        return SchemaChange(before, current_revision(connection))
