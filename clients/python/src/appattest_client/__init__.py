"""The Python client of the App Attest verification service, and the wire models it shares
with the service.

``AppAttestClient`` / ``AsyncAppAttestClient`` call the service's HTTP API over httpx; verdicts
come back as ``VerificationResult``, with a ``Reason`` code when rejected. The modules:

- ``appattest_client.codes``: the reason codes and environments (standard library only);
- ``appattest_client.contract``: the plugin's request bodies and the verdict;
- ``appattest_client.api``: the HTTP API's own models (challenges, job statuses, batches);
- ``appattest_client.client``: the two clients and ``AppAttestError``;
- ``appattest_client.android``: the plugin's Android bodies (``android_registration``,
  ``android_assertion``) and the ``request_hash`` an app gives Play Integrity.

The names below are loaded when first used, so importing one module (the service's
verification core reads ``codes``) does not import httpx.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appattest_client.android import android_assertion, android_registration
    from appattest_client.api import BatchJob, IssuedChallenge, JobStatus, KeyStateResponse
    from appattest_client.client import AppAttestClient, AppAttestError, AsyncAppAttestClient
    from appattest_client.codes import Environment, Reason
    from appattest_client.contract import (
        AssertionRequest,
        Extensions,
        IntegrityVerdict,
        RegistrationRequest,
        VerificationResult,
    )

_EXPORTS = {
    "android_assertion": "android",
    "android_registration": "android",
    "AppAttestClient": "client",
    "AppAttestError": "client",
    "AssertionRequest": "contract",
    "AsyncAppAttestClient": "client",
    "BatchJob": "api",
    "Environment": "codes",
    "Extensions": "contract",
    "IntegrityVerdict": "contract",
    "IssuedChallenge": "api",
    "JobStatus": "api",
    "KeyStateResponse": "api",
    "Reason": "codes",
    "RegistrationRequest": "contract",
    "VerificationResult": "contract",
}

__all__ = [
    "AppAttestClient",
    "AppAttestError",
    "AssertionRequest",
    "AsyncAppAttestClient",
    "BatchJob",
    "Environment",
    "Extensions",
    "IntegrityVerdict",
    "IssuedChallenge",
    "JobStatus",
    "KeyStateResponse",
    "Reason",
    "RegistrationRequest",
    "VerificationResult",
    "android_assertion",
    "android_registration",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
