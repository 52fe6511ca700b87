"""``appattest simulate``: fake devices under a throwaway CA, run against a live service.

Three uses: ``--make-ca DIR`` creates the CA (and prints the next commands); ``--ca DIR
--sample-file FILE`` writes a JSON Lines sample for ``appattest verify``; ``--url URL --api-key
KEY --ca DIR`` runs devices through the real flow and reports every verdict against what it
should have been. Exit status: 0 when every verdict was as expected, 1 when one was not, 2 on
a usage error or unusable CA directory, 3 when the service could not be used.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import click
from cryptography.hazmat.primitives.asymmetric import rsa
from rich.console import Console

from worker.cli.progress import RunProgress
from worker.simulator.authority import (
    CA_LIFETIME,
    INTERMEDIATE_KEY_FILE,
    ROOT_FILE,
    ROOT_KEY_FILE,
    CAFilesError,
    create_ca_dir,
    load_ca,
    sample_bodies,
)
from worker.simulator.devices import APP_ID, TestCA
from worker.simulator.flow import (
    SIMULATED_CERTIFICATE,
    SIMULATED_PACKAGE,
    Outcome,
    Plan,
    ServiceError,
    Simulation,
    planned_jobs,
    simulate,
)
from worker.simulator.google import FakeGoogle, fake_google, load_service_account
from worker.simulator.report import render, summarize

GOOGLE_ACCOUNT_FILE: Final = "google-service-account.json"
UNEXPECTED_VERDICT: Final = 1
SERVICE_UNUSABLE: Final = 3


def _load(ca_dir: Path) -> TestCA:
    try:
        return load_ca(ca_dir)
    except CAFilesError as exc:
        raise click.UsageError(f"--ca: {exc}") from exc


def _write_sample(ca: TestCA, sample_file: Path, ca_dir: Path, app_id: str) -> None:
    bodies = sample_bodies(ca, app_id=app_id, now=datetime.now(UTC))
    try:
        sample_file.write_text("".join(json.dumps(body) + "\n" for body in bodies))
    except OSError as exc:
        raise click.UsageError(f"cannot write --sample-file: {exc.strerror or exc}") from exc
    command = shlex.join(
        [
            "appattest",
            "verify",
            str(sample_file),
            "--app-id",
            app_id,
            "--root-ca",
            str(ca_dir / ROOT_FILE),
        ]
    )
    click.echo(f"wrote {len(bodies)} plugin bodies to {sample_file}; verify them with:")
    click.echo(f"  {command}")


def _make_google(ca_dir: Path, port: int) -> None:
    """Write the simulated Google service account beside the CA, and print the Android
    settings that point a service at the fake Google ``--android`` runs on ``port``."""
    path = ca_dir / GOOGLE_ACCOUNT_FILE
    if path.exists():
        return
    fake = FakeGoogle(url=f"http://127.0.0.1:{port}", key=rsa.generate_private_key(65537, 2048))
    fake.service_account_file(ca_dir, GOOGLE_ACCOUNT_FILE).chmod(0o600)
    apps = {SIMULATED_PACKAGE: {"certificateDigests": [SIMULATED_CERTIFICATE.hex()]}}
    click.echo(
        f"{GOOGLE_ACCOUNT_FILE} is a simulated Google service account (private, mode 0600): "
        f"for Android devices (--android N), which run a fake Google on port {port}, also set:"
    )
    for name, value in (
        ("APPATTEST_ANDROID_APPS", json.dumps(apps)),
        ("APPATTEST_GOOGLE_CREDENTIALS_FILE", str(path.resolve())),
        ("APPATTEST_PLAY_INTEGRITY_URL", fake.url),
    ):
        click.echo(f"  export {name}={shlex.quote(value)}")


def _make_ca(ca_dir: Path, sample_file: Path | None, app_id: str, google_port: int) -> None:
    try:
        ca = create_ca_dir(ca_dir, now=datetime.now(UTC))
    except CAFilesError as exc:
        raise click.UsageError(f"--make-ca: {exc}") from exc
    _make_google(ca_dir, google_port)
    root = ca_dir / ROOT_FILE
    click.echo(
        f"created a throwaway test CA in {ca_dir} (valid {CA_LIFETIME.days} days): {ROOT_FILE} is"
        f" its public root; {ROOT_KEY_FILE} and {INTERMEDIATE_KEY_FILE} are private (mode 0600)."
    )
    click.echo("Nothing trusts it unless told to. Serve with it, then simulate devices:")
    click.echo(
        "  " + shlex.join(["appattest", "serve", "--app-id", app_id, "--root-ca", str(root)])
    )
    click.echo(
        "  "
        + shlex.join(
            [
                "appattest",
                "simulate",
                "--url",
                "http://127.0.0.1:8000",
                "--api-key",
                "KEY",
                "--ca",
                str(ca_dir),
                "--app-id",
                app_id,
                "--hostile",
            ]
        )
    )
    if sample_file is not None:
        _write_sample(ca, sample_file, ca_dir, app_id)


@click.command("simulate")
@click.option(
    "--make-ca",
    "make_ca_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Create a throwaway test CA in this directory, print the next commands, and stop.",
)
@click.option(
    "--ca",
    "ca_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The directory of a CA made with --make-ca, under which devices are minted.",
)
@click.option(
    "--sample-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a JSON Lines sample for `appattest verify`, minted under the CA, and stop.",
)
@click.option("--url", help="Base URL of the service, e.g. http://127.0.0.1:8000.")
@click.option("--api-key", envvar="APPATTEST_API_KEY", help="API key [env: APPATTEST_API_KEY].")
@click.option("--app-id", default=APP_ID, show_default=True, help="The devices' App ID.")
@click.option("--devices", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--assertions",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Assertions per device.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Devices running at once.",
)
@click.option(
    "--hostile",
    is_flag=True,
    help="Also send replays, reused challenges, forged signatures and other attacks, each of"
    " which must be refused with its reason.",
)
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0, max=30, min_open=True),
    default=10.0,
    show_default=True,
    help="How long each request asks the service to hold on for a verdict (?wait=).",
)
@click.option(
    "--timeout",
    "job_timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Give up when a job has no verdict after this many seconds.",
)
@click.option(
    "--android",
    "android",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Android devices to run too (Play Integrity), against a fake Google this command "
    "serves; the service must use the Android settings --make-ca printed.",
)
@click.option(
    "--google-port",
    type=click.IntRange(1, 65535),
    default=8790,
    show_default=True,
    help="With --make-ca: the port the fake Google of --android will listen on.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def simulate_command(
    make_ca_dir: Path | None,
    ca_dir: Path | None,
    sample_file: Path | None,
    url: str | None,
    api_key: str | None,
    app_id: str,
    devices: int,
    assertions: int,
    concurrency: int,
    hostile: bool,
    wait_seconds: float,
    job_timeout: float,
    android: int,
    google_port: int,
    as_json: bool,
) -> None:
    """Try a service without a phone: fake devices under a throwaway CA run the real flow.

    First `appattest simulate --make-ca DIR`, then `appattest serve --root-ca DIR/root.pem`,
    then `appattest simulate --url URL --api-key KEY --ca DIR`. Each device gets a challenge,
    registers a key, and sends signed assertions; --hostile adds attacks. Prints verdicts by
    case against the expected ones, jobs per second and latency percentiles. Exit status 0 when
    every verdict was as expected, 1 otherwise, 3 when the service could not be used.
    """
    if make_ca_dir is not None:
        if url is not None or ca_dir is not None:
            raise click.UsageError("--make-ca creates a CA and stops; run again with --ca DIR")
        _make_ca(make_ca_dir, sample_file, app_id, google_port)
        return
    if ca_dir is None:
        raise click.UsageError("give --make-ca DIR to create a CA, or --ca DIR to use one")
    if sample_file is not None:
        if url is not None:
            raise click.UsageError("--sample-file writes a file and stops; leave out --url")
        _write_sample(_load(ca_dir), sample_file, ca_dir, app_id)
        return
    if url is None or not api_key:
        raise click.UsageError("give --url and --api-key (or APPATTEST_API_KEY) of the service")
    if not url.startswith(("http://", "https://")):
        raise click.UsageError(f"--url must start with http:// or https://, not {url!r}")
    if hostile and assertions < 1:
        raise click.UsageError("--hostile replays an assertion: give --assertions 1 or more")
    plan = Plan(
        devices=devices,
        assertions=assertions,
        concurrency=concurrency,
        app_id=app_id,
        hostile=hostile,
        wait_seconds=wait_seconds,
        job_timeout_seconds=job_timeout,
        android=android,
    )
    simulation = _run(url, api_key, _load(ca_dir), plan, ca_dir)
    summary = summarize(simulation)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        render(summary, Console(highlight=False))
    if not summary["ok"]:
        sys.exit(UNEXPECTED_VERDICT)


def _run(url: str, api_key: str, ca: TestCA, plan: Plan, ca_dir: Path) -> Simulation:
    click.echo(
        f"simulating {plan.devices} devices ({plan.concurrency} at a time) against {url}", err=True
    )
    progress = RunProgress(description="simulate", total=planned_jobs(plan))

    def count(_outcome: Outcome) -> None:
        progress.update(progress.completed + 1)

    try:
        with ExitStack() as stack:
            google = None
            if plan.android:
                try:
                    key, key_id, port = load_service_account(ca_dir / GOOGLE_ACCOUNT_FILE)
                    google = stack.enter_context(fake_google(key, key_id=key_id, port=port))
                except (ValueError, OSError) as exc:
                    raise ServiceError(
                        f"--android: cannot run the fake Google ({exc}); make the CA directory "
                        "again with --make-ca"
                    ) from exc
            return asyncio.run(
                simulate(
                    url=url, api_key=api_key, ca=ca, plan=plan, on_outcome=count, google=google
                )
            )
    except ServiceError as exc:
        message, status = f"error: {exc}", SERVICE_UNUSABLE
    except KeyboardInterrupt:
        message, status = "interrupted", 130
    finally:
        progress.close()
    # After the progress line, so that the reason is the last thing shown.
    click.echo(message, err=True)
    sys.exit(status)
