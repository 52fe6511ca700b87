"""The state of a registered key as ``GET /v1/keys/{keyId}`` returns it (camelCase names)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


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
