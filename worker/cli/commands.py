"""The worker's commands: thin adapters from the terminal to the service layer. The `appattest`
command (``appattest.cli``) adds the ones that run the HTTP API, `api` and `serve`."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import queue
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import click
from celery import Celery, signals
from prometheus_client import start_http_server
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from worker.cli.lines import parse_line, read_lines
from worker.contract import PluginRequest, VerificationResult
from worker.core import Reason
from worker.queue.app import create_celery_app
from worker.queue.ledger import Sweeper, ledger_for
from worker.queue.logs import configure_logging, omit_task_results
from worker.queue.messaging import ANDROID_QUEUE, QUEUE, RECEIPTS_QUEUE
from worker.queue.metrics import (
    MULTIPROC_ENV,
    WorkerCpu,
    enable_multiprocess,
    multiprocess_registry,
    process_exited,
)
from worker.queue.tasks import resources_of, start_process
from worker.service import VerificationService
from worker.service.verification import ORDERED_CHUNK, ConcurrentChange
from worker.settings import Settings, load_settings
from worker.simulator.command import simulate_command
from worker.store.db import (
    DEFAULT_STORE_URL,
    SchemaChange,
    create_store_engine,
    session_factory,
    upgrade,
)
from worker.version import __version__

log = logging.getLogger("appattest")

USAGE_ERROR = 2
# The input held at once by `verify` (with the requests parsed from it), whatever its lines'
# sizes: a registration line is about 5 KiB, the largest valid body 192 KiB.
_CHUNK_BYTES = 4 * 1024 * 1024

NO_APP_ID = (
    "no App ID is configured: give --app-id TEAMID.bundle.id (or --dev-app-id), "
    "or set APPATTEST_APP_IDS (or APPATTEST_DEV_APP_IDS)"
)


def _parse_instant(value: str) -> datetime:
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 instant") from exc
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant


def _open_store(store_url: str) -> Engine:
    """An engine on the key store, its schema brought up to date; a usage error otherwise."""
    return _migrated_store(store_url)[0]


def _migrated_store(store_url: str) -> tuple[Engine, SchemaChange]:
    try:
        engine = create_store_engine(store_url)
        change = upgrade(engine)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise click.UsageError(f"cannot open the key store {_shown(store_url)}: {exc}") from exc
    return engine, change


def _is_blank(line: bytes | None) -> bool:
    """Whether an input line holds nothing but white space (skipped, not verified)."""
    return line is not None and not line.strip()


def _shown(url: str) -> str:
    """A URL fit for a message: without its password."""
    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except (SQLAlchemyError, ValueError):
        return "(unreadable URL)"


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
@click.version_option(
    __version__, "--version", prog_name="appattest", message="%(prog)s %(version)s"
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug information to standard error.")
def main(verbose: bool) -> None:
    """Verify Apple App Attest attestations and assertions."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


_POLICY_OPTIONS = (
    click.option(
        "--app-id",
        "app_ids",
        multiple=True,
        metavar="APPID",
        help="Accept production keys for this App ID (TEAMID.bundle.id). Repeatable.",
    ),
    click.option(
        "--dev-app-id",
        "dev_app_ids",
        multiple=True,
        metavar="APPID",
        help="Accept development and production keys for this App ID. Repeatable.",
    ),
    click.option(
        "--root-ca",
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="PEM",
        help="Trust this root certificate instead of Apple's App Attestation Root CA.",
    ),
    click.option(
        "--allow-validation-category",
        "allowed_categories",
        multiple=True,
        type=click.IntRange(0, 2**32 - 1),
        metavar="N",
        help="Accept only devices whose apple_validation_category_01 is N. Repeatable "
        "(default: every category; APPATTEST_ALLOWED_VALIDATION_CATEGORIES).",
    ),
    click.option(
        "--min-bundle-version",
        metavar="V",
        help="Refuse devices whose apple_bundle_version_01 is below V, compared as up to "
        "three numbers (10.0 > 2.0; APPATTEST_MIN_BUNDLE_VERSION).",
    ),
    click.option(
        "--require-extensions/--no-require-extensions",
        default=None,
        help="Refuse devices that send no extensions map, every device before iOS 27 "
        "(default: off; APPATTEST_REQUIRE_EXTENSIONS).",
    ),
)


@dataclass(frozen=True)
class PolicyOptions:
    """The verification policy options of one command line (``policy_options``).

    Each option given overrides its ``APPATTEST_*`` setting; the policy itself is then built
    from the settings (``Settings.policy_spec``, ``PolicySpec.build``), the one way every
    command, the workers and re-verification build it.
    """

    app_ids: tuple[str, ...] = ()
    dev_app_ids: tuple[str, ...] = ()
    root_ca: Path | None = None
    allowed_categories: tuple[int, ...] = ()
    min_bundle_version: str | None = None
    require_extensions: bool | None = None

    def overrides(self) -> dict[str, object]:
        """The settings that the options given override (none: an empty dict)."""
        overrides: dict[str, object] = {}
        if self.app_ids:
            overrides["app_ids"] = list(self.app_ids)
        if self.dev_app_ids:
            overrides["dev_app_ids"] = list(self.dev_app_ids)
        if self.root_ca is not None:
            overrides["root_ca"] = self.root_ca
        if self.allowed_categories:
            overrides["allowed_validation_categories"] = list(self.allowed_categories)
        if self.min_bundle_version is not None:
            overrides["min_bundle_version"] = self.min_bundle_version
        if self.require_extensions is not None:
            overrides["require_extensions"] = self.require_extensions
        return overrides

    def arguments(self) -> list[str]:
        """The command-line options that give another ``appattest`` command these options."""
        arguments = [f"--app-id={app_id}" for app_id in self.app_ids]
        arguments += [f"--dev-app-id={app_id}" for app_id in self.dev_app_ids]
        if self.root_ca is not None:
            arguments.append(f"--root-ca={self.root_ca.resolve()}")
        arguments += [f"--allow-validation-category={c}" for c in self.allowed_categories]
        if self.min_bundle_version is not None:
            arguments.append(f"--min-bundle-version={self.min_bundle_version}")
        if self.require_extensions is not None:
            arguments.append(
                "--require-extensions" if self.require_extensions else "--no-require-extensions"
            )
        return arguments


def _policy_decorator(
    options: tuple[Callable[[Callable[..., None]], Callable[..., None]], ...],
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def with_policy(*args: Any, **kwargs: Any) -> None:
            given = {f.name: kwargs.pop(f.name) for f in fields(PolicyOptions) if f.name in kwargs}
            command(*args, policy=PolicyOptions(**given), **kwargs)

        for option in reversed(options):
            with_policy = option(with_policy)
        return with_policy

    return decorate


# Give a command the policy options (App IDs, root, the rules for the iOS 27 extensions),
# handed to it as one ``policy: PolicyOptions`` argument; ``app_options`` gives only the App
# IDs and the root, to a command that checks the configuration but does not verify (``api``).
policy_options = _policy_decorator(_POLICY_OPTIONS)
app_options = _policy_decorator(_POLICY_OPTIONS[:3])


_store_option = click.option(
    "--store",
    "store_url",
    default=DEFAULT_STORE_URL,
    show_default=True,
    envvar="APPATTEST_STORE_URL",
    help="SQLAlchemy URL of the key store.",
)


# Options of the commands that run on the settings' store (reverify, purge, receipts refresh).
_settings_store_option = click.option(
    "--store",
    "store_url",
    envvar="APPATTEST_STORE_URL",
    default=None,
    help="SQLAlchemy URL of the key store (default: the settings' store).",
)
# Options of the resumable runs through the workers (reverify, receipts refresh).
_stall_timeout_option = click.option(
    "--stall-timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Give up (resumably) when the workers decide nothing for this many seconds.",
)


@main.command()
@click.argument("input_file", type=click.File("rb"), default="-")
@policy_options
@click.option(
    "--at",
    "at_text",
    metavar="ISO8601",
    help="Verify as of this instant (default: now). Without a zone, UTC.",
)
@_store_option
@click.option(
    "--queue",
    is_flag=True,
    help="Send the lines through the Celery workers (APPATTEST_BROKER_URL) instead of "
    "verifying in this process; the workers' configured policy applies.",
)
@click.option("--run-id", help="With --queue: resume the run with this id (printed at start).")
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --queue: where to write results.jsonl and results.csv (default import-RUNID).",
)
def verify(
    input_file: BinaryIO,
    policy: PolicyOptions,
    at_text: str | None,
    store_url: str,
    queue: bool,
    run_id: str | None,
    report_dir: Path | None,
) -> None:
    """Verify plugin bodies from a JSON Lines file (or standard input), in order.

    A line with "payload" is an assertion, any other a registration. Registrations earlier in
    the input make their keys known to later assertions. Challenges are taken as given. One
    JSON result per input line goes to standard output, a summary to standard error. Exit
    status: 0 when every line got a verdict, 1 when some line hit an internal error, 2 on a
    usage error or unreadable input.
    """
    if queue:
        if policy.overrides():
            raise click.UsageError("with --queue the workers' configured policy applies")
        _verify_through_queue(input_file, at_text, run_id, report_dir)
        return
    if run_id or report_dir:
        raise click.UsageError("--run-id and --report-dir go with --queue")
    built = _settings_with(policy).policy()
    at = _parse_instant(at_text) if at_text else None
    engine = _open_store(store_url)
    service = VerificationService(policy=built, sessions=session_factory(engine))
    counts: Counter[str] = Counter()
    out = sys.stdout
    try:
        for chunk in _chunks(input_file):
            for number, result in _decide_chunk(service, chunk, at):
                counts["accepted" if result.ok else str(result.reason)] += 1
                out.write(json.dumps({"line": number, **result.to_json_dict()}) + "\n")
            out.flush()
    except OSError as exc:
        click.echo(f"error: cannot read input: {exc}", err=True)
        sys.exit(USAGE_ERROR)
    finally:
        engine.dispose()
    _print_line_summary(counts)


def _chunks(stream: BinaryIO) -> Iterator[list[tuple[int, bytes | None]]]:
    """The numbered non-blank lines, in chunks of up to ``ORDERED_CHUNK`` lines and about
    ``_CHUNK_BYTES`` of input (so that a file of huge lines is not held 500 at a time). A
    chunk also ends where the input has nothing more at hand yet (a pipe or terminal feeding
    lines slowly), so that each line's verdict comes out as soon as it can. A read error ends
    the chunk read so far, then propagates."""
    chunk: list[tuple[int, bytes | None]] = []
    size = 0
    try:
        for number, (line, more) in enumerate(_lines_at_hand(stream), start=1):
            if not _is_blank(line):
                chunk.append((number, line))
                size += len(line or b"")
            full = len(chunk) >= ORDERED_CHUNK or size >= _CHUNK_BYTES
            if chunk and (full or not more):
                yield chunk
                chunk, size = [], 0
    except OSError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


def _lines_at_hand(stream: BinaryIO) -> Iterator[tuple[bytes | None, bool]]:
    """Each line (as ``read_lines`` gives it) and whether the next one is already at hand.

    A regular file always has its next line at hand. Any other input (a pipe, a terminal) is
    read by a thread ahead of the verification, so that a line counts as at hand only if it
    has arrived."""
    try:
        regular = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError):
        regular = True  # an in-memory stream: it never waits
    if regular:
        yield from ((line, True) for line in read_lines(stream))
        return
    arrived: queue.Queue[tuple[bytes | None, BaseException | None, bool]] = queue.Queue(
        maxsize=2 * ORDERED_CHUNK
    )

    def read() -> None:
        try:
            for line in read_lines(stream):
                arrived.put((line, None, False))
        except BaseException as exc:  # handed to the reading thread, which raises it
            arrived.put((None, exc, True))
            return
        arrived.put((None, None, True))

    threading.Thread(target=read, name="verify-input", daemon=True).start()
    line, error, end = arrived.get()
    while not end:
        following = arrived.get() if not arrived.empty() else None
        yield line, following is not None and not following[2]
        if following is None:
            following = arrived.get()
        line, error, end = following
    if error is not None:
        raise error


def _decide_chunk(
    service: VerificationService, chunk: list[tuple[int, bytes | None]], at: datetime | None
) -> list[tuple[int, VerificationResult]]:
    """Verdicts of a chunk of lines, decided in order in one transaction; when that fails (a
    concurrent writer, a store error, an unexpected error), nothing was written and the lines
    are decided again one at a time, each getting its own verdict or error as before."""
    items: list[PluginRequest | VerificationResult] = []
    for _, raw in chunk:
        line = parse_line(raw)
        if line.request is None:
            assert line.rejection is not None
            items.append(line.rejection)
        else:
            items.append(line.request)
    try:
        decided = service.decide_in_order(items, now=at)
    except ConcurrentChange:
        log.debug("a concurrent writer changed keys of this chunk; deciding line by line")
    except Exception as exc:
        log.debug("deciding a chunk failed (%s); deciding line by line", exc.__class__.__name__)
    else:
        return [(number, result) for (number, _), result in zip(chunk, decided, strict=True)]
    return [(number, _verify_line(service, raw, at)) for number, raw in chunk]


def _print_line_summary(counts: Counter[str]) -> None:
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


def _verify_through_queue(
    input_file: BinaryIO, at_text: str | None, run_id: str | None, report_dir: Path | None
) -> None:
    from worker.cli.progress import RunProgress
    from worker.cli.reports import print_summary, write_reports
    from worker.cli.runs import verify_queued

    at = _parse_instant(at_text) if at_text else None
    settings = load_settings()
    run_id = run_id or uuid.uuid4().hex[:16]
    click.echo(f"import run {run_id} (run again with --run-id {run_id} to resume)", err=True)
    try:
        raw_lines = list(read_lines(input_file))
    except OSError as exc:
        click.echo(f"error: cannot read input: {exc}", err=True)
        sys.exit(USAGE_ERROR)
    app = create_celery_app(settings)
    counts: Counter[str] = Counter()
    rows: list[dict[str, object]] = []

    # Blank lines get no job and no result; the others keep their line numbers.
    blank = {number for number, raw in enumerate(raw_lines, start=1) if _is_blank(raw)}

    def emit(number: int, result: VerificationResult) -> None:
        if number in blank:
            return
        counts["accepted" if result.ok else str(result.reason)] += 1
        row = {"line": number, **result.to_json_dict()}
        rows.append(row)
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()

    try:
        with RunProgress(description="import", total=len(raw_lines)) as progress:
            verify_queued(iter(raw_lines), app, run_id, emit, progress=progress, at=at)
    except KeyboardInterrupt:
        click.echo(f"interrupted; resume with --run-id {run_id}", err=True)
        sys.exit(130)
    finally:
        app.close()
    directory = report_dir or Path(f"import-{run_id}")
    columns = ("line", "ok", "kind", "keyId", "reason", "detail", "appId", "environment", "counter")
    jsonl, csv_path, summary = write_reports(rows, directory, columns=columns)
    print_summary(summary, sys.stderr, title=f"import {run_id}")
    click.echo(f"results: {jsonl} {csv_path}", err=True)
    _print_line_summary(counts)


@main.command()
@_store_option
def migrate(store_url: str) -> None:
    """Create or upgrade the key store schema to the latest version, and say which."""
    engine, change = _migrated_store(store_url)
    engine.dispose()
    where = _shown(store_url)
    if change.before is None:
        click.echo(f"created the key store schema at {where} (revision {change.after})")
    elif change.changed:
        click.echo(
            f"upgraded the key store at {where} from revision {change.before} to {change.after}"
        )
    else:
        click.echo(f"the key store at {where} is up to date (revision {change.after})")


def _settings_with(policy: PolicyOptions, **extra: object) -> Settings:
    """Settings from the environment, with the command line's policy options and ``extra``
    taking precedence; the policy they describe is built once (``Settings.policy``) so that a
    wrong one stops the command with a usage error before it does anything."""
    try:
        settings = load_settings(**{**extra, **policy.overrides()})
    except ValueError as exc:
        raise click.UsageError(f"invalid configuration: {exc}") from exc
    if not settings.app_ids and not settings.dev_app_ids:
        raise click.UsageError(NO_APP_ID)
    try:
        settings.policy()
    except OSError as exc:
        raise click.UsageError(f"cannot read the root certificate (--root-ca): {exc}") from exc
    except ValueError as exc:
        raise click.UsageError(f"invalid policy: {exc}") from exc
    return settings


@main.command()
@policy_options
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
@click.option(
    "--supervise/--no-supervise",
    default=True,
    show_default=True,
    help="Run the Celery worker as a child process and start it again when it dies.",
)
@click.option(
    "--restart-delay",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds before the first restart; doubled after each further failure in a row.",
)
@click.option(
    "--restart-delay-max",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="The longest delay between restarts.",
)
@click.option(
    "--healthy-after",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="A worker that ran this many seconds before it died is restarted after the first "
    "delay again.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve this worker's Prometheus metrics (all its processes) on this port "
    "(default: APPATTEST_WORKER_METRICS_PORT; off when neither is set).",
)
@click.option(
    "--queues",
    "queues_text",
    metavar="verify,receipts,android",
    help="Serve only these queues: verify (verification, the CPU pool), receipts (receipt "
    "refreshes, a pool of APPATTEST_RECEIPT_REFRESH_THREADS threads) and android (Android "
    "jobs waiting on Google, a pool of --android-concurrency threads). Default: verify and "
    "android, and receipts too when the DeviceCheck key is configured.",
)
@click.option(
    "--android-concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Threads of the worker serving the android queue (its jobs wait on Google).",
)
@click.option("--parent-pid", type=int, hidden=True, help="Stop when this process is gone.")
def worker(
    policy: PolicyOptions,
    concurrency: int | None,
    pool: str,
    loglevel: str,
    hostname: str | None,
    supervise: bool,
    restart_delay: float,
    restart_delay_max: float,
    healthy_after: float,
    metrics_port: int | None,
    queues_text: str | None,
    android_concurrency: int,
    parent_pid: int | None,
) -> None:
    """Run a Celery worker that verifies queued jobs (settings from APPATTEST_* variables).

    By default the worker runs under a supervisor (this process), which starts it again when
    it exits with an error or is killed, after 1, 2, 4, ... seconds (see --restart-delay);
    SIGTERM or SIGINT stop both, and a worker that exits cleanly is not restarted. Serving
    several queues, the receipts and android queues' pools of threads are children of the
    first queue's worker (they stop with it, and are started again with it), so that Apple's
    CPU-bound checks never wait on Google or Apple's servers.
    """
    from worker.queue.supervise import Backoff, Supervisor, stop_with_parent

    extra = {"worker_metrics_port": metrics_port} if metrics_port is not None else {}
    settings = _settings_with(policy, **extra)
    queues = _worker_queues(queues_text, settings)
    if supervise:
        try:
            backoff = Backoff(
                first=restart_delay, cap=restart_delay_max, healthy_after=healthy_after
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        command = _unsupervised_worker_command(policy, concurrency, pool, loglevel, hostname)
        if metrics_port is not None:
            command.append(f"--metrics-port={metrics_port}")
        command.append(f"--android-concurrency={android_concurrency}")
        supervisor = Supervisor([*command, f"--queues={','.join(queues)}"], backoff=backoff)
        logging.getLogger("appattest.supervise").setLevel(loglevel.upper())
        if parent_pid is not None:
            stop_with_parent(parent_pid, grace=supervisor.stop_timeout + 10)
        if settings.worker_metrics_port is not None and not os.environ.get(MULTIPROC_ENV):
            # One metrics folder for every restart of the worker (each clears it as it
            # starts), removed when the supervisor stops.
            with tempfile.TemporaryDirectory(prefix="appattest-metrics-") as folder:
                os.environ[MULTIPROC_ENV] = folder
                sys.exit(supervisor.run())
        sys.exit(supervisor.run())
    if parent_pid is not None:
        stop_with_parent(parent_pid)
    configure_logging(settings.log_format)
    # Before any metric exists and before the pool forks (see worker.queue.metrics).
    _serve_worker_metrics(settings)
    for other in queues[1:]:
        # The first queue's worker runs here; each other queue's pool is a child, which
        # writes its metrics beside this worker's (the folder is in its environment now)
        # and leaves them to this process to serve.
        _start_child(policy, loglevel, hostname, other, android_concurrency)
    app = create_celery_app(settings)
    # A worker must not lose a verdict to a result backend that blinked: storing the result
    # retries, for a few minutes (randomised exponential backoff up to 5 s between attempts);
    # a write that still fails ends the job in state FAILURE, reported as internal_error. The
    # producer, which only reads, reports a down backend as 503 instead.
    app.conf.update(
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        result_backend_base_sleep_between_retries_ms=100,
        result_backend_max_sleep_between_retries_ms=5000,
    )
    omit_task_results()
    _sweep_ledger_while_running(app, settings)
    _purge_while_running(settings)
    signals.worker_process_shutdown.connect(
        lambda pid=None, **_: process_exited(pid or os.getpid()), weak=False
    )
    signals.worker_ready.connect(
        lambda **_: log.info("appattest-backend %s: worker ready", __version__), weak=False
    )
    # The database driver is imported once here, before the pool forks its processes, and
    # each process builds its resources (``worker.queue.tasks.ProcessResources``) and connects as it
    # starts rather than inside its first batch; the solo and threads pools have no process
    # init, and share the main process's resources, built as the worker starts.
    create_store_engine(settings.store_url).dispose()
    if pool in ("solo", "threads"):
        signals.worker_init.connect(lambda **_: resources_of(app, settings), weak=False)
    else:
        signals.worker_process_init.connect(lambda **_: start_process(app, settings), weak=False)
    if queues[0] == "verify":
        argv = ["worker", f"--pool={pool}", f"--loglevel={loglevel}", f"--queues={QUEUE}"]
        if concurrency:
            argv.append(f"--concurrency={concurrency}")
    elif queues[0] == "android":
        # Android jobs wait on Google's answers: many threads in one process.
        argv = ["worker", "--pool=threads", f"--loglevel={loglevel}", f"--queues={ANDROID_QUEUE}"]
        argv.append(f"--concurrency={android_concurrency}")
    else:
        # Exchanges wait on Apple: a pool of threads, not processes.
        threads = concurrency or settings.receipt_refresh_threads
        argv = ["worker", "--pool=threads", f"--loglevel={loglevel}", f"--queues={RECEIPTS_QUEUE}"]
        argv.append(f"--concurrency={threads}")
        _schedule_while_running(app, settings)
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv)


_QUEUE_NAMES = ("verify", "receipts", "android")
# Set in the environment of a queue's worker started by another worker (``_start_child``).
_CHILD_ENV = "APPATTEST_INTERNAL_QUEUE_CHILD"


def _worker_queues(text: str | None, settings: Settings) -> tuple[str, ...]:
    """The queues a worker serves: those named, or by default verify, and receipts too when
    receipts can be refreshed (the DeviceCheck key is configured)."""
    if text is None:
        # The android queue is served even without an Android app: its jobs then end as
        # unsupported_format instead of waiting for a worker that never comes.
        if settings.apple_configured():
            return ("verify", "receipts", "android")
        return ("verify", "android")
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(_QUEUE_NAMES))
    if unknown or not names:
        raise click.UsageError(
            f"--queues takes verify, receipts and/or android, comma-separated (not {text!r})"
        )
    if "receipts" in names and not settings.apple_configured():
        raise click.UsageError(
            "the receipts queue needs APPATTEST_APPLE_TEAM_ID, APPATTEST_APPLE_KEY_ID and "
            "APPATTEST_APPLE_PRIVATE_KEY_FILE"
        )
    return tuple(name for name in _QUEUE_NAMES if name in names)


def _start_child(
    policy: PolicyOptions,
    loglevel: str,
    hostname: str | None,
    queue: str,
    android_concurrency: int,
) -> None:
    """Start the worker of ``queue`` (receipts or android: a pool of threads) as a child that
    stops when this process is gone, named NAME-QUEUE@HOST; it shares this process's output."""
    name, _, host = (hostname or f"celery@{os.uname().nodename}").partition("@")
    command = _unsupervised_worker_command(
        policy, None, "threads", loglevel, f"{name}-{queue}@{host}"
    )
    command.append(f"--android-concurrency={android_concurrency}")
    env = {**os.environ, _CHILD_ENV: "1"}
    subprocess.Popen([*command, f"--queues={queue}"], env=env)  # noqa: S603 - our own interpreter


def _schedule_while_running(app: Celery, settings: Settings) -> None:
    """Run the periodic refresh (``worker.queue.schedule``) in this worker's main process once it is
    ready, when it is configured."""
    every = settings.receipt_refresh_schedule_seconds
    if every is None:
        return
    from worker.queue.receipts_setup import redis_client
    from worker.queue.schedule import RefreshSchedule

    schedule = RefreshSchedule(
        app,
        session_factory(create_store_engine(settings.store_url)),
        redis_client(settings),
        interval=every,
        max_keys=settings.receipt_refresh_max_keys,
    )
    signals.worker_ready.connect(lambda **_: schedule.start(), weak=False)
    signals.worker_shutdown.connect(lambda **_: schedule.stop(), weak=False)


def _unsupervised_worker_command(
    policy: PolicyOptions,
    concurrency: int | None,
    pool: str,
    loglevel: str,
    hostname: str | None,
) -> list[str]:
    """The command line of the Celery worker that ``appattest worker`` supervises: the same
    options, run in a child that stops when this process is gone."""
    command = [sys.executable, "-m", "worker.cli.commands", "worker", "--no-supervise"]
    command += [f"--parent-pid={os.getpid()}", f"--pool={pool}", f"--loglevel={loglevel}"]
    command += policy.arguments()
    if concurrency:
        command.append(f"--concurrency={concurrency}")
    if hostname:
        command.append(f"--hostname={hostname}")
    return command


def _serve_worker_metrics(settings: Settings) -> None:
    """With a metrics port, or a metrics folder given (``PROMETHEUS_MULTIPROC_DIR``, as
    ``appattest serve`` does), the worker's processes write their metrics to files there
    (a temporary folder when only the port is given); with a port, this process serves them
    all on it."""
    port = settings.worker_metrics_port
    given = os.environ.get(MULTIPROC_ENV)
    if os.environ.get(_CHILD_ENV):
        # A queue's pool started by another worker: that worker cleared the folder and
        # serves it; this one only writes there.
        if given:
            enable_multiprocess(Path(given), clear=False)
        return
    if port is None and not given:
        return
    if given:
        directory = Path(given)
    else:
        directory = Path(tempfile.mkdtemp(prefix="appattest-metrics-"))
        owner = os.getpid()

        def remove() -> None:
            if os.getpid() == owner:  # never from a pool process that runs exit handlers
                shutil.rmtree(directory, ignore_errors=True)

        atexit.register(remove)
    enable_multiprocess(directory, clear=True)
    if port is not None:
        try:
            registry = multiprocess_registry(directory)
            registry.register(WorkerCpu())
            start_http_server(port, registry=registry)
        except OSError as exc:
            raise click.UsageError(f"cannot serve metrics on port {port}: {exc}") from exc
        log.info("worker metrics on port %d", port)


def _purge_while_running(settings: Settings) -> None:
    """Run the retention purge (``worker.queue.retention``) in this worker's main process once it is
    ready, until it shuts down."""
    from worker.queue.retention import Purger

    purger = Purger(create_store_engine(settings.store_url), settings)
    signals.worker_ready.connect(lambda **_: purger.start(), weak=False)
    signals.worker_shutdown.connect(lambda **_: purger.stop(), weak=False)


def _sweep_ledger_while_running(app: Celery, settings: Settings) -> None:
    """Run the ledger sweeper (``worker.queue.ledger``) in this worker's main process once it is
    ready, until it shuts down. Nothing to do for brokers that need no ledger."""
    ledger = ledger_for(app)
    if ledger is None:
        return
    sweeper = Sweeper(
        app,
        ledger,
        interval=settings.ledger_sweep_seconds,
        resend_after=settings.ledger_resend_seconds,
    )

    def start(**_: object) -> None:
        sweeper.start()

    def stop(**_: object) -> None:
        sweeper.stop()

    signals.worker_ready.connect(start, weak=False)
    signals.worker_shutdown.connect(stop, weak=False)


@main.command()
@policy_options
@click.option(
    "--distrust-cert",
    "distrust_certs",
    multiple=True,
    metavar="SHA256",
    help="Distrust this credCert or intermediate (hex SHA-256 of its DER). Repeatable.",
)
@click.option(
    "--distrust-key",
    "distrust_keys",
    multiple=True,
    metavar="KEYID",
    help="Distrust this keyId (standard base64). Repeatable.",
)
@click.option(
    "--only-app-id",
    "only_app_ids",
    multiple=True,
    metavar="APPID",
    help="Re-verify only keys of this App ID. Repeatable.",
)
@click.option(
    "--only-environment",
    type=click.Choice(["production", "development"]),
    help="Re-verify only keys of this environment.",
)
@click.option(
    "--since",
    "since_text",
    metavar="ISO8601",
    help="Only keys first verified at or after this instant.",
)
@click.option(
    "--until", "until_text", metavar="ISO8601", help="Only keys first verified before this instant."
)
@click.option("--run-id", help="Resume the run with this id (printed when a run starts).")
@click.option(
    "--apply",
    is_flag=True,
    help="Revoke keys that now fail (and restore revoked keys that now pass).",
)
@click.option("--local", is_flag=True, help="Re-verify in this process instead of the workers.")
@click.option("--batch-size", type=click.IntRange(1, 5000), default=200, show_default=True)
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write results.jsonl and results.csv (default reverify-RUNID).",
)
@_stall_timeout_option
@_settings_store_option
def reverify(
    policy: PolicyOptions,
    distrust_certs: tuple[str, ...],
    distrust_keys: tuple[str, ...],
    only_app_ids: tuple[str, ...],
    only_environment: str | None,
    since_text: str | None,
    until_text: str | None,
    run_id: str | None,
    apply: bool,
    local: bool,
    batch_size: int,
    report_dir: Path | None,
    stall_timeout: float,
    store_url: str | None,
) -> None:
    """Re-verify stored registrations against today's policy, through the workers.

    Each stored attestation is verified again as of the instant it was first verified, against
    the given (or configured) apps, environment rules, trust root, distrust lists and build
    policy (validation categories, minimum bundle version, required extensions). Without
    --apply nothing changes; with it, keys that now fail are revoked and their assertions get
    key_revoked. A run is resumable: run again with its --run-id to continue where it stopped.
    """
    from worker.cli.progress import RunProgress
    from worker.cli.reports import print_summary, write_reports
    from worker.cli.runs import (
        REPORT_COLUMNS,
        Stalled,
        reverify_distributed,
        reverify_local,
        reverify_rows,
    )
    from worker.service.reverify import Reverifier, RunFilters, RunMismatch, start_run

    extra = {"store_url": store_url} if store_url else {}
    settings = _settings_with(policy, **extra)
    try:
        run_policy = settings.policy_spec(
            distrusted_certificates=distrust_certs, distrusted_key_ids=distrust_keys
        )
        run_policy.build()
    except (ValueError, OSError) as exc:
        raise click.UsageError(f"invalid policy: {exc}") from exc
    filters = RunFilters(
        app_ids=tuple(sorted(only_app_ids)),
        environment=only_environment,
        since=_parse_instant(since_text) if since_text else None,
        until=_parse_instant(until_text) if until_text else None,
    )
    run_id = run_id or uuid.uuid4().hex[:16]
    engine = _open_store(settings.store_url)
    sessions = session_factory(engine)
    try:
        with sessions() as session, session.begin():
            state = start_run(
                session,
                run_id=run_id,
                policy=run_policy,
                filters=filters,
                apply=apply,
                now=datetime.now(UTC),
            )
    except RunMismatch as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(
        f"reverify run {run_id}: {state.total} keys, {state.done} already decided"
        f"{', applying revocations' if apply else ''} (resume with --run-id {run_id})",
        err=True,
    )
    app = None if local else create_celery_app(settings)
    try:
        with RunProgress(description="reverify", total=state.total, completed=state.done) as bar:
            if app is None:
                reverify_local(sessions, Reverifier(sessions=sessions), run_id, batch_size, bar)
            else:
                reverify_distributed(
                    sessions, app, run_id, batch_size, bar, stall_seconds=stall_timeout
                )
    except KeyboardInterrupt:
        click.echo(f"interrupted; resume with --run-id {run_id}", err=True)
        sys.exit(130)
    except Stalled as exc:
        click.echo(f"error: {exc}; are workers running? resume with --run-id {run_id}", err=True)
        sys.exit(1)
    finally:
        if app is not None:
            app.close()
    directory = report_dir or Path(f"reverify-{run_id}")
    jsonl, csv_path, summary = write_reports(
        reverify_rows(sessions, run_id), directory, columns=REPORT_COLUMNS
    )
    engine.dispose()
    print_summary(summary, sys.stderr, title=f"reverify {run_id}")
    click.echo(f"results: {jsonl} {csv_path}", err=True)


@main.command()
@click.option("--dry-run", is_flag=True, help="Count what would be deleted, and delete nothing.")
@_settings_store_option
def purge(dry_run: bool, store_url: str | None) -> None:
    """Delete expired challenges, verdicts past APPATTEST_VERDICT_RETENTION_DAYS and expired
    idempotency keys, in batches of APPATTEST_PURGE_BATCH_SIZE rows (what the workers do every
    APPATTEST_PURGE_INTERVAL_SECONDS). Device keys are never deleted. Prints the counts."""
    from worker.queue.retention import run_purge

    try:
        settings = load_settings(**({"store_url": store_url} if store_url else {}))
    except ValueError as exc:
        raise click.UsageError(f"invalid configuration: {exc}") from exc
    engine = _open_store(settings.store_url)
    try:
        counts = run_purge(engine, settings, dry_run=dry_run)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"the purge failed: {type(exc).__name__}") from exc
    finally:
        engine.dispose()
    if counts is None:
        raise click.ClickException("another purge is running; try again later")
    verb = "would delete" if dry_run else "deleted"
    for table, rows in counts.items():
        click.echo(f"{verb} {rows} {table}")


@main.group()
def receipts() -> None:
    """Apple's fraud signal: exchange stored receipts for fresh ones and their risk metric."""


@receipts.command("refresh")
@click.option(
    "--app-id",
    "app_ids",
    multiple=True,
    metavar="APPID",
    help="Refresh only keys of this App ID. Repeatable.",
)
@click.option(
    "--environment",
    type=click.Choice(["production", "development"]),
    help="Refresh only keys of this environment.",
)
@click.option("--due-only", is_flag=True, help="Only keys whose next refresh is due now.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many keys.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="List the keys a run would refresh; call nobody, change nothing.",
)
@click.option("--run-id", help="Resume the run with this id (printed when a run starts).")
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write results.jsonl and results.csv (default refresh-RUNID).",
)
@click.option("--batch-size", type=click.IntRange(1, 1000), default=100, show_default=True)
@_stall_timeout_option
@_settings_store_option
def refresh_receipts(
    app_ids: tuple[str, ...],
    environment: str | None,
    due_only: bool,
    limit: int | None,
    dry_run: bool,
    run_id: str | None,
    report_dir: Path | None,
    batch_size: int,
    stall_timeout: float,
    store_url: str | None,
) -> None:
    """Exchange the selected keys' receipts at Apple's fraud-metric service, through the
    workers of the receipts queue, and report each key's outcome and risk metric.

    A run is resumable: run again with its --run-id to continue where it stopped (a run that
    stopped because Apple refused the token goes on once the configuration is fixed). Exit
    status: 0 when every key was decided, 1 when the run stopped or stalled, 2 on a usage
    error.
    """
    from worker.cli.progress import RunProgress
    from worker.cli.reports import print_summary, write_reports
    from worker.cli.runs import (
        REFRESH_REPORT_COLUMNS,
        RunStopped,
        Stalled,
        refresh_distributed,
        refresh_rows,
        refresh_summary_key,
    )
    from worker.service.refresh_runs import RefreshFilters, RunMismatch, select_keys, start_run

    try:
        settings = load_settings(**({"store_url": store_url} if store_url else {}))
    except (ValueError, OSError) as exc:
        raise click.UsageError(f"invalid configuration: {exc}") from exc
    if dry_run and run_id:
        raise click.UsageError("--dry-run starts no run: it takes no --run-id")
    if not dry_run and not settings.apple_configured():
        raise click.UsageError(
            "APPATTEST_APPLE_TEAM_ID, APPATTEST_APPLE_KEY_ID and "
            "APPATTEST_APPLE_PRIVATE_KEY_FILE are required to refresh receipts"
        )
    filters = RefreshFilters(
        app_ids=tuple(sorted(set(app_ids))), environment=environment, due_only=due_only, limit=limit
    )
    engine = _open_store(settings.store_url)
    sessions = session_factory(engine)
    if dry_run:
        with sessions() as session:
            selected = select_keys(session, filters, datetime.now(UTC))
        for key_id in selected:
            sys.stdout.write(json.dumps({"keyId": key_id, "outcome": "would_refresh"}) + "\n")
        engine.dispose()
        click.echo(f"dry run: {len(selected)} keys would be refreshed", err=True)
        return
    run_id = run_id or uuid.uuid4().hex[:16]
    try:
        with sessions() as session, session.begin():
            state = start_run(session, run_id=run_id, filters=filters, now=datetime.now(UTC))
    except RunMismatch as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(
        f"refresh run {run_id}: {state.total} keys, {state.done} already decided "
        f"(resume with --run-id {run_id})",
        err=True,
    )
    app = create_celery_app(settings)
    status = 0
    try:
        with RunProgress(description="refresh", total=state.total, completed=state.done) as bar:
            refresh_distributed(sessions, app, run_id, batch_size, bar, stall_seconds=stall_timeout)
    except KeyboardInterrupt:
        click.echo(f"interrupted; resume with --run-id {run_id}", err=True)
        sys.exit(130)
    except RunStopped as exc:
        click.echo(f"error: run stopped: {exc}; resume with --run-id {run_id}", err=True)
        status = 1
    except Stalled as exc:
        click.echo(
            f"error: {exc}; are workers of the receipts queue running? "
            f"resume with --run-id {run_id}",
            err=True,
        )
        status = 1
    finally:
        app.close()
    directory = report_dir or Path(f"refresh-{run_id}")
    jsonl, csv_path, summary = write_reports(
        refresh_rows(sessions, run_id),
        directory,
        columns=REFRESH_REPORT_COLUMNS,
        summary_key=refresh_summary_key,
    )
    engine.dispose()
    print_summary(summary, sys.stderr, title=f"refresh {run_id}")
    click.echo(f"results: {jsonl} {csv_path}", err=True)
    sys.exit(status)


main.add_command(simulate_command)

if __name__ == "__main__":
    main()
