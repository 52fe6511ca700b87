"""A real service stack for integration tests: a fresh PostgreSQL database, Redis databases,
and Celery worker subprocesses started with ``appattest worker``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from producer.auth import ApiKeys
from producer.batching import Owner
from worker.queue.app import create_celery_app
from worker.settings import Settings, load_settings
from worker.store.db import create_store_engine, upgrade

REDIS_URL = os.environ.get("APPATTEST_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Pairs of Redis databases the test suite may use (broker, results). A session leases a free
# pair with a lock key in database 0, so test sessions running side by side on one machine
# never share a queue; a leased pair is flushed before use.
DB_PAIRS = [(2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)]
_LEASE_SECONDS = 3600


def key_owner(key: str) -> Owner:
    """The owner whose seal the API puts on the job ids of the API key ``key``."""
    caller = ApiKeys([SecretStr(key)]).match(key)
    assert caller is not None
    return caller.owner


@contextmanager
def leased_redis_pair() -> Iterator[tuple[int, int]]:
    """Lease a free (broker, results) pair of Redis databases for the length of the block."""
    client = redis.Redis.from_url(f"{REDIS_URL}/0")
    token = f"{os.getpid()}-{time.time()}"
    try:
        for pair in DB_PAIRS:
            key = f"appattest-test-lease:{pair[0]}"
            if client.set(key, token, nx=True, ex=_LEASE_SECONDS):
                try:
                    flush_redis(*pair)
                    yield pair
                finally:
                    if client.get(key) == token.encode():
                        client.delete(key)
                return
        raise RuntimeError("every test Redis database pair is leased by another session")
    finally:
        client.close()


@dataclass
class Stack:
    """Settings shared by the test process and its worker subprocesses."""

    env: dict[str, str]
    settings: Settings
    workdir: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(
        self,
        *,
        concurrency: int = 1,
        pool: str = "prefork",
        name: str = "w",
        supervise: bool = False,
        args: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``appattest worker`` and wait until it answers a ping.

        Unless ``supervise``, the Celery worker runs without its supervisor
        (``--no-supervise``), so that killing the process group kills the worker for good;
        ``args`` are more options of the command."""
        log_path = self.workdir / f"worker-{name}-{len(self.workers)}.log"
        hostname = f"{name}{len(self.workers)}@%h"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker.cli.commands",
                    "worker",
                    f"--concurrency={concurrency}",
                    f"--pool={pool}",
                    f"--hostname={hostname}",
                    "--loglevel=INFO",
                    "--supervise" if supervise else "--no-supervise",
                    *args,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(proc)
        app = create_celery_app(self.settings)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see {log_path}")
                try:
                    replies = app.control.ping(timeout=0.5) or []
                except (redis.ConnectionError, OSError):
                    # A broker that just restarted: the first broadcast may hit a dead socket.
                    replies = []
                if any(hostname.split("@")[0] in next(iter(r)) for r in replies):
                    return proc
        finally:
            app.close()
        raise RuntimeError(f"worker did not answer a ping within 60 s; see {log_path}")

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.workers.clear()


@contextmanager
def fresh_database(admin_url: str, prefix: str = "appattest_test") -> Iterator[str]:
    """A new, empty database on the PostgreSQL server of ``admin_url``; dropped on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def server_versions(engine: Engine) -> dict[str, str]:
    """The versions of the PostgreSQL server of ``engine`` and of the Redis server."""
    with engine.connect() as conn:
        pg = str(conn.scalar(text("SHOW server_version")))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        info: Any = client.info("server")
    finally:
        client.close()
    return {"postgresql": pg.split()[0], "redis": str(info.get("redis_version", "?"))}


def flush_redis(*dbs: int) -> None:
    for db in dbs:
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
        try:
            client.flushdb()
        finally:
            client.close()


@contextmanager
def service_stack(
    *,
    store_url: str,
    root_pem: bytes,
    workdir: Path,
    app_ids: str,
    dev_app_ids: str = "",
    broker_url: str | None = None,
    result_backend: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """Migrate the store, lease and flush a pair of test Redis databases (unless URLs are
    given), and yield a stack; workers started through it are stopped on exit."""
    with ExitStack() as cleanup:
        if broker_url is None or result_backend is None:
            broker_db, backend_db = cleanup.enter_context(leased_redis_pair())
            broker_url = broker_url or f"{REDIS_URL}/{broker_db}"
            result_backend = result_backend or f"{REDIS_URL}/{backend_db}"
        yield from _stack(
            store_url=store_url,
            root_pem=root_pem,
            workdir=workdir,
            app_ids=app_ids,
            dev_app_ids=dev_app_ids,
            broker_url=broker_url,
            result_backend=result_backend,
            extra_env=extra_env,
        )


def _stack(
    *,
    store_url: str,
    root_pem: bytes,
    workdir: Path,
    app_ids: str,
    dev_app_ids: str,
    broker_url: str,
    result_backend: str,
    extra_env: dict[str, str] | None,
) -> Iterator[Stack]:
    root = workdir / "root.pem"
    root.write_bytes(root_pem)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")},
        "APPATTEST_STORE_URL": store_url,
        "APPATTEST_BROKER_URL": broker_url,
        "APPATTEST_RESULT_BACKEND": result_backend,
        "APPATTEST_APP_IDS": app_ids,
        "APPATTEST_DEV_APP_IDS": dev_app_ids,
        "APPATTEST_ROOT_CA": str(root),
        "APPATTEST_TASK_MAX_RETRIES": "3",
        "APPATTEST_TASK_RETRY_BACKOFF_MAX": "2",
        **(extra_env or {}),
    }
    settings = load_settings(
        store_url=store_url,
        broker_url=broker_url,
        result_backend=result_backend,
        app_ids=[a for a in app_ids.split(",") if a],
        dev_app_ids=[a for a in dev_app_ids.split(",") if a],
        root_ca=root,
        task_max_retries=3,
        task_retry_backoff_max=2,
    )
    engine = create_store_engine(store_url)
    upgrade(engine)
    engine.dispose()
    stack = Stack(env=env, settings=settings, workdir=workdir)
    try:
        yield stack
    finally:
        stack.stop_workers()
