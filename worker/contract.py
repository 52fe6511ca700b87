"""The wire contract: the Capacitor plugin's two request bodies and the verdict we return.

Field names are the plugin's own (camelCase). Everything here is validated strictly: wrong
types are not coerced, unknown fields are refused, and every string is bounded, so a body that
is not exactly the plugin's contract becomes an ``invalid_request`` before any work is done.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from worker.core.decoding import MAX_TOKEN_CHARS
from worker.core.policy import Environment
from worker.core.reasons import Reason, Rejected

PLATFORM_IOS: Final = "ios"
FORMAT_APPLE_APP_ATTEST: Final = "apple-app-attest"

MAX_CHALLENGE_CHARS: Final = 1024
MAX_PAYLOAD_CHARS: Final = 64 * 1024
# The largest body the contract can hold (token plus payload plus small fields), rounded up.
# Anything longer is refused before JSON parsing starts.
MAX_BODY_BYTES: Final = 192 * 1024


def _utf8_encodable(value: str) -> str:
    # JSON can carry lone surrogates ("\ud800") that have no UTF-8 form; the device could never
    # have signed such a string, and hashing it would raise later.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode (lone surrogate)") from exc
    return value


_Utf8 = AfterValidator(_utf8_encodable)
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=64), _Utf8]
KeyIdText = Annotated[str, StringConstraints(min_length=1, max_length=128), _Utf8]
TokenText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TOKEN_CHARS), _Utf8]
ChallengeText = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_CHALLENGE_CHARS), _Utf8
]
PayloadText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PAYLOAD_CHARS), _Utf8]


class _PluginBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    platform: ShortText
    format: ShortText
    key_id: KeyIdText = Field(alias="keyId")
    token: TokenText


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

    def to_json_dict(self) -> dict[str, Any]:
        """The result as plain JSON types, with the contract's camelCase names."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def rejection(
        cls, *, kind: Kind | None, key_id: str | None, reason: Reason, detail: str
    ) -> VerificationResult:
        """A rejected verdict."""
        return cls(ok=False, kind=kind, keyId=key_id, reason=reason, detail=detail)


def kind_of(body: dict[str, Any]) -> Kind:
    """A body with ``payload`` is an assertion, any other a registration."""
    return "assertion" if "payload" in body else "registration"


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:3]]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def parse_request(body: str | bytes | dict[str, Any]) -> PluginRequest:
    """Validate one plugin body, given as JSON text or as an already-decoded object.

    Returns a ``RegistrationRequest`` or an ``AssertionRequest``. Raises
    ``Rejected(invalid_request)`` for anything that is not the plugin contract: not JSON, not an
    object, missing or empty fields, wrong types, unknown fields, oversized text.
    """
    if isinstance(body, str | bytes):
        if len(body) > MAX_BODY_BYTES:
            raise Rejected(Reason.INVALID_REQUEST, f"body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise Rejected(Reason.INVALID_REQUEST, "body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise Rejected(Reason.INVALID_REQUEST, "body is not a JSON object")
    model = AssertionRequest if kind_of(body) == "assertion" else RegistrationRequest
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise Rejected(Reason.INVALID_REQUEST, _first_error(exc)) from exc
