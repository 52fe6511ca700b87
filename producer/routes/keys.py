"""The key route: ``GET /v1/keys/{keyId}``, a registered key's state (counter, revocation,
receipt dates, Apple's risk metric and its history), for the API key that registered it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from producer.deps import AUTH, Resources, caller_of, error_responses
from producer.keys import KeyIdPath, read_key_state_async
from producer.schemas import KeyStateResponse

router = APIRouter(prefix="/v1", tags=["keys"])


@router.get(
    "/keys/{keyId:path}",
    summary="A registered key's state: counter, revocation, receipt dates, risk metric",
    response_model=KeyStateResponse,
    responses=error_responses(401, 404, 422, 429, 500, 503),
    dependencies=AUTH,
)
async def get_key(request: Request, key_id: KeyIdPath, resources: Resources) -> KeyStateResponse:
    """A registered key's state, for the API key that registered it (404 ``not_found`` for
    any other, like a key never registered; see producer.keys)."""
    owner = caller_of(request).owner
    return await read_key_state_async(resources.sessions, key_id, owner.name)
