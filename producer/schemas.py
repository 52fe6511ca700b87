"""The HTTP API's own models, as the server uses them: challenge requests, job statuses,
batches, errors and health.

They are defined once, in ``appattest_client.api`` (the Python client's package, shipped with
this one), so the answers the server writes and the ones the client parses come from the same
classes; this module gives them their names on the server's side.
"""

from __future__ import annotations

from appattest_client.api import (
    KEY_ID_PATTERN,
    MAX_KEY_ID_CHARS,
    BatchItem,
    BatchJob,
    BatchRequest,
    BatchResponse,
    ChallengeRequest,
    ErrorDetail,
    ErrorResponse,
    IdempotencyKeyText,
    IssuedChallenge,
    JobAccepted,
    JobState,
    JobStatus,
    JobType,
    KeyStateResponse,
    Liveness,
    PurposeName,
    Readiness,
    RiskReading,
    StatusRequest,
    StatusResponse,
)

__all__ = [
    "KEY_ID_PATTERN",
    "MAX_KEY_ID_CHARS",
    "BatchItem",
    "BatchJob",
    "BatchRequest",
    "BatchResponse",
    "ChallengeRequest",
    "ErrorDetail",
    "ErrorResponse",
    "IdempotencyKeyText",
    "IssuedChallenge",
    "JobAccepted",
    "JobState",
    "JobStatus",
    "JobType",
    "KeyStateResponse",
    "Liveness",
    "PurposeName",
    "Readiness",
    "RiskReading",
    "StatusRequest",
    "StatusResponse",
]
