"""``GET /v1/keys/{keyId}``: what the service knows about one registered key.

A key's state is read only by the API key whose registration stored it, like a job is read
only by the API key that submitted it: for any other API key, as for a keyId never
registered, the answer is 404 ``not_found`` (one answer for both, so an API key learns nothing
of another's keys). The response models are in ``appattest_client.api``, which the Python
clients share.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from producer.errors import ApiError, ErrorCode
from producer.schemas import KEY_ID_PATTERN, KeyStateResponse, RiskReading
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


# A keyId as the plugin sends it: standard base64 (its "/" are part of the path). Anything else
# (a control character, which PostgreSQL cannot even compare) is 422 before the store is read.
KeyIdPath = Annotated[str, Path(alias="keyId", pattern=KEY_ID_PATTERN)]


def read_key_state(
    sessions: sessionmaker[Session], key_id: str, registered_by: str
) -> KeyStateResponse:
    """The key's state as the API key named ``registered_by`` may see it;
    ``ApiError(404, not_found)`` for a key that is not registered or that another API key
    registered."""
    with sessions() as session:
        state = get_key_state(session, key_id, registered_by=registered_by)
    if state is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, "no key with this keyId is registered")
    return key_state_response(state)


async def read_key_state_async(
    sessions: sessionmaker[Session], key_id: str, registered_by: str
) -> KeyStateResponse:
    """``read_key_state`` off the event loop."""
    return await run_in_threadpool(read_key_state, sessions, key_id, registered_by)
