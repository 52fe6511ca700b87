"""Google Play Integrity (standard requests): the Android half of the plugin.

On Android the plugin's token is an encrypted Play Integrity token that only Google can decode;
the service shell has Google decode it and hands the decoded payload here. This module parses
that payload into typed frozen structs and judges it against one app's policy, the request
hash the app must have computed and an instant. No network, environment or clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from worker.core.policy import PolicyError
from worker.core.reasons import Reason, Rejected

# How far Google's timestamp may lie ahead of our clock before the token counts as stale.
MAX_CLOCK_SKEW: Final = timedelta(seconds=60)
DEFAULT_MAX_AGE: Final = timedelta(seconds=300)
# A Java package name: dot-separated segments of letters, digits and underscores.
_PACKAGE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)+")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{2}(:?[0-9a-fA-F]{2}){31}")
# 32 bytes of base64url: 43 characters, the last carrying 2 bits, then optional padding.
_B64URL_DIGEST = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]=?")


class TokenRefused(Exception):
    """Google refused to decode the token (the request is rejected: integrity_token_invalid)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"Google answered {status}: {detail}")
        self.status = status
        self.detail = detail


class GoogleUnavailable(Exception):
    """Google could not be asked (network, quota, outage, sign-in) after the bounded retries;
    the request was not judged (internal_error)."""


class AppRecognition(StrEnum):
    """The least app recognition a policy accepts (``appRecognitionVerdict``)."""

    # The binary is the one Play distributes for this package.
    PLAY_RECOGNIZED = "PLAY_RECOGNIZED"
    # Also accept a build Play does not know (sideloaded or internal test builds).
    UNRECOGNIZED_VERSION = "UNRECOGNIZED_VERSION"


class DeviceLevel(StrEnum):
    """The least device integrity a policy accepts, weakest first."""

    MEETS_BASIC_INTEGRITY = "MEETS_BASIC_INTEGRITY"
    MEETS_DEVICE_INTEGRITY = "MEETS_DEVICE_INTEGRITY"
    MEETS_STRONG_INTEGRITY = "MEETS_STRONG_INTEGRITY"


_LEVEL_ORDER: Final = list(DeviceLevel)


def parse_certificate_digest(text: str) -> bytes:
    """A signing-certificate SHA-256 as Play Console shows it (hex, colons allowed) or as the
    Play Integrity verdict carries it (base64url, padding optional); returns the 32 bytes.

    Raises ``PolicyError`` for anything else.
    """
    if _HEX_DIGEST.fullmatch(text):
        return bytes.fromhex(text.replace(":", ""))
    if _B64URL_DIGEST.fullmatch(text):
        return base64.urlsafe_b64decode(text.rstrip("=") + "=")
    raise PolicyError(f"{text[:80]!r} is not a SHA-256 digest in hex or base64url")


@dataclass(frozen=True)
class AndroidApp:
    """What one Android app (by package name) must show to be accepted.

    ``certificate_digests`` are the SHA-256 digests of the accepted signing certificates (at
    least one: an app whose signer is not pinned is refused at construction).
    """

    package_name: str
    certificate_digests: frozenset[bytes]
    app_recognition: AppRecognition = AppRecognition.PLAY_RECOGNIZED
    device_level: DeviceLevel = DeviceLevel.MEETS_DEVICE_INTEGRITY
    require_licensed: bool = True
    max_age: timedelta = DEFAULT_MAX_AGE
    min_version_code: int | None = None

    def __post_init__(self) -> None:
        if _PACKAGE.fullmatch(self.package_name) is None or len(self.package_name) > 255:
            raise PolicyError(f"{self.package_name!r} is not an Android package name")
        if not self.certificate_digests:
            raise PolicyError(f"{self.package_name}: no signing-certificate digest is accepted")
        if any(len(d) != 32 for d in self.certificate_digests):
            raise PolicyError(f"{self.package_name}: a certificate digest is not 32 bytes")
        if not timedelta(seconds=1) <= self.max_age <= timedelta(days=1):
            raise PolicyError(f"{self.package_name}: maxAgeSeconds must be 1 to 86400")
        if self.min_version_code is not None and self.min_version_code < 0:
            raise PolicyError(f"{self.package_name}: minVersionCode must not be negative")


@dataclass(frozen=True)
class AndroidPolicy:
    """The configured Android apps, by package name. It may be empty (no Android app is
    accepted): every Android request is then refused."""

    apps: Mapping[str, AndroidApp]

    @classmethod
    def build(cls, apps: Iterable[AndroidApp]) -> AndroidPolicy:
        """A policy of the given apps; a package named twice is a construction error."""
        by_name: dict[str, AndroidApp] = {}
        for app in apps:
            if app.package_name in by_name:
                raise PolicyError(f"{app.package_name} is configured twice")
            by_name[app.package_name] = app
        return cls(apps=MappingProxyType(by_name))

    def app_for(self, package_name: str | None) -> AndroidApp:
        """The app a request is judged against: the one it names, or the only one configured.

        Raises ``Rejected(invalid_request)`` when no app is configured, when the name is not
        configured, or when several are and the request names none.
        """
        if package_name is not None:
            app = self.apps.get(package_name)
            if app is None:
                raise Rejected(Reason.INVALID_REQUEST, f"{package_name} is not a configured app")
            return app
        if len(self.apps) == 1:
            return next(iter(self.apps.values()))
        if not self.apps:
            raise Rejected(Reason.INVALID_REQUEST, "no Android app is configured")
        raise Rejected(
            Reason.INVALID_REQUEST, "several Android apps are configured: name one in packageName"
        )


def request_hash(text: str) -> str:
    """What the plugin puts in ``requestHash``: base64url without padding of SHA-256 of the
    UTF-8 challenge or payload (43 characters)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# The decoded payload -----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestDetails:
    request_package_name: str
    request_hash: str
    timestamp: datetime


@dataclass(frozen=True)
class AppIntegrity:
    app_recognition_verdict: str
    package_name: str | None
    certificate_digests: tuple[bytes, ...]
    version_code: int | None


@dataclass(frozen=True)
class DeviceIntegrity:
    labels: tuple[str, ...]
    recent_device_activity: str | None


@dataclass(frozen=True)
class IntegrityPayload:
    """The fields of Google's ``tokenPayloadExternal`` that a verdict uses."""

    request: RequestDetails
    app: AppIntegrity
    device: DeviceIntegrity
    licensing: str | None
    play_protect: str | None


def _invalid(detail: str) -> Rejected:
    return Rejected(Reason.INTEGRITY_TOKEN_INVALID, f"Google's decoded payload: {detail}")


def _object(parent: Mapping[str, Any], name: str, *, required: bool) -> Mapping[str, Any]:
    value = parent.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{name} is not an object")
    return value


def _text(parent: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = parent.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise _invalid(f"{name} is not a string")
    return value


def _int64(parent: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    # Google's JSON carries int64 fields as decimal strings.
    value = parent.get(name)
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        return int(value)
    raise _invalid(f"{name} is not an integer")


def _text_list(parent: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = parent.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"{name} is not a list of strings")
    return tuple(value)


def _digest(text: str) -> bytes:
    try:
        return parse_certificate_digest(text)
    except PolicyError as exc:
        raise _invalid("certificateSha256Digest holds something that is not a digest") from exc


def parse_payload(document: Mapping[str, Any]) -> IntegrityPayload:
    """Type the JSON that ``decodeIntegrityToken`` answered (the whole answer, or its
    ``tokenPayloadExternal``). Raises ``Rejected(integrity_token_invalid)`` when a field the
    verdict needs is missing or of the wrong type."""
    payload = document.get("tokenPayloadExternal", document)
    if not isinstance(payload, dict):
        raise _invalid("tokenPayloadExternal is not an object")
    details = _object(payload, "requestDetails", required=True)
    app = _object(payload, "appIntegrity", required=True)
    device = _object(payload, "deviceIntegrity", required=False)
    account = _object(payload, "accountDetails", required=False)
    environment = _object(payload, "environmentDetails", required=False)
    activity = _object(device, "recentDeviceActivity", required=False)
    millis = _int64(details, "timestampMillis", required=True)
    assert millis is not None
    try:
        timestamp = datetime.fromtimestamp(millis / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise _invalid("timestampMillis is out of range") from exc
    return IntegrityPayload(
        request=RequestDetails(
            request_package_name=_text(details, "requestPackageName", required=True) or "",
            request_hash=_text(details, "requestHash", required=True) or "",
            timestamp=timestamp,
        ),
        app=AppIntegrity(
            app_recognition_verdict=_text(app, "appRecognitionVerdict", required=True) or "",
            package_name=_text(app, "packageName", required=False),
            certificate_digests=tuple(
                _digest(d) for d in _text_list(app, "certificateSha256Digest")
            ),
            version_code=_int64(app, "versionCode", required=False),
        ),
        device=DeviceIntegrity(
            labels=_text_list(device, "deviceRecognitionVerdict"),
            recent_device_activity=_text(activity, "deviceActivityLevel", required=False),
        ),
        licensing=_text(account, "appLicensingVerdict", required=False),
        play_protect=_text(environment, "playProtectVerdict", required=False),
    )


# The verdict -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedIntegrity:
    """An accepted Play Integrity verdict: what a caller may base its own risk policy on."""

    package_name: str
    app_recognition: str
    version_code: int | None
    device_labels: tuple[str, ...]
    recent_device_activity: str | None
    licensing: str | None
    play_protect: str | None
    requested_at: datetime


def verify_integrity(
    *, payload: IntegrityPayload, app: AndroidApp, expected_request_hash: str, now: datetime
) -> VerifiedIntegrity:
    """Judge a decoded Play Integrity payload.

    Takes the typed payload, the policy of the app the request names, the request hash of the
    challenge or payload we expect (see ``request_hash``) and the verification instant.
    Returns the verdict's fields, or raises ``Rejected`` with the first failed check's reason.
    """
    _check_request_hash(payload.request, expected_request_hash)
    _check_package(payload, app)
    _check_app_recognition(payload.app, app)
    _check_certificate(payload.app, app)
    _check_version(payload.app, app)
    _check_device(payload.device, app)
    _check_licensing(payload.licensing, app)
    _check_freshness(payload.request, app, now)
    return VerifiedIntegrity(
        package_name=app.package_name,
        app_recognition=payload.app.app_recognition_verdict,
        version_code=payload.app.version_code,
        device_labels=payload.device.labels,
        recent_device_activity=payload.device.recent_device_activity,
        licensing=payload.licensing,
        play_protect=payload.play_protect,
        requested_at=payload.request.timestamp,
    )


def _check_request_hash(details: RequestDetails, expected: str) -> None:
    # requestDetails.requestHash is what the app asked Google to bind into the token.
    if not hmac.compare_digest(details.request_hash.encode(), expected.encode()):
        raise Rejected(
            Reason.INTEGRITY_REQUEST_HASH_MISMATCH,
            "the token's requestHash is not that of the challenge or payload",
        )


def _check_package(payload: IntegrityPayload, app: AndroidApp) -> None:
    # Both the package that asked for the token and the one Play evaluated must be ours.
    names = [payload.request.request_package_name, payload.app.package_name]
    for name in names:
        if name is not None and name != app.package_name:
            raise Rejected(
                Reason.INTEGRITY_PACKAGE_MISMATCH, f"{name[:255]!r} is not {app.package_name}"
            )


def _check_app_recognition(integrity: AppIntegrity, app: AndroidApp) -> None:
    # appIntegrity.appRecognitionVerdict: UNEVALUATED is never enough.
    accepted = {AppRecognition.PLAY_RECOGNIZED.value}
    if app.app_recognition is AppRecognition.UNRECOGNIZED_VERSION:
        accepted.add(AppRecognition.UNRECOGNIZED_VERSION.value)
    if integrity.app_recognition_verdict not in accepted:
        raise Rejected(
            Reason.INTEGRITY_APP_UNRECOGNIZED,
            f"app recognition {integrity.app_recognition_verdict[:40]} is not accepted",
        )


def _check_certificate(integrity: AppIntegrity, app: AndroidApp) -> None:
    # appIntegrity.certificateSha256Digest: the app must be signed by a pinned certificate.
    if not any(
        hmac.compare_digest(seen, pinned)
        for seen in integrity.certificate_digests
        for pinned in app.certificate_digests
    ):
        raise Rejected(
            Reason.INTEGRITY_CERTIFICATE_MISMATCH,
            "the app is not signed by an accepted certificate",
        )


def _check_version(integrity: AppIntegrity, app: AndroidApp) -> None:
    if app.min_version_code is None:
        return
    if integrity.version_code is None or integrity.version_code < app.min_version_code:
        raise Rejected(
            Reason.INTEGRITY_VERSION_TOO_OLD,
            f"versionCode {integrity.version_code} is below {app.min_version_code}",
        )


def _check_device(device: DeviceIntegrity, app: AndroidApp) -> None:
    # deviceIntegrity.deviceRecognitionVerdict: the required level or a stronger one.
    good_enough = {level.value for level in _LEVEL_ORDER[_LEVEL_ORDER.index(app.device_level) :]}
    if good_enough.isdisjoint(device.labels):
        shown = ", ".join(label[:40] for label in device.labels[:5]) or "no label"
        raise Rejected(
            Reason.INTEGRITY_DEVICE_NOT_TRUSTED, f"{shown} does not meet {app.device_level}"
        )


def _check_licensing(licensing: str | None, app: AndroidApp) -> None:
    # accountDetails.appLicensingVerdict.
    if app.require_licensed and licensing != "LICENSED":
        raise Rejected(
            Reason.INTEGRITY_UNLICENSED, f"licensing verdict is {(licensing or 'absent')[:40]}"
        )


def _check_freshness(details: RequestDetails, app: AndroidApp, now: datetime) -> None:
    # requestDetails.timestampMillis: when the app asked for the token.
    if details.timestamp > now + MAX_CLOCK_SKEW:
        raise Rejected(Reason.INTEGRITY_TOKEN_STALE, "the token was requested in the future")
    if now - details.timestamp > app.max_age:
        raise Rejected(
            Reason.INTEGRITY_TOKEN_STALE,
            f"the token was requested more than {int(app.max_age.total_seconds())} s ago",
        )
