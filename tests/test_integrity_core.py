"""The Android verdict core, the Android policy and settings, and the contract's Android bodies.

Each broken payload is a real-shaped Google answer with one field changed, asserting its
reason code.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from producer.jobs import check_request
from tests.conftest import NOW
from tests.fake_google import b64url, payload
from worker.contract import (
    AssertionRequest,
    RegistrationRequest,
    VerificationResult,
    parse_request,
)
from worker.core import PolicyError, Reason, Rejected
from worker.core.integrity import (
    AndroidApp,
    AndroidPolicy,
    AppRecognition,
    DeviceLevel,
    parse_certificate_digest,
    parse_payload,
    request_hash,
    verify_integrity,
)
from worker.settings import Settings

PACKAGE = "com.example.app"
CERT = hashlib.sha256(b"the app's signing certificate").digest()
CHALLENGE = "a challenge the service issued"


def _app(**changes: Any) -> AndroidApp:
    return AndroidApp(package_name=PACKAGE, certificate_digests=frozenset({CERT}), **changes)


def _answer(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "package_name": PACKAGE,
        "signed_text": CHALLENGE,
        "certificate_digest": CERT,
        "at": NOW - timedelta(seconds=5),
    }
    fields.update(changes)
    return payload(**fields)


def _verify(answer: dict[str, Any], app: AndroidApp | None = None) -> Any:
    return verify_integrity(
        payload=parse_payload(answer),
        app=app or _app(),
        expected_request_hash=request_hash(CHALLENGE),
        now=NOW,
    )


def _mutated(path: str, value: Any) -> dict[str, Any]:
    answer = _answer()
    node = answer["tokenPayloadExternal"]
    *parents, leaf = path.split(".")
    for name in parents:
        node = node[name]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return answer


_DELETE = object()


def test_request_hash_is_the_plugins() -> None:
    digest = hashlib.sha256("héllo".encode()).digest()
    assert request_hash("héllo") == b64url(digest)
    assert len(request_hash("x")) == 43 and "=" not in request_hash("x")


def test_a_genuine_verdict_is_accepted_with_its_fields() -> None:
    verified = _verify(_answer())
    assert verified.package_name == PACKAGE
    assert verified.app_recognition == "PLAY_RECOGNIZED"
    assert verified.device_labels == ("MEETS_BASIC_INTEGRITY", "MEETS_DEVICE_INTEGRITY")
    assert verified.recent_device_activity == "LEVEL_1"
    assert verified.licensing == "LICENSED"
    assert verified.version_code == 42
    assert verified.play_protect == "NO_ISSUES"
    assert verified.requested_at == NOW - timedelta(seconds=5)


@pytest.mark.parametrize(
    ("answer", "app", "reason"),
    [
        pytest.param(
            _answer(signed_text="another challenge"),
            None,
            Reason.INTEGRITY_REQUEST_HASH_MISMATCH,
            id="hash-of-another-challenge",
        ),
        pytest.param(
            _answer(request_package_name="com.evil.app"),
            None,
            Reason.INTEGRITY_PACKAGE_MISMATCH,
            id="requested-by-another-package",
        ),
        pytest.param(
            _mutated("appIntegrity.packageName", "com.evil.app"),
            None,
            Reason.INTEGRITY_PACKAGE_MISMATCH,
            id="evaluated-another-package",
        ),
        pytest.param(
            _answer(app_recognition="UNEVALUATED"),
            None,
            Reason.INTEGRITY_APP_UNRECOGNIZED,
            id="unevaluated",
        ),
        pytest.param(
            _answer(app_recognition="UNRECOGNIZED_VERSION"),
            None,
            Reason.INTEGRITY_APP_UNRECOGNIZED,
            id="unrecognized-version",
        ),
        pytest.param(
            _answer(app_recognition="UNEVALUATED"),
            _app(app_recognition=AppRecognition.UNRECOGNIZED_VERSION),
            Reason.INTEGRITY_APP_UNRECOGNIZED,
            id="unevaluated-under-lenient-policy",
        ),
        pytest.param(
            _answer(certificate_digest=hashlib.sha256(b"a re-signed copy").digest()),
            None,
            Reason.INTEGRITY_CERTIFICATE_MISMATCH,
            id="other-signer",
        ),
        pytest.param(
            _mutated("appIntegrity.certificateSha256Digest", _DELETE),
            None,
            Reason.INTEGRITY_CERTIFICATE_MISMATCH,
            id="no-certificate",
        ),
        pytest.param(
            _answer(version_code=41),
            _app(min_version_code=42 + 1),
            Reason.INTEGRITY_VERSION_TOO_OLD,
            id="old-version",
        ),
        pytest.param(
            _mutated("appIntegrity.versionCode", _DELETE),
            _app(min_version_code=1),
            Reason.INTEGRITY_VERSION_TOO_OLD,
            id="no-version",
        ),
        pytest.param(
            _answer(device_labels=()),
            None,
            Reason.INTEGRITY_DEVICE_NOT_TRUSTED,
            id="no-label",
        ),
        pytest.param(
            _answer(device_labels=("MEETS_BASIC_INTEGRITY",)),
            None,
            Reason.INTEGRITY_DEVICE_NOT_TRUSTED,
            id="basic-only",
        ),
        pytest.param(
            _answer(device_labels=("MEETS_VIRTUAL_INTEGRITY",)),
            _app(device_level=DeviceLevel.MEETS_BASIC_INTEGRITY),
            Reason.INTEGRITY_DEVICE_NOT_TRUSTED,
            id="emulator",
        ),
        pytest.param(
            _answer(),
            _app(device_level=DeviceLevel.MEETS_STRONG_INTEGRITY),
            Reason.INTEGRITY_DEVICE_NOT_TRUSTED,
            id="strong-required",
        ),
        pytest.param(
            _answer(licensing="UNLICENSED"), None, Reason.INTEGRITY_UNLICENSED, id="unlicensed"
        ),
        pytest.param(
            _answer(licensing="UNEVALUATED"),
            None,
            Reason.INTEGRITY_UNLICENSED,
            id="licensing-unevaluated",
        ),
        pytest.param(
            _mutated("accountDetails", _DELETE),
            None,
            Reason.INTEGRITY_UNLICENSED,
            id="licensing-absent",
        ),
        pytest.param(
            _answer(at=NOW - timedelta(seconds=301)), None, Reason.INTEGRITY_TOKEN_STALE, id="old"
        ),
        pytest.param(
            _answer(at=NOW - timedelta(seconds=31)),
            _app(max_age=timedelta(seconds=30)),
            Reason.INTEGRITY_TOKEN_STALE,
            id="older-than-policy",
        ),
        pytest.param(
            _answer(at=NOW + timedelta(seconds=61)),
            None,
            Reason.INTEGRITY_TOKEN_STALE,
            id="from-the-future",
        ),
        pytest.param(
            _mutated("requestDetails", _DELETE),
            None,
            Reason.INTEGRITY_TOKEN_INVALID,
            id="no-request-details",
        ),
        pytest.param(
            _mutated("requestDetails.timestampMillis", "soon"),
            None,
            Reason.INTEGRITY_TOKEN_INVALID,
            id="timestamp-not-a-number",
        ),
        pytest.param(
            _mutated("deviceIntegrity.deviceRecognitionVerdict", "MEETS_DEVICE_INTEGRITY"),
            None,
            Reason.INTEGRITY_TOKEN_INVALID,
            id="labels-not-a-list",
        ),
        pytest.param(
            _mutated("appIntegrity.certificateSha256Digest", ["not a digest"]),
            None,
            Reason.INTEGRITY_TOKEN_INVALID,
            id="digest-not-a-digest",
        ),
    ],
)
def test_each_failed_check_has_its_reason(
    answer: dict[str, Any], app: AndroidApp | None, reason: Reason
) -> None:
    with pytest.raises(Rejected) as rejected:
        _verify(answer, app)
    assert rejected.value.reason is reason


@pytest.mark.parametrize(
    ("answer", "app"),
    [
        pytest.param(
            _answer(app_recognition="UNRECOGNIZED_VERSION"),
            _app(app_recognition=AppRecognition.UNRECOGNIZED_VERSION),
            id="lenient-recognition",
        ),
        pytest.param(
            _answer(device_labels=("MEETS_BASIC_INTEGRITY",)),
            _app(device_level=DeviceLevel.MEETS_BASIC_INTEGRITY),
            id="basic-policy",
        ),
        pytest.param(
            _answer(
                device_labels=(
                    "MEETS_BASIC_INTEGRITY",
                    "MEETS_DEVICE_INTEGRITY",
                    "MEETS_STRONG_INTEGRITY",
                )
            ),
            _app(device_level=DeviceLevel.MEETS_STRONG_INTEGRITY),
            id="strong-policy",
        ),
        pytest.param(
            # A stronger label satisfies a weaker requirement on its own.
            _answer(device_labels=("MEETS_STRONG_INTEGRITY",)),
            None,
            id="stronger-label",
        ),
        pytest.param(
            _answer(licensing="UNLICENSED"), _app(require_licensed=False), id="licence-optional"
        ),
        pytest.param(_answer(version_code=43), _app(min_version_code=43), id="min-version"),
        pytest.param(_answer(at=NOW + timedelta(seconds=59)), None, id="within-clock-skew"),
        pytest.param(_answer(at=NOW - timedelta(seconds=300)), None, id="at-the-age-bound"),
        pytest.param(_answer(activity=None), None, id="no-recent-activity"),
    ],
)
def test_policy_choices_accept(answer: dict[str, Any], app: AndroidApp | None) -> None:
    assert _verify(answer, app).package_name == PACKAGE


# The policy ---------------------------------------------------------------------------------


def test_certificate_digests_in_hex_and_base64url_are_the_same() -> None:
    colon_hex = ":".join(f"{b:02X}" for b in CERT)
    assert parse_certificate_digest(colon_hex) == CERT
    assert parse_certificate_digest(CERT.hex()) == CERT
    assert parse_certificate_digest(b64url(CERT)) == CERT
    standard = b64url(CERT)[:-2] + "+/"
    for bad in ["", "abcd", CERT.hex()[:-2], b64url(CERT[:31]), standard, b64url(CERT) + "A"]:
        with pytest.raises(PolicyError):
            parse_certificate_digest(bad)


@pytest.mark.parametrize(
    "changes",
    [
        {"package_name": "no_dot"},
        {"package_name": "com.example.1app"},
        {"certificate_digests": frozenset()},
        {"certificate_digests": frozenset({b"short"})},
        {"max_age": timedelta(0)},
        {"min_version_code": -1},
    ],
)
def test_an_incomplete_app_policy_is_refused(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"package_name": PACKAGE, "certificate_digests": frozenset({CERT})}
    with pytest.raises(PolicyError):
        AndroidApp(**{**fields, **changes})


def test_the_app_a_request_is_judged_against() -> None:
    one = AndroidPolicy.build([_app()])
    assert one.app_for(None).package_name == PACKAGE
    assert one.app_for(PACKAGE).package_name == PACKAGE
    other = AndroidApp(package_name="com.example.other", certificate_digests=frozenset({CERT}))
    two = AndroidPolicy.build([_app(), other])
    assert two.app_for("com.example.other") is other
    for policy, name in [(two, None), (one, "com.example.other"), (AndroidPolicy.build([]), None)]:
        with pytest.raises(Rejected) as rejected:
            policy.app_for(name)
        assert rejected.value.reason is Reason.INVALID_REQUEST
    with pytest.raises(PolicyError):
        AndroidPolicy.build([_app(), _app()])


# Settings -----------------------------------------------------------------------------------


def _env(monkeypatch: pytest.MonkeyPatch, apps: object, credentials: Path | None) -> None:
    monkeypatch.setenv(
        "APPATTEST_ANDROID_APPS", apps if isinstance(apps, str) else json.dumps(apps)
    )
    if credentials is not None:
        monkeypatch.setenv("APPATTEST_GOOGLE_CREDENTIALS_FILE", str(credentials))


def test_android_apps_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    apps = {
        PACKAGE: {"certificateDigests": [CERT.hex()]},
        "com.example.other": {
            "certificateDigests": [b64url(CERT)],
            "appRecognition": "UNRECOGNIZED_VERSION",
            "deviceLevel": "MEETS_STRONG_INTEGRITY",
            "requireLicensed": False,
            "maxAgeSeconds": 60,
            "minVersionCode": 7,
        },
    }
    _env(monkeypatch, apps, tmp_path / "sa.json")
    policy = Settings().android_policy()
    assert policy.apps[PACKAGE] == _app()
    assert policy.apps["com.example.other"] == AndroidApp(
        package_name="com.example.other",
        certificate_digests=frozenset({CERT}),
        app_recognition=AppRecognition.UNRECOGNIZED_VERSION,
        device_level=DeviceLevel.MEETS_STRONG_INTEGRITY,
        require_licensed=False,
        max_age=timedelta(seconds=60),
        min_version_code=7,
    )
    # The same JSON in a file, named instead.
    (tmp_path / "android.json").write_text(json.dumps(apps))
    monkeypatch.setenv("APPATTEST_ANDROID_APPS", str(tmp_path / "android.json"))
    assert Settings().android_policy() == policy
    monkeypatch.delenv("APPATTEST_ANDROID_APPS")
    assert Settings().android_policy().apps == {}


@pytest.mark.parametrize(
    ("apps", "credentials", "message"),
    [
        ({PACKAGE: {"certificateDigests": ["zz"]}}, True, "not a SHA-256 digest"),
        ({PACKAGE: {"certificateDigests": []}}, True, "certificateDigests"),
        ({PACKAGE: {}}, True, "certificateDigests"),
        ({"bad": {"certificateDigests": [CERT.hex()]}}, True, "not an Android package"),
        ({PACKAGE: {"certificateDigests": [CERT.hex()], "deviceLevel": "ANY"}}, True, "device"),
        ({PACKAGE: {"certificateDigests": [CERT.hex()], "maxAgeSeconds": 0}}, True, "max"),
        ({PACKAGE: {"certificateDigests": [CERT.hex()], "typo": 1}}, True, "typo"),
        ({PACKAGE: {"certificateDigests": [CERT.hex()]}}, False, "GOOGLE_CREDENTIALS_FILE"),
        ("/nonexistent/android.json", True, "neither JSON nor a readable JSON file"),
        ("{not json", True, "not valid JSON"),
    ],
)
def test_bad_android_settings_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, apps: object, credentials: bool, message: str
) -> None:
    monkeypatch.delenv("APPATTEST_GOOGLE_CREDENTIALS_FILE", raising=False)
    _env(monkeypatch, apps, tmp_path / "sa.json" if credentials else None)
    with pytest.raises(ValidationError, match=message):
        Settings()


# The contract -------------------------------------------------------------------------------

_ANDROID = {
    "platform": "android",
    "format": "google-play-integrity-standard",
    "keyId": "android-standard-integrity",
    "token": "an opaque Play Integrity token",
}


def test_android_bodies_pass_the_contract_and_the_door() -> None:
    registration = check_request({**_ANDROID, "challenge": "c"}, expected="registration")
    assert isinstance(registration, RegistrationRequest) and registration.package_name is None
    assertion = check_request({**_ANDROID, "payload": "p c", "packageName": PACKAGE})
    assert isinstance(assertion, AssertionRequest) and assertion.package_name == PACKAGE


@pytest.mark.parametrize(
    "body",
    [
        {**_ANDROID, "platform": "ios", "format": "apple-app-attest", "challenge": "c",
         "packageName": PACKAGE},
        {**_ANDROID, "challenge": "c", "packageName": ""},
        {**_ANDROID, "challenge": "c", "packageName": 5},
        {**_ANDROID, "challenge": "c", "package": PACKAGE},
    ],
)  # fmt: skip
def test_package_name_is_android_only_and_the_only_extra_field(body: dict[str, Any]) -> None:
    with pytest.raises(Rejected) as rejected:
        parse_request(body)
    assert rejected.value.reason is Reason.INVALID_REQUEST


def test_ios_results_keep_their_shape() -> None:
    result = VerificationResult.rejection(
        kind="registration", key_id="k", reason=Reason.NONCE_MISMATCH, detail="d"
    )
    assert "platform" not in result.to_json_dict() and "integrity" not in result.to_json_dict()
    android = VerificationResult.rejection(
        kind="registration",
        key_id="k",
        reason=Reason.INTEGRITY_UNLICENSED,
        detail="d",
        platform="android",
    )
    assert android.to_json_dict()["platform"] == "android"
    assert VerificationResult.model_validate(android.to_json_dict()) == android
