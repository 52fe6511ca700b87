"""``POST /v1/challenges``: one-time challenges, stored hashed, single-use and TTL-bound."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request

from producer.deps import AUTH, REFUSALS, Resources, metrics_of
from producer.schemas import ChallengeRequest, IssuedChallenge
from worker.store.challenges import Purpose, issue_challenge

router = APIRouter(prefix="/v1", tags=["challenges"])


@router.post(
    "/challenges",
    summary="Issue a one-time challenge",
    status_code=201,
    response_model=IssuedChallenge,
    responses=REFUSALS,
    dependencies=AUTH,
)
def create_challenge(
    request: Request, body: ChallengeRequest, resources: Resources
) -> IssuedChallenge:
    """A fresh challenge for one registration or assertion, valid for the configured TTL;
    with ``keyId``, only that key may use it."""
    # A plain function: FastAPI runs it in a worker thread, so the database call blocks no one.
    with resources.sessions() as session, session.begin():
        challenge, expires_at = issue_challenge(
            session,
            purpose=Purpose(body.purpose),
            key_id=body.key_id,
            ttl=timedelta(seconds=resources.settings.challenge_ttl_seconds),
            now=datetime.now(UTC),
        )
    metrics_of(request).challenges_issued.labels(body.purpose).inc()
    return IssuedChallenge(
        challenge=challenge, expiresAt=expires_at, purpose=body.purpose, keyId=body.key_id
    )
