"""``appattest verify`` as a user runs it: a subprocess on JSON Lines files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NOW
from tests.factory import APP_ID, Device, TestCA

AT = NOW.isoformat()


def run_verify(
    tmp_path: Path,
    lines: list[Any] | bytes,
    *args: str,
    store: str | None = None,
    stdin: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Write the lines to a file (or pipe them) and run ``appattest verify`` on them."""
    data = (
        lines
        if isinstance(lines, bytes)
        else "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    )
    source = tmp_path / "input.jsonl"
    source.write_bytes(data)
    command = [sys.executable, "-m", "worker.cli.commands", "verify"]
    command += [] if stdin else [str(source)]
    command += ["--store", store or f"sqlite:///{tmp_path / 'keys.db'}", *args]
    return subprocess.run(
        command,
        input=data.decode("utf-8", "replace") if stdin else None,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "APPATTEST_STORE_URL": ""},
    )


def results(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture
def trust_args(ca: TestCA, tmp_path: Path) -> list[str]:
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    return ["--root-ca", str(root), "--at", AT]


def test_registration_then_assertions_in_order(
    ca: TestCA, tmp_path: Path, trust_args: list[str]
) -> None:
    device = Device(ca=ca)
    too_early = device.assertion_body("too-early", counter=1)  # before registration
    registration = device.registration_body("challenge-1", now=NOW)
    first = device.assertion_body("payload-1", counter=2)
    second = device.assertion_body("payload-2", counter=3)
    lines = [
        too_early,
        registration,
        first,
        second,
        second,  # the same assertion again: a replay
        device.registration_body("challenge-2", now=NOW),
    ]
    proc = run_verify(tmp_path, lines, "--app-id", APP_ID, *trust_args)
    assert proc.returncode == 0, proc.stderr
    out = results(proc)
    assert [r["line"] for r in out] == [1, 2, 3, 4, 5, 6]
    assert [(r["ok"], r["kind"], r["reason"]) for r in out] == [
        (False, "assertion", "key_unknown"),
        (True, "registration", None),
        (True, "assertion", None),
        (True, "assertion", None),
        (False, "assertion", "counter_replay"),
        (False, "registration", "key_already_registered"),
    ]
    assert out[1]["environment"] == "production" and out[1]["counter"] == 0
    assert out[1]["appId"] == APP_ID and out[1]["keyId"] == device.key_id_b64
    assert [out[2]["counter"], out[3]["counter"]] == [2, 3]
    assert "6 lines: 3 accepted, 3 rejected" in proc.stderr
    assert "counter_replay: 1" in proc.stderr


def test_store_persists_between_runs(ca: TestCA, tmp_path: Path, trust_args: list[str]) -> None:
    device = Device(ca=ca)
    first = run_verify(
        tmp_path, [device.registration_body("c", now=NOW)], "--app-id", APP_ID, *trust_args
    )
    assert results(first)[0]["ok"] is True
    second = run_verify(tmp_path, [device.assertion_body("p")], "--app-id", APP_ID, *trust_args)
    assert results(second)[0]["counter"] == 1


def test_bad_lines_get_reasons_and_never_abort(
    ca: TestCA, tmp_path: Path, trust_args: list[str]
) -> None:
    device = Device(ca=ca)
    good = device.registration_body("challenge", now=NOW)
    lines: list[Any] = [
        "not json",
        "[1, 2]",
        "",  # blank: skipped, no result
        {**good, "keyId": 5},
        {k: v for k, v in good.items() if k != "token"},
        {**good, "challenge": ""},
        {**good, "extra": "field"},
        {**good, "platform": "android", "format": "google-play-integrity-standard"},
        {**good, "format": "web-fallback"},
        {**good, "token": good["token"].replace("+", "-").replace("/", "_")},
        {**good, "token": "AAAA"},
        {**good, "keyId": good["keyId"].rstrip("=")},
        {**good, "challenge": "a different challenge"},
        good,
    ]
    proc = run_verify(tmp_path, lines, "--app-id", APP_ID, *trust_args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    reasons = [r["reason"] for r in results(proc)]
    token_changed = "+" in good["token"] or "/" in good["token"]
    assert reasons == [
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "unsupported_format",
        "unsupported_format",
        "malformed_token" if token_changed else "nonce_mismatch",
        "malformed_token",
        "invalid_request",
        "nonce_mismatch",
        None,
    ]


def test_overlong_line_is_rejected_without_reading_it_whole(
    ca: TestCA, tmp_path: Path, trust_args: list[str]
) -> None:
    device = Device(ca=ca)
    huge = b'{"token": "' + b"A" * (1024 * 1024) + b'"}\n'
    data = huge + (json.dumps(device.registration_body("c", now=NOW)) + "\n").encode()
    proc = run_verify(tmp_path, data, "--app-id", APP_ID, *trust_args)
    out = results(proc)
    assert [(r["line"], r["reason"]) for r in out] == [(1, "invalid_request"), (2, None)]


def test_invalid_utf8_line(ca: TestCA, tmp_path: Path, trust_args: list[str]) -> None:
    proc = run_verify(tmp_path, b'{"a": "\xff\xfe"}\n', "--app-id", APP_ID, *trust_args)
    assert proc.returncode == 0
    assert results(proc)[0]["reason"] == "invalid_request"


def test_standard_input(ca: TestCA, tmp_path: Path, trust_args: list[str]) -> None:
    device = Device(ca=ca)
    proc = run_verify(
        tmp_path,
        [device.registration_body("c", now=NOW)],
        "--app-id",
        APP_ID,
        *trust_args,
        stdin=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert results(proc)[0]["ok"] is True


def test_development_keys_need_dev_app_id(
    ca: TestCA, tmp_path: Path, trust_args: list[str]
) -> None:
    dev = Device(ca=ca, environment="development")
    body = dev.registration_body("c", now=NOW)
    refused = run_verify(tmp_path, [body], "--app-id", APP_ID, *trust_args)
    assert results(refused)[0]["reason"] == "environment_mismatch"
    accepted = run_verify(tmp_path, [body], "--dev-app-id", APP_ID, *trust_args)
    assert results(accepted)[0]["environment"] == "development"


def test_apple_root_by_default_rejects_test_ca(ca: TestCA, tmp_path: Path) -> None:
    body = Device(ca=ca).registration_body("c", now=NOW)
    proc = run_verify(tmp_path, [body], "--app-id", APP_ID, "--at", AT)
    assert results(proc)[0]["reason"] == "certificate_chain_invalid"


def test_at_decides_certificate_validity(ca: TestCA, tmp_path: Path, trust_args: list[str]) -> None:
    body = Device(ca=ca).registration_body("c", now=NOW)
    root = trust_args[1]
    proc = run_verify(
        tmp_path, [body], "--app-id", APP_ID, "--root-ca", root, "--at", "2027-06-01T00:00:00Z"
    )
    assert results(proc)[0]["reason"] == "certificate_expired"


def test_real_apple_vectors_through_the_cli(tmp_path: Path) -> None:
    """Real attestations made with the plugin's rule, sha256(utf8(challenge)), under Apple's
    embedded root, each at its own instant."""
    from tests.vectors import load_vectors

    plugin_style = [
        v
        for v in load_vectors()
        if v.kind == "attestation" and v.get("clientDataHashRule") == "sha256(utf8(challenge))"
    ]
    assert len(plugin_style) >= 3
    for index, vector in enumerate(plugin_style[:3]):
        body = {
            "platform": "ios",
            "format": "apple-app-attest",
            "keyId": vector["keyId"],
            "challenge": vector["challenge"],
            "token": vector["attestation"],
        }
        flag = "--dev-app-id" if vector["environment"] == "development" else "--app-id"
        workdir = tmp_path / str(index)
        workdir.mkdir()
        proc = run_verify(workdir, [body], flag, vector["appId"], "--at", vector["verifyAt"])
        out = results(proc)
        assert out[0]["ok"] is True, out
        assert out[0]["environment"] == vector["environment"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --app-id TEAMID.bundle.id (or --dev-app-id), or set APPATTEST_APP_IDS"),
        (["--app-id", "not-an-app-id"], "TEAMID.bundle.id"),
        (["--app-id", APP_ID, "--at", "yesterday"], "ISO 8601"),
        (["--app-id", APP_ID, "--root-ca", "/nonexistent.pem"], "root-ca"),
        (["--app-id", APP_ID, "--store", "nosuchdb://x"], "key store"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = (
        run_verify(tmp_path, ["{}"], *args)
        if "--store" not in args
        else subprocess.run(
            [sys.executable, "-m", "worker.cli.commands", "verify", "-", *args],
            input="{}\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_garbage_root_ca_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    proc = run_verify(tmp_path, ["{}"], "--app-id", APP_ID, "--root-ca", str(bad))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_unreadable_input_file_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli.commands",
            "verify",
            str(tmp_path / "missing.jsonl"),
            "--app-id",
            APP_ID,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
