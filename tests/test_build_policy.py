"""The iOS 27 build policy: allowed validation categories, a minimum bundle version and
required extensions, globally and per App ID, for registrations and for every assertion.

Generated devices carry the categories and versions each case needs. The policy is checked
in the core, through ``appattest verify`` (the issue's own command line), through
``appattest serve`` (the HTTP API with its real worker), and through ``appattest reverify
--apply`` on the real stack's workers; Apple's own iOS 27 sample is held to it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import NOW
from tests.factory import APP_ID, Device, TestCA
from tests.stack import Stack
from tests.vectors import b64, load_vectors, verify_at
from worker.contract import parse_request
from worker.core import (
    ExtensionRules,
    Policy,
    PolicyError,
    PolicySpec,
    Reason,
    Rejected,
    TrustStore,
    parse_bundle_version,
    verify_attestation,
)
from worker.queue.embedded import worker_environment
from worker.service import VerificationService
from worker.settings import load_settings
from worker.store.db import create_store_engine, session_factory, upgrade
from worker.store.models import DeviceKey

OTHER_APP_ID = "TEAMID1234.com.example.other"
STRICT = ["--allow-validation-category", "4", "--min-bundle-version", "2.0"]


def ext(category: int | None = 4, version: str | None = "2.0") -> dict[str, object]:
    """An extensions map as an iOS 27 device sends it, without the entries given as None."""
    out: dict[str, object] = {}
    if category is not None:
        out["apple_validation_category_01"] = category.to_bytes(4, "little")
    if version is not None:
        out["apple_bundle_version_01"] = version
    return out


def rules(**kwargs: Any) -> ExtensionRules:
    return ExtensionRules(**kwargs)


def strict_rules() -> ExtensionRules:
    return rules(allowed_validation_categories=frozenset({4}), min_bundle_version="2.0")


# Bundle versions, compared as numbers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2", (2, 0, 0)),
        ("2.0", (2, 0, 0)),
        ("2.0.1", (2, 0, 1)),
        ("10.0", (10, 0, 0)),
        ("007.1", (7, 1, 0)),
        ("0", (0, 0, 0)),
        ("", None),
        ("2.", None),
        (".2", None),
        ("2..1", None),
        ("1.2.3.4", None),
        ("-1", None),
        ("+1", None),
        (" 2.0", None),
        ("2.0 ", None),
        ("2.0b1", None),
        ("abc", None),
        # Arabic-Indic digits are digits to str.isdigit, not to a bundle version.
        ("\u0661.\u0662", None),
        ("1" * 21, None),
    ],
)
def test_parse_bundle_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_bundle_version(text) == expected


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("2.0", None),
        ("2", None),  # missing components are zero: 2 == 2.0
        ("2.0.0", None),
        ("2.0.1", None),
        ("10.0", None),  # numerically above 2.0, though "10.0" < "2.0" as text
        ("2.10", None),
        ("1.9", Reason.BUNDLE_VERSION_TOO_OLD),
        ("1.99.99", Reason.BUNDLE_VERSION_TOO_OLD),
        ("0.9", Reason.BUNDLE_VERSION_TOO_OLD),
        ("2.0.0.1", Reason.BUNDLE_VERSION_TOO_OLD),  # not a bundle version: fails closed
        ("2.0-beta", Reason.BUNDLE_VERSION_TOO_OLD),
        ("", Reason.BUNDLE_VERSION_TOO_OLD),
    ],
)
def test_minimum_bundle_version(version: str, reason: Reason | None) -> None:
    from worker.core.authdata import AuthDataExtensions

    check = rules(min_bundle_version="2.0").check
    if reason is None:
        check(AuthDataExtensions(validation_category=1, bundle_version=version))
        return
    with pytest.raises(Rejected) as info:
        check(AuthDataExtensions(validation_category=1, bundle_version=version))
    assert info.value.reason is reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_bundle_version": "2.x"},
        {"min_bundle_version": "1.2.3.4"},
        {"allowed_validation_categories": frozenset({-1})},
        {"allowed_validation_categories": frozenset({2**32})},
    ],
)
def test_a_wrong_rule_is_a_construction_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(PolicyError):
        ExtensionRules(**kwargs)


# The core, both kinds of job ------------------------------------------------------------------


def policy_for(ca: TestCA, extension_rules: ExtensionRules, **more: Any) -> Policy:
    return Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem),
        production_apps=[APP_ID, OTHER_APP_ID],
        extensions=extension_rules,
        **more,
    )


def attest(ca: TestCA, policy: Policy, extensions: dict[str, object] | None) -> Reason | None:
    device = Device(ca=ca)
    token = device.attestation_object(b"c" * 32, now=NOW, extensions=extensions)
    try:
        verify_attestation(
            attestation_object=token,
            key_id=device.key_id,
            client_data_hash=b"c" * 32,
            policy=policy,
            now=NOW,
        )
    except Rejected as exc:
        return exc.reason
    return None


CASES = [
    (ext(4, "2.0"), False, None),
    (ext(4, "10.0"), False, None),
    (ext(4, "2.0.1"), False, None),
    (ext(1, "2.0"), False, Reason.VALIDATION_CATEGORY_NOT_ALLOWED),
    (ext(4, "1.9"), False, Reason.BUNDLE_VERSION_TOO_OLD),
    (ext(4, "two"), False, Reason.BUNDLE_VERSION_TOO_OLD),
    (ext(None, "2.0"), False, Reason.EXTENSIONS_MISSING),
    (ext(4, None), False, Reason.EXTENSIONS_MISSING),
    (None, False, None),  # a device before iOS 27 keeps working by default
    (None, True, Reason.EXTENSIONS_MISSING),
    (ext(4, "2.0"), True, None),
]


@pytest.mark.parametrize(("extensions", "require", "reason"), CASES)
def test_registration_is_held_to_the_rules(
    ca: TestCA, extensions: dict[str, object] | None, require: bool, reason: Reason | None
) -> None:
    strict = rules(
        allowed_validation_categories=frozenset({4}),
        min_bundle_version="2.0",
        require_extensions=require,
    )
    assert attest(ca, policy_for(ca, strict), extensions) is reason


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


def registered(ca: TestCA, service: VerificationService) -> Device:
    """A device registered from an allowed build (category 4, version 2.0)."""
    device = Device(ca=ca)
    body = device.registration_body("c", now=NOW, extensions=ext(4, "2.0"))
    assert service.handle(parse_request(body), now=NOW).ok
    return device


@pytest.mark.parametrize(("extensions", "require", "reason"), CASES)
def test_every_assertion_is_held_to_the_rules(
    ca: TestCA,
    sessions: sessionmaker[Session],
    extensions: dict[str, object] | None,
    require: bool,
    reason: Reason | None,
) -> None:
    strict = rules(
        allowed_validation_categories=frozenset({4}),
        min_bundle_version="2.0",
        require_extensions=require,
    )
    service = VerificationService(policy=policy_for(ca, strict), sessions=sessions)
    device = registered(ca, service)
    # Each assertion on its own: the registration passed, its assertion may not.
    result = service.handle(parse_request(device.assertion_body("p", extensions=extensions)))
    assert result.reason == reason, result.detail
    assert result.ok is (reason is None)
    if reason is None:
        assert result.counter == 1


def test_the_signature_and_the_keys_state_come_before_the_build(
    ca: TestCA, sessions: sessionmaker[Session]
) -> None:
    service = VerificationService(policy=policy_for(ca, strict_rules()), sessions=sessions)
    device = registered(ca, service)
    forged = device.assertion_body(
        "p", extensions=ext(1, "1.0"), signing_key=Device(ca=ca).private_key
    )
    assert service.handle(parse_request(forged)).reason is Reason.SIGNATURE_INVALID
    # A key of an App ID no longer configured is told so, not its build.
    other_app_only = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem),
        production_apps=[OTHER_APP_ID],
        extensions=strict_rules(),
    )
    other = VerificationService(policy=other_app_only, sessions=sessions)
    result = other.handle(parse_request(device.assertion_body("q", extensions=ext(1, "1.0"))))
    assert result.reason is Reason.APP_ID_MISMATCH
    # A refused assertion stores no counter: the next one from an allowed build is accepted.
    retired = service.handle(parse_request(device.assertion_body("r", extensions=ext(4, "1.0"))))
    assert retired.reason is Reason.BUNDLE_VERSION_TOO_OLD
    result = service.handle(parse_request(device.assertion_body("s", extensions=ext(4, "2.0"))))
    assert result.ok and result.counter == 4


def test_per_app_rules_replace_the_global_ones_rule_by_rule(ca: TestCA) -> None:
    spec = PolicySpec(
        app_ids=(APP_ID, OTHER_APP_ID),
        root_pem=ca.root_pem.decode(),
        allowed_validation_categories=(4,),
        min_bundle_version="2.0",
        # The other app has retired everything below 3.1 and accepts every category; its
        # requirement of the map is its own, the global one stays off.
        app_rules={
            OTHER_APP_ID: {
                "min_bundle_version": "3.1",
                "allowed_validation_categories": None,
                "require_extensions": True,
            }
        },
    )
    policy = spec.build()
    main, other = policy.app(APP_ID), policy.app(OTHER_APP_ID)
    assert main is not None and other is not None
    assert main.extensions == strict_rules()
    assert other.extensions == rules(min_bundle_version="3.1", require_extensions=True)

    def register(app_id: str, extensions: dict[str, object] | None) -> Reason | None:
        device = Device(ca=ca, app_id=app_id)
        token = device.attestation_object(b"c" * 32, now=NOW, extensions=extensions)
        try:
            verify_attestation(
                attestation_object=token,
                key_id=device.key_id,
                client_data_hash=b"c" * 32,
                policy=policy,
                now=NOW,
            )
        except Rejected as exc:
            return exc.reason
        return None

    assert register(APP_ID, ext(4, "3.0")) is None
    assert register(OTHER_APP_ID, ext(4, "3.0")) is Reason.BUNDLE_VERSION_TOO_OLD
    assert register(OTHER_APP_ID, ext(1, "3.1")) is None
    assert register(APP_ID, ext(1, "3.1")) is Reason.VALIDATION_CATEGORY_NOT_ALLOWED
    assert register(APP_ID, None) is None
    assert register(OTHER_APP_ID, None) is Reason.EXTENSIONS_MISSING
    # The spec survives JSON: a resumed re-verification run rebuilds the same policy.
    again = PolicySpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again.normalized() == spec.normalized()
    assert again.build().apps == policy.apps


def test_a_run_stored_by_the_previous_release_resumes_under_its_policy(tmp_path: Path) -> None:
    from worker.service.reverify import RunFilters, RunMismatch, start_run
    from worker.store import reverify as runs

    engine = create_store_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    upgrade(engine)
    sessions = session_factory(engine)
    filters = RunFilters(app_ids=(APP_ID,))
    # The JSON the release before the build policy stored: no field of the build policy.
    stored = {
        "app_ids": [APP_ID],
        "dev_app_ids": [],
        "root_pem": None,
        "distrusted_certificates": ["ab" * 32],
        "distrusted_key_ids": [],
    }
    try:
        with sessions() as session, session.begin():
            runs.create_run(
                session, run_id="old", apply=False, policy=stored, filters=filters, now=NOW
            )
        same = PolicySpec(app_ids=(APP_ID,), distrusted_certificates=("AB" * 32,))
        with sessions() as session, session.begin():
            state = start_run(
                session, run_id="old", policy=same, filters=filters, apply=False, now=NOW
            )
        assert state.run_id == "old"
        stricter = dataclasses.replace(same, min_bundle_version="2.0")
        with sessions() as session, session.begin(), pytest.raises(RunMismatch):
            start_run(session, run_id="old", policy=stricter, filters=filters, apply=False, now=NOW)
    finally:
        engine.dispose()


# Settings: the one builder, and clear errors at start -----------------------------------------


def test_settings_describe_the_whole_policy(monkeypatch: pytest.MonkeyPatch, ca: TestCA) -> None:
    for name in list(os.environ):
        if name.startswith("APPATTEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("APPATTEST_APP_IDS", f"{APP_ID},{OTHER_APP_ID}")
    monkeypatch.setenv("APPATTEST_ALLOWED_VALIDATION_CATEGORIES", "4, 7")
    monkeypatch.setenv("APPATTEST_MIN_BUNDLE_VERSION", "2.0")
    monkeypatch.setenv("APPATTEST_REQUIRE_EXTENSIONS", "true")
    monkeypatch.setenv(
        "APPATTEST_APP_POLICIES", json.dumps({OTHER_APP_ID: {"min_bundle_version": "5"}})
    )
    settings = load_settings()
    policy = settings.policy()
    main, other = policy.app(APP_ID), policy.app(OTHER_APP_ID)
    assert main is not None and other is not None
    assert main.extensions == rules(
        allowed_validation_categories=frozenset({4, 7}),
        min_bundle_version="2.0",
        require_extensions=True,
    )
    assert other.extensions.min_bundle_version == "5"
    assert other.extensions.allowed_validation_categories == frozenset({4, 7})
    # What serve gives its worker process rebuilds the very same policy.
    for name in list(os.environ):
        if name.startswith("APPATTEST_"):
            monkeypatch.delenv(name)
    for name, value in worker_environment(settings).items():
        if name.startswith("APPATTEST_"):
            monkeypatch.setenv(name, value)
    assert load_settings() == settings
    assert load_settings().policy().apps == policy.apps
    # Empty: every category and no per-app rule, as when unset.
    monkeypatch.setenv("APPATTEST_ALLOWED_VALIDATION_CATEGORIES", "")
    monkeypatch.setenv("APPATTEST_APP_POLICIES", " ")
    assert load_settings().allowed_validation_categories is None
    assert load_settings().app_policies == {}


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("APPATTEST_MIN_BUNDLE_VERSION", "2.0-beta", "is not a bundle version"),
        ("APPATTEST_ALLOWED_VALIDATION_CATEGORIES", "four", "allowed_validation_categories"),
        ("APPATTEST_ALLOWED_VALIDATION_CATEGORIES", "-1", "allowed_validation_categories"),
        ("APPATTEST_APP_POLICIES", "not json", "APPATTEST_APP_POLICIES must be a JSON object"),
        ("APPATTEST_APP_POLICIES", "[]", "app_policies"),
        ("APPATTEST_APP_POLICIES", json.dumps({APP_ID: {"min_version": "2"}}), "min_version"),
        (
            "APPATTEST_APP_POLICIES",
            json.dumps({APP_ID: {"min_bundle_version": "x"}}),
            "is not a bundle version",
        ),
        (
            "APPATTEST_APP_POLICIES",
            json.dumps({"TEAMID1234.not.configured": {}}),
            "App IDs that are not accepted: ['TEAMID1234.not.configured']",
        ),
    ],
)
def test_a_wrong_policy_setting_stops_verify_with_a_usage_error(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    proc = run_verify(tmp_path, [], "--app-id", APP_ID, env={variable: value})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "invalid" in proc.stderr
    assert says in proc.stderr


# Apple's own iOS 27 sample --------------------------------------------------------------------


def test_apples_ios27_sample_under_a_build_policy() -> None:
    vector = next(v for v in load_vectors() if v.id == "att-apple-guide-2026")

    def verdict(extension_rules: ExtensionRules) -> Reason | None:
        policy = Policy.build(
            trust=TrustStore.apple(), production_apps=[vector["appId"]], extensions=extension_rules
        )
        try:
            result = verify_attestation(
                attestation_object=b64(vector["attestation"]),
                key_id=b64(vector["keyId"]),
                client_data_hash=b64(vector["clientDataHash"]),
                policy=policy,
                now=verify_at(vector),
            )
        except Rejected as exc:
            return exc.reason
        assert result.extensions is not None
        assert (result.extensions.validation_category, result.extensions.bundle_version) == (
            1,
            "1",
        )
        return None

    allowing = rules(
        allowed_validation_categories=frozenset({1}),
        min_bundle_version="1.0",
        require_extensions=True,
    )
    assert verdict(allowing) is None
    assert verdict(rules(allowed_validation_categories=frozenset({4}))) is (
        Reason.VALIDATION_CATEGORY_NOT_ALLOWED
    )
    assert verdict(rules(min_bundle_version="1.0.1")) is Reason.BUNDLE_VERSION_TOO_OLD


# appattest verify -----------------------------------------------------------------------------


def run_verify(
    tmp_path: Path, lines: list[dict[str, str]], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    base = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "appattest",
            "verify",
            str(source),
            "--store",
            f"sqlite:///{tmp_path / 'keys.db'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )


def verify_lines(ca: TestCA) -> tuple[list[dict[str, str]], list[str | None]]:
    """Registrations and assertions of every case, and their verdicts under
    ``--allow-validation-category 4 --min-bundle-version 2.0``."""
    lines: list[dict[str, str]] = []
    expected: list[str | None] = []

    def add(body: dict[str, str], reason: Reason | None) -> None:
        lines.append(body)
        expected.append(None if reason is None else reason.value)

    registrations = [
        (ext(4, "2.0"), None),
        (ext(4, "10.0"), None),
        (ext(4, "2.0.1"), None),
        (ext(4, "2"), None),
        (ext(1, "2.0"), Reason.VALIDATION_CATEGORY_NOT_ALLOWED),
        (ext(4, "1.9"), Reason.BUNDLE_VERSION_TOO_OLD),
        (ext(4, "2.0.0.1"), Reason.BUNDLE_VERSION_TOO_OLD),
        (ext(4, "2.0 beta"), Reason.BUNDLE_VERSION_TOO_OLD),
        (None, None),
    ]
    for index, (extensions, reason) in enumerate(registrations):
        device = Device(ca=ca)
        add(device.registration_body(f"r{index}", now=NOW, extensions=extensions), reason)
    # One registered device, then its assertions, each judged on its own: a version the
    # policy retired is refused although the registration passed.
    device = Device(ca=ca)
    add(device.registration_body("r-kept", now=NOW, extensions=ext(4, "2.0")), None)
    add(device.assertion_body("a1", extensions=ext(4, "2.1")), None)
    add(device.assertion_body("a2", extensions=ext(4, "1.9.9")), Reason.BUNDLE_VERSION_TOO_OLD)
    add(
        device.assertion_body("a3", extensions=ext(2, "3.0")),
        Reason.VALIDATION_CATEGORY_NOT_ALLOWED,
    )
    add(device.assertion_body("a4", extensions=ext(4, "3.x")), Reason.BUNDLE_VERSION_TOO_OLD)
    add(device.assertion_body("a5", extensions=None), None)
    add(device.assertion_body("a6", extensions=ext(4, "10.0")), None)
    return lines, expected


def test_verify_gives_the_verdict_of_every_case(ca: TestCA, tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    lines, expected = verify_lines(ca)
    proc = run_verify(
        tmp_path,
        lines,
        *STRICT,
        "--app-id",
        APP_ID,
        "--root-ca",
        str(root),
        "--at",
        NOW.isoformat(),
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["reason"] for r in out] == expected
    assert [r["ok"] for r in out] == [reason is None for reason in expected]
    # The result keeps reporting the parsed extensions, of accepted lines.
    assert out[1]["extensions"] == {
        "validationCategory": 4,
        "bundleVersion": "10.0",
        "other": {},
    }
    assert out[8]["extensions"] is None
    assert "bundle_version_too_old: 5" in proc.stderr


def test_verify_with_require_extensions_refuses_devices_without_the_map(
    ca: TestCA, tmp_path: Path
) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    old, new = Device(ca=ca), Device(ca=ca)
    lines = [
        old.registration_body("r-old", now=NOW),
        new.registration_body("r-new", now=NOW, extensions=ext(4, "2.0")),
        new.assertion_body("a-without", extensions=None),
        new.assertion_body("a-with", extensions=ext(4, "2.0")),
    ]
    args = ["--app-id", APP_ID, "--root-ca", str(root), "--at", NOW.isoformat()]
    proc = run_verify(tmp_path, lines, *args, "--require-extensions")
    out = [json.loads(line)["reason"] for line in proc.stdout.splitlines()]
    assert out == ["extensions_missing", None, "extensions_missing", None]


def test_verify_applies_per_app_rules(ca: TestCA, tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    main, other = Device(ca=ca), Device(ca=ca, app_id=OTHER_APP_ID)
    lines = [
        main.registration_body("r-main", now=NOW, extensions=ext(4, "2.5")),
        other.registration_body("r-other", now=NOW, extensions=ext(9, "2.5")),
        other.registration_body("r-other-2", now=NOW, extensions=ext(9, "3.0")),
    ]
    proc = run_verify(
        tmp_path,
        lines,
        *STRICT,
        "--app-id",
        APP_ID,
        "--app-id",
        OTHER_APP_ID,
        "--root-ca",
        str(root),
        "--at",
        NOW.isoformat(),
        env={
            "APPATTEST_APP_POLICIES": json.dumps(
                {OTHER_APP_ID: {"min_bundle_version": "3", "allowed_validation_categories": [9]}}
            )
        },
    )
    out = [json.loads(line)["reason"] for line in proc.stdout.splitlines()]
    assert out == [None, "bundle_version_too_old", None], proc.stderr


def test_a_wrong_rule_option_is_a_usage_error(tmp_path: Path) -> None:
    for args in (
        ["--min-bundle-version", "2.0.0.0"],
        ["--allow-validation-category", "-3"],
        ["--allow-validation-category", "x"],
    ):
        proc = run_verify(tmp_path, [], "--app-id", APP_ID, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


# appattest serve: the HTTP API with its real worker -------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """``appattest serve`` given the build policy on its command line (and per-app rules in
    its environment); its worker must apply them."""
    workdir = tmp_path_factory.mktemp("served-policy")
    (workdir / "root.pem").write_bytes(ca.root_pem)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    env["APPATTEST_API_KEYS"] = "policy-key"
    env["APPATTEST_APP_POLICIES"] = json.dumps({OTHER_APP_ID: {"min_bundle_version": "3.0"}})
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appattest",
                "serve",
                *STRICT,
                "--app-id",
                APP_ID,
                "--app-id",
                OTHER_APP_ID,
                "--root-ca",
                str(workdir / "root.pem"),
                "--port",
                str(port),
                "--data-dir",
                str(workdir / "data"),
                "--workers",
                "1",
            ],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": "Bearer policy-key"},
        timeout=30,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield client
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _served_verdict(client: httpx.Client, path: str, purpose: str, body: Any) -> Any:
    response = client.post("/v1/challenges", json={"purpose": purpose})
    assert response.status_code == 201, response.text
    challenge = response.json()["challenge"]
    response = client.post(path, params={"wait": 30}, json=body(challenge))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "done", response.text
    return response.json()["result"]


def test_serve_holds_registrations_and_assertions_to_the_policy(
    served: httpx.Client, ca: TestCA
) -> None:
    now = datetime.now(UTC)

    def register(device: Device, extensions: dict[str, object] | None) -> Any:
        return _served_verdict(
            served,
            "/v1/attestations",
            "registration",
            lambda c: device.registration_body(c, now=now, extensions=extensions),
        )

    def assertion(device: Device, extensions: dict[str, object] | None) -> Any:
        return _served_verdict(
            served,
            "/v1/assertions",
            "assertion",
            lambda c: device.assertion_body(c, extensions=extensions),
        )

    assert register(Device(ca=ca), ext(1, "2.0"))["reason"] == "validation_category_not_allowed"
    assert register(Device(ca=ca), ext(4, "1.10"))["reason"] == "bundle_version_too_old"
    device = Device(ca=ca)
    accepted = register(device, ext(4, "10.0"))
    assert accepted["ok"] is True
    assert accepted["extensions"]["bundleVersion"] == "10.0"
    assert assertion(device, ext(4, "2.0"))["ok"] is True
    assert assertion(device, ext(4, "1.0"))["reason"] == "bundle_version_too_old"
    assert assertion(device, ext(3, "2.0"))["reason"] == "validation_category_not_allowed"
    assert assertion(device, ext(4, "2.0.1"))["counter"] == 4
    # The per-app rule of the other app, from serve's environment, reached its worker.
    other = Device(ca=ca, app_id=OTHER_APP_ID)
    assert register(other, ext(4, "2.5"))["reason"] == "bundle_version_too_old"
    assert register(other, ext(4, "3.0"))["ok"] is True


# appattest reverify --apply, through the stack's workers ---------------------------------------

# Registrations of this module are made as of instants in this window, used nowhere else.
WINDOW_START = datetime(2023, 6, 1, tzinfo=UTC)
WINDOW = ["--since", WINDOW_START.isoformat(), "--until", (WINDOW_START + timedelta(1)).isoformat()]


def test_reverify_apply_revokes_the_keys_a_stricter_policy_refuses(
    stack: Stack, ca: TestCA, tmp_path: Path
) -> None:
    engine = create_store_engine(stack.settings.store_url)
    sessions = session_factory(engine)
    lenient = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )
    service = VerificationService(policy=lenient, sessions=sessions)
    population = {
        "kept": ext(4, "2.0"),
        "newer": ext(4, "10.0"),
        "old": ext(4, "1.9"),
        "garbled": ext(4, "v2"),
        "category": ext(1, "3.0"),
        "no map": None,
    }
    expected = {
        "kept": None,
        "newer": None,
        "old": "bundle_version_too_old",
        "garbled": "bundle_version_too_old",
        "category": "validation_category_not_allowed",
        "no map": None,
    }
    key_ids: dict[str, str] = {}
    for index, (name, extensions) in enumerate(population.items()):
        at = WINDOW_START + timedelta(minutes=index)
        device = Device(ca=ca)
        body = device.registration_body(f"reverify {name}", now=at, extensions=extensions)
        assert service.handle(parse_request(body), now=at).ok
        key_ids[name] = device.key_id_b64

    env = {**stack.env, "APPATTEST_APP_IDS": "", "APPATTEST_DEV_APP_IDS": ""}
    run_id = uuid.uuid4().hex[:16]
    policy_args = ["--app-id", APP_ID, "--root-ca", str(stack.workdir / "root.pem"), *STRICT]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "appattest",
            "reverify",
            *policy_args,
            *WINDOW,
            "--apply",
            "--run-id",
            run_id,
            "--report-dir",
            str(tmp_path / "report"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        rows = {
            row["keyId"]: row["reason"]
            for row in map(
                json.loads, (tmp_path / "report" / "results.jsonl").read_text().splitlines()
            )
        }
        assert rows == {key_ids[name]: reason for name, reason in expected.items()}
        # The summary reports them by reason.
        assert "bundle_version_too_old" in proc.stderr
        assert "validation_category_not_allowed" in proc.stderr
        with sessions() as session:
            revoked = dict(
                session.execute(
                    select(DeviceKey.key_id, DeviceKey.revoked_reason).where(
                        DeviceKey.key_id.in_(list(key_ids.values()))
                    )
                ).all()
            )
        assert revoked == {key_ids[name]: reason for name, reason in expected.items()}
        # Resuming the run under another minimum is refused: a run keeps its policy.
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "appattest",
                "reverify",
                *policy_args[:-1],
                "3.0",
                *WINDOW,
                "--apply",
                "--run-id",
                run_id,
                "--report-dir",
                str(tmp_path / "again"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 2, again.stderr
        assert "another policy" in again.stderr
        # A run under the former, lenient policy restores them (and leaves the shared store
        # as the other tests expect it: no key of this module revoked).
        restore = subprocess.run(
            [
                sys.executable,
                "-m",
                "appattest",
                "reverify",
                *policy_args[:-4],
                *WINDOW,
                "--apply",
                "--report-dir",
                str(tmp_path / "restore"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert restore.returncode == 0, restore.stderr
        with sessions() as session:
            still = session.scalars(
                select(DeviceKey.key_id).where(
                    DeviceKey.key_id.in_(list(key_ids.values())), DeviceKey.revoked_at.is_not(None)
                )
            ).all()
        assert still == []
    finally:
        engine.dispose()


def test_the_supervised_worker_gets_the_policy_options_of_its_supervisor(tmp_path: Path) -> None:
    from worker.cli import commands as cli

    root = tmp_path / "root.pem"
    given = cli.PolicyOptions(
        app_ids=(APP_ID,),
        dev_app_ids=(OTHER_APP_ID,),
        root_ca=root,
        allowed_categories=(4, 7),
        min_bundle_version="2.0.1",
        require_extensions=True,
    )
    command = cli._unsupervised_worker_command(given, None, "solo", "INFO", None)
    assert command[3] == "worker"
    # The child's command line, parsed by the worker command itself, gives the same options.
    seen: list[cli.PolicyOptions] = []
    parse = cli.policy_options(lambda *, policy, **_: seen.append(policy))
    parse(**cli.worker.make_context("worker", command[4:]).params)
    assert seen == [dataclasses.replace(given, root_ca=root.resolve())]
    assert given.overrides() == {
        "app_ids": [APP_ID],
        "dev_app_ids": [OTHER_APP_ID],
        "root_ca": root,
        "allowed_validation_categories": [4, 7],
        "min_bundle_version": "2.0.1",
        "require_extensions": True,
    }
    # Options left out stay the settings'; an explicit --no-require-extensions does not.
    assert cli.PolicyOptions().overrides() == {}
    assert cli.PolicyOptions().arguments() == []
    off = cli.PolicyOptions(require_extensions=False)
    assert off.arguments() == ["--no-require-extensions"]
    assert off.overrides() == {"require_extensions": False}
