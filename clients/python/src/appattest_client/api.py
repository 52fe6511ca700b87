"""The HTTP API's own models: challenge requests, job statuses, batches, errors and health.

The plugin bodies and the verdict are the plugin contract (``appattest_client.contract``);
these models only wrap them. Field names on the wire are camelCase, like the contract's. The
service answers with these models and the client parses its answers with them, so server and
client cannot drift apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from appattest_client.contract import VerificationResult

PurposeName = Literal["registration", "assertion"]
JobType = Literal["attestation", "assertion"]
# pending: accepted, the verdict is not in yet; done: the verdict is in ``result``; not_found:
# no job with this id was accepted for this API key, or its record is gone; lost: accepted, but
# its queue message was lost with the broker's data and no verdict can come (submit it again).
JobState = Literal["pending", "done", "not_found", "lost"]

# An Idempotency-Key: printable ASCII without spaces, as the header allows, up to 255 characters.
IdempotencyKeyText = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,255}$")]

# A keyId is standard base64 of 32 bytes: 44 characters. The challenge table's column has that
# width, so a longer value could never match a key and is refused here instead of by the database.
MAX_KEY_ID_CHARS = 44
# A keyId where the API names one outside a plugin body (a challenge's key, the key route's
# path): base64 text, so that nothing else (a control character) reaches the database.
KEY_ID_PATTERN = rf"^[A-Za-z0-9+/=]{{1,{MAX_KEY_ID_CHARS}}}$"

_Wire = ConfigDict(populate_by_name=True, frozen=True)


class ChallengeRequest(BaseModel):
    """``{"purpose", "keyId"?}``: what the challenge will be used for, optionally for which key."""

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="forbid")

    purpose: PurposeName
    key_id: Annotated[str, StringConstraints(pattern=KEY_ID_PATTERN)] | None = Field(
        default=None, alias="keyId"
    )


class IssuedChallenge(BaseModel):
    """A fresh one-time challenge and when it stops being accepted."""

    model_config = _Wire

    challenge: str
    expires_at: datetime = Field(alias="expiresAt")
    purpose: PurposeName
    key_id: str | None = Field(default=None, alias="keyId")


class JobAccepted(BaseModel):
    """A job was queued; its verdict is fetched with ``GET /v1/jobs/{jobId}``."""

    model_config = _Wire

    job_id: str = Field(alias="jobId")
    status: Literal["pending"] = "pending"


class ErrorDetail(BaseModel):
    """A stable error code and a human explanation."""

    model_config = _Wire

    code: str
    detail: str


class JobStatus(BaseModel):
    """Where a job stands: ``pending``; ``done`` with its verdict; ``not_found`` or ``lost``
    with an error saying why there is none."""

    model_config = _Wire

    job_id: str = Field(alias="jobId")
    status: JobState
    result: VerificationResult | None = None
    error: ErrorDetail | None = None

    @property
    def done(self) -> bool:
        """True when the verdict is in ``result``."""
        return self.status == "done"

    @property
    def final(self) -> bool:
        """True when waiting longer cannot change the status."""
        return self.status != "pending"


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"code", "detail"}}``."""

    model_config = _Wire

    error: ErrorDetail


class BatchItem(BaseModel):
    """One job of a batch: its type and the plugin body."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    type: JobType
    body: dict[str, Any]
    idempotency_key: IdempotencyKeyText | None = Field(default=None, alias="idempotencyKey")


class BatchRequest(BaseModel):
    """``{"jobs": [...]}``: several jobs at once; each is validated on its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    jobs: list[BatchItem]


class BatchJob(BaseModel):
    """The fate of one batch item: queued (with its job id) or rejected (with an error: the
    item's body, its idempotency key, or ``service_unavailable`` when the queue failed before
    it was accepted, which a retry may fix)."""

    model_config = _Wire

    index: int
    job_id: str | None = Field(default=None, alias="jobId")
    status: Literal["pending", "rejected"]
    error: ErrorDetail | None = None

    @property
    def accepted(self) -> bool:
        """True when the item was queued."""
        return self.status == "pending"


class BatchResponse(BaseModel):
    """One entry per submitted item, in the order given."""

    model_config = _Wire

    jobs: list[BatchJob]


class StatusRequest(BaseModel):
    """``{"jobIds": [...]}``: the jobs to report on, at most the batch limit."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    job_ids: list[str] = Field(alias="jobIds", min_length=1)


class StatusResponse(BaseModel):
    """One status per requested job, in the order asked."""

    model_config = _Wire

    jobs: list[JobStatus]


class Liveness(BaseModel):
    """The process answers, and which release of the service it runs."""

    status: Literal["ok"] = "ok"
    version: str


class Readiness(BaseModel):
    """Whether the broker, the result backend and the database answer, check by check."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


class RiskReading(BaseModel):
    """One risk metric Apple reported, and when."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    risk_metric: int = Field(alias="riskMetric")
    measured_at: datetime = Field(alias="measuredAt")


class KeyStateResponse(BaseModel):
    """A key's registration, counter, revocation, receipt dates and risk metric with history
    (newest first, at most 100 readings)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    key_id: str = Field(alias="keyId")
    app_id: str = Field(alias="appId")
    environment: str
    registered_at: datetime = Field(alias="registeredAt")
    counter: int
    revoked: bool
    revoked_at: datetime | None = Field(alias="revokedAt")
    revoked_reason: str | None = Field(alias="revokedReason")
    receipt_type: str | None = Field(alias="receiptType")
    receipt_created_at: datetime | None = Field(alias="receiptCreatedAt")
    receipt_not_before: datetime | None = Field(alias="receiptNotBefore")
    receipt_expires_at: datetime | None = Field(alias="receiptExpiresAt")
    risk_metric: int | None = Field(alias="riskMetric")
    risk_metric_at: datetime | None = Field(alias="riskMetricAt")
    refreshed_at: datetime | None = Field(alias="refreshedAt")
    refresh_outcome: str | None = Field(alias="refreshOutcome")
    next_refresh_at: datetime | None = Field(alias="nextRefreshAt")
    history: list[RiskReading]
