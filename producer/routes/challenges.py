"""``POST /v1/challenges``: one-time challenges, stored hashed, single-use and TTL-bound."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from producer.deps import AUTH, REFUSALS, metrics_of, resources_of
from producer.schemas import ChallengeRequest, IssuedChallenge
from worker.store.challenges import Purpose

router = APIRouter(prefix="/v1", tags=["challenges"])


@router.post(
    "/challenges",
    summary="Issue a one-time challenge",
    status_code=201,
    response_model=IssuedChallenge,
    responses=REFUSALS,
    dependencies=AUTH,
)
async def create_challenge(request: Request, body: ChallengeRequest) -> Response:
    """A fresh challenge for one registration or assertion, valid for the configured TTL;
    with ``keyId``, only that key may use it."""
    # Stored together with the challenges that other requests ask for at the same time (see
    # producer.issuer), and answered once its row is committed.
    issued = await resources_of(request).challenges.issue(
        purpose=Purpose(body.purpose), key_id=body.key_id
    )
    metrics_of(request).challenges_issued.labels(body.purpose).inc()
    answer = IssuedChallenge(
        challenge=issued.challenge,
        expiresAt=issued.expires_at,
        purpose=body.purpose,
        keyId=body.key_id,
    )
    # The answer as FastAPI would write it from response_model (which stays for OpenAPI),
    # without validating the model a second time on the way out.
    return Response(answer.model_dump_json(by_alias=True), 201, media_type="application/json")
