"""Registration and assertion against the key store."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from worker.contract import (
    AssertionRequest,
    Extensions,
    PluginRequest,
    RegistrationRequest,
    VerificationResult,
)
from worker.core import (
    AuthDataExtensions,
    Environment,
    IntermediateCache,
    Policy,
    Reason,
    Rejected,
    client_data_hash,
    verify_assertion,
    verify_attestation,
)
from worker.service.plugin import decode_plugin_fields
from worker.store import keys


def utc_now() -> datetime:
    """The wall clock, in UTC. The only place the service reads it."""
    return datetime.now(UTC)


def _extensions(ext: AuthDataExtensions | None) -> Extensions | None:
    if ext is None:
        return None
    other = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in ext.other.items()}
    return Extensions(
        validationCategory=ext.validation_category, bundleVersion=ext.bundle_version, other=other
    )


class VerificationService:
    """Verifies plugin requests and keeps device keys and counters in the store.

    Takes the policy, a session factory, the process's intermediate cache and a clock. Methods
    return a ``VerificationResult`` for every verdict, rejections included; infrastructure
    errors (a database that is down) propagate so that the adapter can retry or report them.
    """

    def __init__(
        self,
        *,
        policy: Policy,
        sessions: sessionmaker[Session],
        cache: IntermediateCache | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.policy = policy
        self.sessions = sessions
        self.cache = cache if cache is not None else IntermediateCache()
        self.clock = clock

    def handle(self, request: PluginRequest, *, now: datetime | None = None) -> VerificationResult:
        """Register or assert, by the request's type."""
        if isinstance(request, RegistrationRequest):
            return self.register(request, now=now)
        return self.assert_payload(request, now=now)

    def register(
        self, request: RegistrationRequest, *, now: datetime | None = None
    ) -> VerificationResult:
        """Verify an attestation of ``SHA256(challenge)`` and store the new key.

        The challenge is taken as given: checking that it was issued is the caller's job.
        """
        at = now or self.clock()
        try:
            decoded = decode_plugin_fields(request)
            with self.sessions() as session:
                # Cheap refusal before any signature work; the insert below is what decides.
                if keys.key_exists(session, request.key_id):
                    raise Rejected(Reason.KEY_ALREADY_REGISTERED, "keyId is already registered")
            verified = verify_attestation(
                attestation_object=decoded.token,
                key_id=decoded.key_id,
                client_data_hash=client_data_hash(request.challenge),
                policy=self.policy,
                now=at,
                cache=self.cache,
            )
            with self.sessions() as session, session.begin():
                keys.insert_key(
                    session,
                    key_id=request.key_id,
                    app_id=verified.app_id,
                    environment=verified.environment.value,
                    public_key=verified.public_key,
                    receipt=verified.receipt,
                    attestation=decoded.token,
                    verified_at=at,
                    leaf_fingerprint=verified.leaf_fingerprint,
                    intermediate_fingerprint=verified.intermediate_fingerprint,
                )
        except keys.KeyAlreadyRegistered:
            return VerificationResult.rejection(
                kind="registration",
                key_id=request.key_id,
                reason=Reason.KEY_ALREADY_REGISTERED,
                detail="keyId is already registered",
            )
        except Rejected as exc:
            return VerificationResult.rejection(
                kind="registration", key_id=request.key_id, reason=exc.reason, detail=exc.detail
            )
        return VerificationResult(
            ok=True,
            kind="registration",
            keyId=request.key_id,
            appId=verified.app_id,
            environment=verified.environment,
            counter=0,
            extensions=_extensions(verified.extensions),
            verifiedAt=at,
        )

    def assert_payload(
        self, request: AssertionRequest, *, now: datetime | None = None
    ) -> VerificationResult:
        """Verify an assertion over ``SHA256(payload)`` and advance the key's counter."""
        at = now or self.clock()
        try:
            decoded = decode_plugin_fields(request)
            with self.sessions() as session, session.begin():
                stored = keys.get_key(session, request.key_id)
                if stored is None:
                    raise Rejected(Reason.KEY_UNKNOWN, "keyId is not registered")
                app = self.policy.app(stored.app_id)
                if app is None:
                    raise Rejected(Reason.APP_ID_MISMATCH, f"{stored.app_id} is not configured")
                environment = Environment(stored.environment)
                if not app.allows(environment):
                    raise Rejected(
                        Reason.ENVIRONMENT_MISMATCH,
                        f"{app.app_id} no longer accepts {environment} keys",
                    )
                verified = verify_assertion(
                    assertion_object=decoded.token,
                    client_data_hash=client_data_hash(request.payload),
                    public_key=stored.public_key,
                    app_id=stored.app_id,
                    previous_counter=stored.counter,
                )
                # The conditional update decides races between workers: only a counter above
                # the stored one at this moment is accepted.
                if not keys.advance_counter(session, request.key_id, verified.counter):
                    raise Rejected(
                        Reason.COUNTER_REPLAY,
                        f"counter {verified.counter} was overtaken by a concurrent assertion",
                    )
        except Rejected as exc:
            return VerificationResult.rejection(
                kind="assertion", key_id=request.key_id, reason=exc.reason, detail=exc.detail
            )
        return VerificationResult(
            ok=True,
            kind="assertion",
            keyId=request.key_id,
            appId=stored.app_id,
            environment=environment,
            counter=verified.counter,
            extensions=_extensions(verified.extensions),
            verifiedAt=at,
        )
