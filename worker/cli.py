"""The ``appattest`` command: thin adapters from the terminal to the service layer."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import click
from sqlalchemy.exc import SQLAlchemyError

from worker.celery_app import QUEUE, create_celery_app
from worker.contract import VerificationResult
from worker.core import Policy, PolicyError, Reason, TrustStore, TrustStoreError
from worker.lines import parse_line, read_lines
from worker.service import VerificationService
from worker.settings import Settings, load_settings
from worker.store.db import DEFAULT_STORE_URL, create_store_engine, session_factory, upgrade

log = logging.getLogger("appattest")

USAGE_ERROR = 2


def _parse_instant(value: str) -> datetime:
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 instant") from exc
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant


def _build_policy(
    app_ids: tuple[str, ...], dev_app_ids: tuple[str, ...], root_ca: Path | None
) -> Policy:
    try:
        trust = (
            TrustStore.replacing_apple_root(root_ca.read_bytes())
            if root_ca is not None
            else TrustStore.apple()
        )
        return Policy.build(trust=trust, production_apps=app_ids, development_apps=dev_app_ids)
    except OSError as exc:
        raise click.UsageError(f"cannot read --root-ca: {exc}") from exc
    except (TrustStoreError, PolicyError) as exc:
        if not app_ids and not dev_app_ids:
            raise click.UsageError("give at least one --app-id or --dev-app-id") from exc
        raise click.UsageError(str(exc)) from exc


def _verify_line(
    service: VerificationService, raw: bytes | None, at: datetime | None
) -> VerificationResult:
    line = parse_line(raw)
    if line.request is None:
        assert line.rejection is not None
        return line.rejection
    try:
        return service.handle(line.request, now=at)
    except SQLAlchemyError as exc:
        log.error("key store error: %s", exc.__class__.__name__)
        detail = "the key store failed; the line was not verified"
    except Exception:
        log.exception("unexpected error while verifying a line")
        detail = "unexpected error; see the log"
    return VerificationResult.rejection(
        kind=line.kind, key_id=line.key_id, reason=Reason.INTERNAL_ERROR, detail=detail
    )


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug information to standard error.")
def main(verbose: bool) -> None:
    """Verify Apple App Attest attestations and assertions."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


_store_option = click.option(
    "--store",
    "store_url",
    default=DEFAULT_STORE_URL,
    show_default=True,
    envvar="APPATTEST_STORE_URL",
    help="SQLAlchemy URL of the key store.",
)


@main.command()
@click.argument("input_file", type=click.File("rb"), default="-")
@click.option(
    "--app-id",
    "app_ids",
    multiple=True,
    metavar="APPID",
    help="Accept production keys for this App ID (TEAMID.bundle.id). Repeatable.",
)
@click.option(
    "--dev-app-id",
    "dev_app_ids",
    multiple=True,
    metavar="APPID",
    help="Accept development and production keys for this App ID. Repeatable.",
)
@click.option(
    "--root-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PEM",
    help="Trust this root certificate instead of Apple's App Attestation Root CA.",
)
@click.option(
    "--at",
    "at_text",
    metavar="ISO8601",
    help="Verify as of this instant (default: now). Without a zone, UTC.",
)
@_store_option
def verify(
    input_file: BinaryIO,
    app_ids: tuple[str, ...],
    dev_app_ids: tuple[str, ...],
    root_ca: Path | None,
    at_text: str | None,
    store_url: str,
) -> None:
    """Verify plugin bodies from a JSON Lines file (or standard input), in order.

    A line with "payload" is an assertion, any other a registration. Registrations earlier in
    the input make their keys known to later assertions. Challenges are taken as given. One
    JSON result per input line goes to standard output, a summary to standard error. Exit
    status: 0 when every line got a verdict, 1 when some line hit an internal error, 2 on a
    usage error or unreadable input.
    """
    policy = _build_policy(app_ids, dev_app_ids, root_ca)
    at = _parse_instant(at_text) if at_text else None
    try:
        engine = create_store_engine(store_url)
        upgrade(engine)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise click.UsageError(f"cannot open the key store {store_url!r}: {exc}") from exc
    service = VerificationService(policy=policy, sessions=session_factory(engine))
    counts: Counter[str] = Counter()
    out = sys.stdout
    try:
        for number, line in enumerate(read_lines(input_file), start=1):
            result = _verify_line(service, line, at)
            counts["accepted" if result.ok else str(result.reason)] += 1
            out.write(json.dumps({"line": number, **result.to_json_dict()}) + "\n")
            out.flush()
    except OSError as exc:
        click.echo(f"error: cannot read input: {exc}", err=True)
        sys.exit(USAGE_ERROR)
    finally:
        engine.dispose()
    total = sum(counts.values())
    click.echo(
        f"{total} lines: {counts['accepted']} accepted, {total - counts['accepted']} rejected",
        err=True,
    )
    for reason, count in sorted(counts.items()):
        if reason != "accepted":
            click.echo(f"  {reason}: {count}", err=True)
    if counts[Reason.INTERNAL_ERROR.value]:
        sys.exit(1)


@main.command()
@_store_option
def migrate(store_url: str) -> None:
    """Create or upgrade the key store schema to the latest version."""
    try:
        engine = create_store_engine(store_url)
        upgrade(engine)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise click.UsageError(f"cannot migrate the key store {store_url!r}: {exc}") from exc
    click.echo(
        f"key store at {engine.url.render_as_string(hide_password=True)} is up to date", err=True
    )


def _settings_with(
    app_ids: tuple[str, ...], dev_app_ids: tuple[str, ...], root_ca: Path | None, **extra: object
) -> Settings:
    """Settings from the environment, with command-line options taking precedence."""
    overrides: dict[str, object] = dict(extra)
    if app_ids:
        overrides["app_ids"] = list(app_ids)
    if dev_app_ids:
        overrides["dev_app_ids"] = list(dev_app_ids)
    if root_ca is not None:
        overrides["root_ca"] = root_ca
    try:
        settings = load_settings(**overrides)
        settings.policy()
    except (ValueError, OSError) as exc:
        raise click.UsageError(f"invalid configuration: {exc}") from exc
    return settings


_app_id_option = click.option(
    "--app-id",
    "app_ids",
    multiple=True,
    metavar="APPID",
    help="Accept production keys for this App ID (TEAMID.bundle.id). Repeatable.",
)
_dev_app_id_option = click.option(
    "--dev-app-id",
    "dev_app_ids",
    multiple=True,
    metavar="APPID",
    help="Accept development and production keys for this App ID. Repeatable.",
)
_root_ca_option = click.option(
    "--root-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PEM",
    help="Trust this root certificate instead of Apple's App Attestation Root CA.",
)


@main.command()
@_app_id_option
@_dev_app_id_option
@_root_ca_option
@click.option(
    "--concurrency", type=click.IntRange(min=1), help="Worker processes (default: cores)."
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo", "threads"]),
    default="prefork",
    show_default=True,
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", help="Celery node name (default: celery@HOST).")
def worker(
    app_ids: tuple[str, ...],
    dev_app_ids: tuple[str, ...],
    root_ca: Path | None,
    concurrency: int | None,
    pool: str,
    loglevel: str,
    hostname: str | None,
) -> None:
    """Run a Celery worker that verifies queued jobs (settings from APPATTEST_* variables)."""
    settings = _settings_with(app_ids, dev_app_ids, root_ca)
    app = create_celery_app(settings)
    argv = ["worker", f"--pool={pool}", f"--loglevel={loglevel}", f"--queues={QUEUE}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv)


@main.command()
@_app_id_option
@_dev_app_id_option
@_root_ca_option
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
    app_ids: tuple[str, ...],
    dev_app_ids: tuple[str, ...],
    root_ca: Path | None,
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
    from worker.embedded import embedded_overrides, ensure_api_key
    from worker.embedded import serve as run_serve

    settings = _settings_with(
        app_ids, dev_app_ids, root_ca, **embedded_overrides(data_dir, os.environ)
    )
    settings, generated = ensure_api_key(settings)
    if generated:
        click.echo(f"APPATTEST_API_KEYS was not set; this run's API key is: {generated}", err=True)
    run_serve(settings, host=host, port=port, worker_processes=worker_processes, data_dir=data_dir)


@main.command()
@_app_id_option
@_dev_app_id_option
@_root_ca_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
def api(
    app_ids: tuple[str, ...],
    dev_app_ids: tuple[str, ...],
    root_ca: Path | None,
    host: str,
    port: int,
) -> None:
    """Serve the HTTP producer only (settings from APPATTEST_* variables); workers run apart."""
    import uvicorn

    from producer.app import create_app

    settings = _settings_with(app_ids, dev_app_ids, root_ca)
    if not settings.api_keys:
        raise click.UsageError("set APPATTEST_API_KEYS: the API refuses every call without keys")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


if __name__ == "__main__":
    main()
