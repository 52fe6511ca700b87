"""``GET /v1/keys/{keyId}``: what the service knows about one registered key.

Any valid API key of the service may read any key's state: keys are not owned by the API key
that registered them (an app's backend shares its keys across its API keys), and the state
holds nothing secret (no public key, receipt or attestation), only facts a backend needs to
judge the device. An unknown keyId is 404 ``not_found``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from producer.errors import ApiError, ErrorCode
from worker.store.receipts import KeyState, get_key_state


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

    @classmethod
    def of(cls, state: KeyState) -> KeyStateResponse:
        """The response for a stored key state."""
        return cls(
            keyId=state.key_id,
            appId=state.app_id,
            environment=state.environment,
            registeredAt=state.registered_at,
            counter=state.counter,
            revoked=state.revoked_at is not None,
            revokedAt=state.revoked_at,
            revokedReason=state.revoked_reason,
            receiptType=state.receipt_type,
            receiptCreatedAt=state.receipt_created_at,
            receiptNotBefore=state.receipt_not_before,
            receiptExpiresAt=state.receipt_expires_at,
            riskMetric=state.risk_metric,
            riskMetricAt=state.risk_metric_at,
            refreshedAt=state.refreshed_at,
            refreshOutcome=state.refresh_outcome,
            nextRefreshAt=state.next_refresh_at,
            history=[RiskReading(riskMetric=m, measuredAt=at) for at, m in state.history],
        )


KeyIdPath = Annotated[str, Path(alias="keyId", min_length=1, max_length=128)]


def read_key_state(sessions: sessionmaker[Session], key_id: str) -> KeyStateResponse:
    """The key's state; ``ApiError(404, not_found)`` for a key that is not registered."""
    with sessions() as session:
        state = get_key_state(session, key_id)
    if state is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, "no key with this keyId is registered")
    return KeyStateResponse.of(state)


async def read_key_state_async(sessions: sessionmaker[Session], key_id: str) -> KeyStateResponse:
    """``read_key_state`` off the event loop."""
    return await run_in_threadpool(read_key_state, sessions, key_id)
