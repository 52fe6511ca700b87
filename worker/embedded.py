"""The embedded default: the HTTP producer and a worker on one machine with no server to run.

The key store, the broker and the result backend are SQLite files in one data folder (the
broker through kombu's SQLAlchemy transport, results through Celery's database backend). Any
of them can be switched to a server (Redis, PostgreSQL) with the usual ``APPATTEST_*``
variables; only the ones left unset are embedded.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import uvicorn
from pydantic import SecretStr

from worker.settings import Settings
from worker.store.db import create_store_engine, upgrade

log = logging.getLogger("appattest.serve")

LOCK_FILE = "serve.lock"


class DataDirInUse(RuntimeError):
    """Another ``appattest serve`` holds the data directory."""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[int]:
    """Hold ``data_dir`` for the length of the block: an exclusive ``flock`` on its lock file;
    yields the file descriptor. The kernel releases the lock once every process holding the
    descriptor exited, however it exited (``serve`` passes it to its worker, so that the lock
    lasts until the worker is gone too). Raises DataDirInUse when another process holds it.

    Two servers on one data directory would share its queue while each ran a worker with
    its own settings (App IDs, root): one server's jobs would be decided by the other's
    worker.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirInUse(
                f"the data directory {str(data_dir.resolve())!r} is in use by another "
                f"appattest serve (pid {holder}) or its worker; stop it, or give another "
                "--data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def embedded_overrides(data_dir: Path, environ: Mapping[str, str]) -> dict[str, object]:
    """Settings that point at SQLite files in ``data_dir``, for those the environment leaves
    unset."""
    data_dir = data_dir.resolve()
    defaults = {
        "store_url": ("APPATTEST_STORE_URL", f"sqlite:///{data_dir / 'keys.db'}"),
        "broker_url": ("APPATTEST_BROKER_URL", f"sqla+sqlite:///{data_dir / 'broker.db'}"),
        "result_backend": ("APPATTEST_RESULT_BACKEND", f"db+sqlite:///{data_dir / 'results.db'}"),
    }
    return {name: value for name, (var, value) in defaults.items() if not environ.get(var)}


def ensure_api_key(settings: Settings) -> tuple[Settings, str | None]:
    """Settings with at least one API key; returns the generated key when one was made."""
    if settings.api_keys:
        return settings, None
    key = secrets.token_urlsafe(32)
    return settings.model_copy(update={"api_keys": [SecretStr(key)]}), key


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment for a worker subprocess that shares these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    env.update(
        {
            "APPATTEST_STORE_URL": settings.store_url,
            "APPATTEST_BROKER_URL": settings.broker_url,
            "APPATTEST_RESULT_BACKEND": settings.result_backend,
            "APPATTEST_TASK_MAX_RETRIES": str(settings.task_max_retries),
            "APPATTEST_TASK_RETRY_BACKOFF_MAX": str(settings.task_retry_backoff_max),
            "APPATTEST_VISIBILITY_TIMEOUT_SECONDS": str(settings.visibility_timeout_seconds),
        }
    )
    # The whole verification policy: App IDs, root and the rules for the iOS 27 extensions.
    env.update(settings.policy_environment())
    return env


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    worker_processes: int,
    data_dir: Path,
    lock_fd: int | None = None,
) -> None:
    """Migrate the store, start a worker subprocess, and serve the HTTP API until stopped.

    The caller holds ``data_dir``; the worker inherits ``lock_fd``, the descriptor of that
    lock (``data_dir_lock``), and holds it as long as it runs."""
    from producer.app import create_app
    from producer.server import server_config

    engine = create_store_engine(settings.store_url)
    upgrade(engine)
    engine.dispose()
    worker = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "worker.cli",
            "worker",
            f"--concurrency={worker_processes}",
            "--loglevel=WARNING",
            # The worker stops when this process is gone, even killed (SIGKILL): a worker left
            # running would go on deciding jobs with this server's settings.
            f"--parent-pid={os.getpid()}",
        ],
        env=worker_environment(settings),
        pass_fds=() if lock_fd is None else (lock_fd,),
        # A session of its own: signals meant for this server (a terminal's Ctrl+C) reach
        # the worker once, through ``_stop_group``.
        start_new_session=True,
    )
    try:
        config = server_config(create_app(settings), settings, host=host, port=port)
        _Server(config).run()
    finally:
        _stop_group(worker)


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT and SIGTERM make ``run`` return instead of being
    raised again once it stopped, so that ``serve`` can still stop its worker."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop the worker: SIGTERM to its supervisor, which stops the Celery worker and its pool
    in order and kills what is left of them, then SIGKILL to the supervisor's group after a
    grace period; a Celery worker still running then gets SIGTERM from the kernel as its
    parent dies, and SIGKILL from itself 30 s later (``worker.supervise.stop_with_parent``)."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
