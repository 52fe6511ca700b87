"""The plugin contract: the bodies ``@capgo/capacitor-app-attest`` produces and the verdict
the service gives for each.

Field names are the plugin's own (camelCase). The bodies are validated strictly: wrong types
are not coerced, unknown fields are refused, and every string is bounded. The service checks
every body against these models before any work is done, and the client parses verdicts with
them, so both sides read one definition. The server's parsing of raw bodies into these models,
with its reason codes, is ``worker.contract.parse_request``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from appattest_client.codes import Environment, Reason
from appattest_client.limits import MAX_CHALLENGE_CHARS, MAX_PAYLOAD_CHARS, MAX_TOKEN_CHARS

PLATFORM_IOS: Final = "ios"
FORMAT_APPLE_APP_ATTEST: Final = "apple-app-attest"
PLATFORM_ANDROID: Final = "android"
FORMAT_PLAY_INTEGRITY: Final = "google-play-integrity-standard"
# The (platform, format) pairs the service verifies: iOS App Attest, and on Android a Google
# Play Integrity standard token.
SUPPORTED_FORMATS: Final = frozenset(
    {(PLATFORM_IOS, FORMAT_APPLE_APP_ATTEST), (PLATFORM_ANDROID, FORMAT_PLAY_INTEGRITY)}
)


def _utf8_encodable(value: str) -> str:
    # JSON can carry lone surrogates ("\ud800") that have no UTF-8 form; the device could never
    # have signed such a string, and hashing it would raise later.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode (lone surrogate)") from exc
    return value


def _no_control_characters(value: str) -> str:
    # A keyId is base64 text; a control character (NUL above all, which PostgreSQL cannot store
    # in a text column) is never part of one.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("keyId contains a control character")
    return value


_Utf8 = AfterValidator(_utf8_encodable)
_NoControl = AfterValidator(_no_control_characters)
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=64), _Utf8]
KeyIdText = Annotated[str, StringConstraints(min_length=1, max_length=128), _Utf8, _NoControl]
TokenText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TOKEN_CHARS), _Utf8]
ChallengeText = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_CHALLENGE_CHARS), _Utf8
]
PayloadText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PAYLOAD_CHARS), _Utf8]
PackageText = Annotated[str, StringConstraints(min_length=1, max_length=255), _Utf8]


class _PluginBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    platform: ShortText
    format: ShortText
    key_id: KeyIdText = Field(alias="keyId")
    token: TokenText
    # Android only: which configured app the token is for, needed when several are.
    package_name: PackageText | None = Field(default=None, alias="packageName")

    @model_validator(mode="after")
    def _package_name_is_android_only(self) -> _PluginBody:
        if self.package_name is not None and self.platform != PLATFORM_ANDROID:
            raise ValueError(f"packageName is only for platform {PLATFORM_ANDROID!r}")
        return self


class RegistrationRequest(_PluginBody):
    """``{"platform", "format", "keyId", "challenge", "token"}``: the device attests a new key."""

    challenge: ChallengeText


class AssertionRequest(_PluginBody):
    """``{"platform", "format", "keyId", "payload", "token"}``: the device signs a payload.

    ``challenge`` is optional: when the payload is not itself the issued challenge, the caller
    names the challenge it embeds.
    """

    payload: PayloadText
    challenge: ChallengeText | None = None


PluginRequest = RegistrationRequest | AssertionRequest
Kind = Literal["registration", "assertion"]


class Extensions(BaseModel):
    """The iOS 27 authenticator data extensions, when the device sent them."""

    model_config = ConfigDict(frozen=True)

    validation_category: int | None = Field(default=None, alias="validationCategory")
    bundle_version: str | None = Field(default=None, alias="bundleVersion")
    other: dict[str, str | int] = Field(default_factory=dict)


class IntegrityVerdict(BaseModel):
    """What Google's Play Integrity verdict said of an accepted Android request, for the
    caller's own risk policy."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    app_recognition: str = Field(alias="appRecognition")
    version_code: int | None = Field(default=None, alias="versionCode")
    device_labels: list[str] = Field(alias="deviceLabels")
    recent_device_activity: str | None = Field(default=None, alias="recentDeviceActivity")
    licensing: str | None = None
    play_protect: str | None = Field(default=None, alias="playProtect")
    requested_at: datetime = Field(alias="requestedAt")


def _is_none(value: object) -> bool:
    return value is None


class VerificationResult(BaseModel):
    """The verdict for one request: ``ok`` with the stored facts, or a reason code."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    ok: bool
    kind: Kind | None
    key_id: str | None = Field(alias="keyId")
    reason: Reason | None = None
    detail: str | None = None
    app_id: str | None = Field(default=None, alias="appId")
    environment: Environment | None = None
    counter: int | None = None
    extensions: Extensions | None = None
    verified_at: datetime | None = Field(default=None, alias="verifiedAt")
    # Assertions only: the key's risk metric from Apple's last refreshed receipt, and when it
    # was measured; absent until a refresh measured one.
    risk_metric: int | None = Field(default=None, alias="riskMetric")
    risk_metric_at: datetime | None = Field(default=None, alias="riskMetricAt")
    # Android verdicts only: iOS verdicts leave them out rather than carry them as null, so
    # that their JSON stays what it was before Android was supported.
    platform: str | None = Field(default=None, exclude_if=_is_none)
    integrity: IntegrityVerdict | None = Field(default=None, exclude_if=_is_none)

    def to_json_dict(self) -> dict[str, Any]:
        """The result as plain JSON types, with the contract's camelCase names."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def rejection(
        cls,
        *,
        kind: Kind | None,
        key_id: str | None,
        reason: Reason,
        detail: str,
        platform: str | None = None,
    ) -> VerificationResult:
        """A rejected verdict."""
        return cls(
            ok=False, kind=kind, keyId=key_id, reason=reason, detail=detail, platform=platform
        )
