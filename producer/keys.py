"""``GET /v1/keys/{keyId}``: what the service knows about one registered key.

Any valid API key of the service may read any key's state: keys are not owned by the API key
that registered them (an app's backend shares its keys across its API keys), and the state
holds nothing secret (no public key, receipt or attestation), only facts a backend needs to
judge the device. An unknown keyId is 404 ``not_found``. The response models are in
``producer.key_state``, which the Python clients share.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from producer.errors import ApiError, ErrorCode
from producer.key_state import KeyStateResponse, RiskReading
from worker.store.receipts import KeyState, get_key_state


def key_state_response(state: KeyState) -> KeyStateResponse:
    """The response for a stored key state."""
    return KeyStateResponse(
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
    return key_state_response(state)


async def read_key_state_async(sessions: sessionmaker[Session], key_id: str) -> KeyStateResponse:
    """``read_key_state`` off the event loop."""
    return await run_in_threadpool(read_key_state, sessions, key_id)
