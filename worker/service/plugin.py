"""The plugin-facing layer: from the Capacitor plugin's JSON fields to the core's bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from worker.contract import FORMAT_APPLE_APP_ATTEST, PLATFORM_IOS, PluginRequest
from worker.core import Reason, Rejected, b64decode_strict
from worker.core.decoding import MAX_TOKEN_CHARS

_KEY_ID_BYTES: Final = 32
_KEY_ID_CHARS: Final = 44


@dataclass(frozen=True)
class DecodedRequest:
    """The binary fields of a plugin body, strictly decoded."""

    key_id: bytes
    token: bytes


def decode_plugin_fields(request: PluginRequest) -> DecodedRequest:
    """Check the plugin's claims and decode keyId and token.

    Raises ``Rejected`` with ``unsupported_format`` for anything but iOS App Attest (the
    plugin's Android and web fallbacks included), ``invalid_request`` for a keyId that is not
    standard base64 of 32 bytes, and ``malformed_token`` for a token that is not standard base64.
    """
    if request.platform != PLATFORM_IOS or request.format != FORMAT_APPLE_APP_ATTEST:
        raise Rejected(
            Reason.UNSUPPORTED_FORMAT,
            f"platform {request.platform[:20]!r} with format {request.format[:40]!r} is not "
            f"{PLATFORM_IOS} {FORMAT_APPLE_APP_ATTEST}",
        )
    key_id = b64decode_strict(
        request.key_id, reason=Reason.INVALID_REQUEST, what="keyId", max_chars=_KEY_ID_CHARS
    )
    if len(key_id) != _KEY_ID_BYTES:
        raise Rejected(Reason.INVALID_REQUEST, "keyId is not 32 bytes of standard base64")
    token = b64decode_strict(
        request.token, reason=Reason.MALFORMED_TOKEN, what="token", max_chars=MAX_TOKEN_CHARS
    )
    return DecodedRequest(key_id=key_id, token=token)
