"""``appattest simulate``: a throwaway CA on disk, and fake devices run against ``appattest serve``
as a user starts both."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from cryptography.x509.oid import NameOID

from tests.factory import APP_ID, Device, client_data_hash
from worker.cli.commands import main
from worker.core import Policy, Reason, Rejected, TrustStore, verify_attestation
from worker.simulator.authority import CAFilesError, create_ca_dir, load_ca
from worker.simulator.report import percentile

API_KEY = "simulate-test-key"


def _invoke(*args: str) -> Any:
    return _invoke_main("simulate", *args)


def _invoke_main(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("simulate") / "testca"
    result = _invoke("--make-ca", str(directory))
    assert result.exit_code == 0, result.output
    return directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _serve(
    workdir: Path,
    *,
    root_ca: Path | None,
    command: str = "serve",
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """``appattest serve`` (or another command that serves the API) in its own process group;
    yields its base URL once it is ready."""
    port = _free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    environ |= {"APPATTEST_API_KEYS": API_KEY, **(env or {})}
    arguments = [sys.executable, "-m", "appattest", command, "--app-id", APP_ID]
    arguments += ["--port", str(port)]
    arguments += ["--data-dir", str(workdir / "data")] if command == "serve" else []
    arguments += [] if root_ca is None else ["--root-ca", str(root_ca)]
    log_path = workdir / f"{command}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            arguments,
            cwd=workdir,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "not ready: " + log_path.read_text()
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)  # serve gives its worker 10 s, then kills its group
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def served(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _serve(tmp_path_factory.mktemp("served"), root_ca=ca_dir / "root.pem") as url:
        yield url


def _simulate(*args: str) -> subprocess.CompletedProcess[str]:
    """``appattest simulate`` as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.commands", "simulate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


# --- the CA directory ---------------------------------------------------------------------


def test_make_ca_writes_private_keys_for_the_owner_only_and_names_a_test_root(
    ca_dir: Path,
) -> None:
    for name in ("root-key.pem", "intermediate-key.pem"):
        assert stat.S_IMODE((ca_dir / name).stat().st_mode) == 0o600
    ca = load_ca(ca_dir)
    organization = ca.root_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert "TEST CA" in str(organization[0].value)
    assert "not Apple" in str(organization[0].value)


def test_make_ca_prints_the_next_commands_and_never_overwrites(tmp_path: Path) -> None:
    result = _invoke("--make-ca", str(tmp_path / "ca"), "--app-id", "TEAM1.org.example")
    assert result.exit_code == 0, result.output
    assert f"--root-ca {tmp_path / 'ca' / 'root.pem'}" in result.output
    assert f"--ca {tmp_path / 'ca'}" in result.output
    before = (tmp_path / "ca" / "root-key.pem").read_bytes()
    again = _invoke("--make-ca", str(tmp_path / "ca"))
    assert again.exit_code == 2
    assert "already holds" in again.output
    assert (tmp_path / "ca" / "root-key.pem").read_bytes() == before


def test_devices_of_a_loaded_ca_verify_only_where_its_root_is_trusted(ca_dir: Path) -> None:
    device = Device(ca=load_ca(ca_dir))
    now = datetime.now(UTC)
    arguments: dict[str, Any] = {
        "attestation_object": device.attestation_object(client_data_hash("c"), now=now),
        "key_id": device.key_id,
        "client_data_hash": client_data_hash("c"),
        "now": now,
    }
    trusting = TrustStore.replacing_apple_root((ca_dir / "root.pem").read_bytes())
    verified = verify_attestation(
        policy=Policy.build(trust=trusting, production_apps=[APP_ID]), **arguments
    )
    assert verified.app_id == APP_ID
    with pytest.raises(Rejected) as rejected:
        verify_attestation(
            policy=Policy.build(trust=TrustStore.apple(), production_apps=[APP_ID]), **arguments
        )
    assert rejected.value.reason == Reason.CERTIFICATE_CHAIN_INVALID


def test_load_ca_refuses_a_key_of_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    create_ca_dir(other, now=datetime.now(UTC))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("root.pem", "root-key.pem", "intermediate.pem"):
        (mixed / name).write_bytes((ca_dir / name).read_bytes())
    (mixed / "intermediate-key.pem").write_bytes((other / "intermediate-key.pem").read_bytes())
    with pytest.raises(CAFilesError, match="not the private key of its certificate"):
        load_ca(mixed)


def test_sample_file_gets_the_documented_verdicts(ca_dir: Path, tmp_path: Path) -> None:
    sample = tmp_path / "sample.jsonl"
    result = _invoke("--ca", str(ca_dir), "--sample-file", str(sample))
    assert result.exit_code == 0, result.output
    verified = CliRunner().invoke(
        main,
        [
            "verify",
            str(sample),
            "--app-id",
            APP_ID,
            "--root-ca",
            str(ca_dir / "root.pem"),
            "--store",
            f"sqlite:///{tmp_path / 'keys.db'}",
        ],
    )
    assert verified.exit_code == 0, verified.output
    lines = [json.loads(line) for line in verified.stdout.splitlines()]
    assert [line["reason"] for line in lines] == [
        None,
        None,
        None,
        "counter_replay",
        "environment_mismatch",
        "unsupported_format",
    ]


# --- usage and service errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --make-ca DIR"),
        (["--ca", "{ca}"], "give --url and --api-key"),
        (["--url", "http://127.0.0.1:9", "--api-key", "k", "--ca", "{missing}"], "cannot read"),
        (["--url", "127.0.0.1:8000", "--api-key", "k", "--ca", "{ca}"], "must start with http"),
        (
            [
                "--url",
                "http://127.0.0.1:9",
                "--api-key",
                "k",
                "--ca",
                "{ca}",
                "--hostile",
                "--assertions",
                "0",
            ],
            "--hostile replays an assertion",
        ),
        (["--make-ca", "{missing}", "--url", "http://127.0.0.1:9"], "creates a CA and stops"),
        (["--devices", "0", "--ca", "{ca}"], "--devices"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    ca_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    filled = [a.format(ca=ca_dir, missing=tmp_path / "missing") for a in args]
    result = _invoke(*filled)
    assert result.exit_code == 2
    assert message in result.output
    assert isinstance(result.exception, SystemExit)


def test_an_unreachable_service_exits_3_without_a_traceback(ca_dir: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = _simulate("--url", url, "--api-key", "k", "--ca", str(ca_dir))
    assert result.returncode == 3
    assert f"error: cannot reach {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_api_key_exits_3(served: str, ca_dir: Path) -> None:
    result = _simulate("--url", served, "--api-key", "not-the-key", "--ca", str(ca_dir))
    assert result.returncode == 3
    assert "refused the API key (401)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_service_without_workers_exits_3_when_no_verdict_comes(
    ca_dir: Path, tmp_path: Path
) -> None:
    # The API alone, on SQLite files: jobs are queued and never decided.
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    assert _invoke_main("migrate", "--store", store).exit_code == 0
    env = {
        "APPATTEST_STORE_URL": store,
        "APPATTEST_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        "APPATTEST_RESULT_BACKEND": f"db+sqlite:///{tmp_path / 'results.db'}",
    }
    root = ca_dir / "root.pem"
    with _serve(tmp_path, root_ca=root, command="api", env=env) as url:
        result = _simulate(
            *("--url", url, "--api-key", API_KEY, "--ca", str(ca_dir), "--devices", "1"),
            # --wait (10 s by default) is held to what is left of --timeout.
            "--timeout",
            "1",
        )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "within 1 s; are the workers running?" in result.stderr
    assert "Traceback" not in result.stderr


# --- against a running service ------------------------------------------------------------


def test_every_verdict_is_as_expected_against_serve(served: str, ca_dir: Path) -> None:
    result = _simulate(
        *("--url", served, "--api-key", API_KEY, "--ca", str(ca_dir), "--app-id", APP_ID),
        *("--devices", "3", "--assertions", "2", "--concurrency", "2", "--hostile", "--json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True
    assert summary["unexpected"] == []
    assert {name: case["verdicts"] for name, case in summary["cases"].items()} == {
        "registration": {"accepted": 3},
        "assertion": {"accepted": 6},
        "replayed_assertion": {"challenge_used": 3},
        "reused_challenge": {"challenge_used": 3},
        "stale_counter": {"counter_replay": 3},
        "wrong_app_id": {"app_id_mismatch": 3},
        "bad_signature": {"signature_invalid": 3},
        "unknown_key": {"key_unknown": 3},
        "duplicate_registration": {"key_already_registered": 3},
        "unissued_challenge": {"challenge_unknown": 3},
        "nonce_mismatch": {"nonce_mismatch": 3},
        "foreign_app_registration": {"app_id_mismatch": 3},
        "android_body": {"unsupported_format": 3},
    }
    assert summary["jobs"] == 42
    assert summary["verdicts"]["accepted"] == 9
    # Registrations: 3 honest and 5 hostile per device; assertions: 2 honest and 6 hostile.
    assert summary["latencyMs"]["registration"]["jobs"] == 18
    assert summary["latencyMs"]["assertion"]["jobs"] == 24
    latency = summary["latencyMs"]["assertion"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert summary["jobsPerSecond"] > 0


def test_the_table_says_every_verdict_was_as_expected(served: str, ca_dir: Path) -> None:
    result = _simulate("--url", served, "--api-key", API_KEY, "--ca", str(ca_dir), "--devices", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every verdict as expected" in result.stdout
    assert "8 jobs in" in result.stdout
    assert "accepted 8" in result.stdout


def test_a_service_that_does_not_trust_the_ca_fails_the_run(ca_dir: Path, tmp_path: Path) -> None:
    with _serve(tmp_path, root_ca=None) as url:
        result = _simulate(
            *("--url", url, "--api-key", API_KEY, "--ca", str(ca_dir), "--json"),
            *("--devices", "2", "--hostile"),
        )
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is False
    # A device whose registration failed sends nothing more.
    assert {name: case["verdicts"] for name, case in summary["cases"].items()} == {
        "registration": {"certificate_chain_invalid": 2}
    }
    assert summary["unexpectedCount"] == 2
    assert summary["unexpected"][0]["expected"] == ["accepted"]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, rank) for rank in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_android_devices_against_serve_and_a_fake_google(tmp_path: Path) -> None:
    """``--make-ca --google-port`` writes a simulated service account and prints the Android
    settings; ``appattest serve`` with them and ``simulate --android`` (which serves the fake
    Google on that port) give every Android case its verdict, beside the iOS devices."""
    port = _free_port()
    made = _invoke("--make-ca", str(tmp_path / "ca"), "--google-port", str(port))
    assert made.exit_code == 0, made.output
    exports = dict(
        shlex.split(line.strip().removeprefix("export "))[0].split("=", 1)
        for line in made.output.splitlines()
        if line.strip().startswith("export APPATTEST_")
    )
    assert set(exports) == {
        "APPATTEST_ANDROID_APPS",
        "APPATTEST_GOOGLE_CREDENTIALS_FILE",
        "APPATTEST_PLAY_INTEGRITY_URL",
    }
    account = tmp_path / "ca" / "google-service-account.json"
    assert stat.S_IMODE(account.stat().st_mode) == 0o600
    with _serve(tmp_path, root_ca=tmp_path / "ca" / "root.pem", env=exports) as url:
        result = _simulate(
            *("--url", url, "--api-key", API_KEY, "--ca", str(tmp_path / "ca")),
            *("--devices", "1", "--android", "2", "--assertions", "1", "--hostile", "--json"),
        )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["unexpected"] == []
    verdicts = {name: case["verdicts"] for name, case in summary["cases"].items()}
    assert {k: v for k, v in verdicts.items() if k.startswith("android")} == {
        # An iOS device's forged Android token: Google refuses it.
        "android_body": {"integrity_token_invalid": 1},
        "android_registration": {"accepted": 2},
        "android_assertion": {"accepted": 2},
        "android_replay": {"challenge_used": 2},
        "android_foreign_package": {"integrity_token_invalid": 2},
        "android_hash_mismatch": {"integrity_request_hash_mismatch": 2},
        "android_stale": {"integrity_token_stale": 2},
        "android_untrusted_device": {"integrity_device_not_trusted": 2},
        "android_sideloaded": {"integrity_app_unrecognized": 2},
    }
