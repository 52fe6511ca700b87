"""``appattest serve``: the HTTP producer and a worker on one machine, with no server to run.

The worker is a subprocess (``python -m worker.cli.commands worker``) given the same settings,
all of them (``worker.queue.embedded.worker_environment``); the data folder and its lock are
``worker.queue.embedded``'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from producer.app import create_app
from producer.server import server_config
from worker.queue.embedded import worker_environment
from worker.queue.metrics import MULTIPROC_ENV
from worker.settings import Settings
from worker.store.db import create_store_engine, upgrade


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
    engine = create_store_engine(settings.store_url)
    upgrade(engine)
    engine.dispose()
    # The worker's processes write their metrics here; this server's /metrics shows them.
    metrics_dir = data_dir.resolve() / "worker-metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    environment = worker_environment(settings)
    environment[MULTIPROC_ENV] = str(metrics_dir)
    worker = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "worker.cli.commands",
            "worker",
            f"--concurrency={worker_processes}",
            "--loglevel=WARNING",
            # The worker stops when this process is gone, even killed (SIGKILL): a worker left
            # running would go on deciding jobs with this server's settings.
            f"--parent-pid={os.getpid()}",
        ],
        env=environment,
        pass_fds=() if lock_fd is None else (lock_fd,),
        # A session of its own: signals meant for this server (a terminal's Ctrl+C) reach
        # the worker once, through ``_stop_group``.
        start_new_session=True,
    )
    try:
        app = create_app(settings, worker_metrics_dir=metrics_dir)
        config = server_config(app, settings, host=host, port=port)
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
    parent dies, and SIGKILL from itself 30 s later
    (``worker.queue.supervise.stop_with_parent``)."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
