"""The plugin's Android bodies (Google Play Integrity standard tokens), for code that builds
them: a backend forwarding what its app sent, tests, simulations.

On Android the plugin asks Play Integrity for a token whose ``requestHash`` is
``request_hash`` of the challenge (a registration) or of the payload (an assertion), and sends
the same body shape as on iOS with ``"platform": "android"``.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

from appattest_client.contract import (
    FORMAT_PLAY_INTEGRITY,
    PLATFORM_ANDROID,
    AssertionRequest,
    RegistrationRequest,
)

# The plugin's keyId on Android unless the app chose another: it names no key.
DEFAULT_KEY_ID: Final = "android-standard-integrity"


def request_hash(text: str) -> str:
    """base64url without padding of SHA-256 of the UTF-8 text: the ``requestHash`` an app
    gives Play Integrity for this challenge or payload (43 characters)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def android_registration(
    token: str,
    challenge: str,
    *,
    package_name: str | None = None,
    key_id: str = DEFAULT_KEY_ID,
) -> RegistrationRequest:
    """The plugin's Android attestation body; ``package_name`` when the service has several
    Android apps configured."""
    return RegistrationRequest(
        platform=PLATFORM_ANDROID,
        format=FORMAT_PLAY_INTEGRITY,
        keyId=key_id,
        token=token,
        challenge=challenge,
        packageName=package_name,
    )


def android_assertion(
    token: str,
    payload: str,
    *,
    challenge: str | None = None,
    package_name: str | None = None,
    key_id: str = DEFAULT_KEY_ID,
) -> AssertionRequest:
    """The plugin's Android assertion body over ``payload`` (which holds ``challenge`` when
    it is not the challenge itself)."""
    return AssertionRequest(
        platform=PLATFORM_ANDROID,
        format=FORMAT_PLAY_INTEGRITY,
        keyId=key_id,
        token=token,
        payload=payload,
        challenge=challenge,
        packageName=package_name,
    )
