"""The ``appattest`` command: every command of ``worker.cli.commands`` plus the two that run
the HTTP producer, ``api`` (the API alone) and ``serve`` (the API and a worker, embedded)."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import click
import uvicorn

from appattest.serve import serve as run_serve
from producer.app import create_app
from producer.server import server_config
from worker.cli import commands as worker_cli
from worker.cli.commands import PolicyOptions, _settings_with, app_options, policy_options
from worker.queue.embedded import DataDirInUse, data_dir_lock, embedded_overrides, ensure_api_key
from worker.queue.logs import configure_logging

__all__ = ["main"]

# The worker's command group with its options, and a command table of its own: adding the API's
# commands here leaves ``worker.cli.commands.main`` (``python -m worker.cli.commands``) as it is.
main = copy.copy(worker_cli.main)
main.commands = dict(worker_cli.main.commands)


@main.command()
@policy_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("appattest-data"),
    show_default=True,
    help="Folder of the embedded SQLite key store, broker and result backend.",
)
@click.option(
    "--workers",
    "worker_processes",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes.",
)
def serve(
    policy: PolicyOptions,
    host: str,
    port: int,
    data_dir: Path,
    worker_processes: int,
) -> None:
    """Run the HTTP API and a worker on this machine, with no external server.

    Key store, broker and result backend are SQLite files in --data-dir unless the
    APPATTEST_STORE_URL, APPATTEST_BROKER_URL or APPATTEST_RESULT_BACKEND variables name
    servers. API keys come from APPATTEST_API_KEYS; without one, a key is generated and
    printed once.
    """
    with contextlib.ExitStack() as held:
        try:
            lock_fd = held.enter_context(data_dir_lock(data_dir))
        except DataDirInUse as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            raise click.UsageError(f"cannot use --data-dir: {exc}") from exc
        settings = _settings_with(policy, **embedded_overrides(data_dir, os.environ))
        settings, generated = ensure_api_key(settings)
        configure_logging(settings.log_format)
        if generated:
            click.echo(
                f"APPATTEST_API_KEYS was not set; this run's API key is: {generated}", err=True
            )
        run_serve(
            settings,
            host=host,
            port=port,
            worker_processes=worker_processes,
            data_dir=data_dir,
            lock_fd=lock_fd,
        )


@main.command()
@app_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
def api(policy: PolicyOptions, host: str, port: int) -> None:
    """Serve the HTTP producer only (settings from APPATTEST_* variables); workers run apart."""
    settings = _settings_with(policy)
    if not settings.api_keys:
        raise click.UsageError("set APPATTEST_API_KEYS: the API refuses every call without keys")
    configure_logging(settings.log_format)
    uvicorn.Server(server_config(create_app(settings), settings, host=host, port=port)).run()


if __name__ == "__main__":
    main()
