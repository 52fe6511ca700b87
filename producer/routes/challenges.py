"""``POST /v1/challenges``: one-time challenges, stored hashed, single-use and TTL-bound."""

from __future__ import annotations

from fastapi import APIRouter, Request

from producer.deps import AUTH, REFUSALS, Resources, metrics_of
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
async def create_challenge(
    request: Request, body: ChallengeRequest, resources: Resources
) -> IssuedChallenge:
    """A fresh challenge for one registration or assertion, valid for the configured TTL;
    with ``keyId``, only that key may use it."""
    # Stored with the challenges of the requests that arrive at the same time (see
    # producer.issuer); answered once its row is committed.
    issued = await resources.challenges.issue(purpose=Purpose(body.purpose), key_id=body.key_id)
    metrics_of(request).challenges_issued.labels(body.purpose).inc()
    return IssuedChallenge(
        challenge=issued.challenge,
        expiresAt=issued.expires_at,
        purpose=body.purpose,
        keyId=body.key_id,
    )
