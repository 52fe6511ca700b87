"""The wire contract as the workers use it: the Capacitor plugin's two request bodies, the
verdict we return, and ``parse_request``, which turns a raw body into one of them or an
``invalid_request`` rejection.

The models themselves are defined once, in ``appattest_client.contract`` (the Python client's
package, shipped with this one), and re-exported here under their usual names. Field names are
the plugin's own (camelCase). Everything is validated strictly: wrong types are not coerced,
unknown fields are refused, and every string is bounded, so a body that is not exactly the
plugin's contract becomes an ``invalid_request`` before any work is done.
"""

from __future__ import annotations

import json
from typing import Any, Final

from pydantic import ValidationError

from appattest_client.contract import (
    FORMAT_APPLE_APP_ATTEST,
    FORMAT_PLAY_INTEGRITY,
    PLATFORM_ANDROID,
    PLATFORM_IOS,
    SUPPORTED_FORMATS,
    AssertionRequest,
    Extensions,
    IntegrityVerdict,
    Kind,
    PluginRequest,
    RegistrationRequest,
    VerificationResult,
)
from appattest_client.limits import MAX_CHALLENGE_CHARS, MAX_PAYLOAD_CHARS
from worker.core.reasons import Reason, Rejected

# The largest body the contract can hold (token plus payload plus small fields), rounded up.
# Anything longer is refused before JSON parsing starts.
MAX_BODY_BYTES: Final = 192 * 1024

__all__ = [
    "FORMAT_APPLE_APP_ATTEST",
    "FORMAT_PLAY_INTEGRITY",
    "MAX_BODY_BYTES",
    "MAX_CHALLENGE_CHARS",
    "MAX_PAYLOAD_CHARS",
    "PLATFORM_ANDROID",
    "PLATFORM_IOS",
    "SUPPORTED_FORMATS",
    "AssertionRequest",
    "Extensions",
    "IntegrityVerdict",
    "Kind",
    "PluginRequest",
    "Reason",
    "RegistrationRequest",
    "Rejected",
    "VerificationResult",
    "kind_of",
    "parse_request",
]


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
