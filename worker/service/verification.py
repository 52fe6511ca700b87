"""Registration and assertion against the store: challenges, keys, counters and verdicts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from worker.contract import (
    AssertionRequest,
    Extensions,
    Kind,
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
    VerifiedAttestation,
    client_data_hash,
    verify_assertion,
    verify_attestation,
)
from worker.service.plugin import DecodedRequest, decode_plugin_fields
from worker.store import challenges, keys, verdicts
from worker.store.challenges import Purpose


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


def _rejection(kind: Kind, request: PluginRequest, exc: Rejected) -> VerificationResult:
    return VerificationResult.rejection(
        kind=kind, key_id=request.key_id, reason=exc.reason, detail=exc.detail
    )


def _assertion_challenge(request: AssertionRequest) -> str:
    """The challenge an assertion uses: the payload itself, or one the payload embeds."""
    if request.challenge is None:
        return request.payload
    if request.challenge not in request.payload:
        raise Rejected(Reason.INVALID_REQUEST, "payload does not contain the given challenge")
    return request.challenge


@dataclass
class _Pending:
    """What a job will do in its one transaction, decided before the transaction starts."""

    result: VerificationResult
    attestation: VerifiedAttestation | None = None
    decoded: DecodedRequest | None = None
    new_counter: int | None = None


class VerificationService:
    """Verifies plugin requests and keeps keys, counters, challenges and verdicts in the store.

    Takes the policy, a session factory, the process's intermediate cache and a clock. With
    ``issued_challenges=True`` (the service) a challenge must be one the producer issued,
    unused and unexpired, and it is consumed in the transaction that records the verdict; with
    False (offline batches) the challenge is taken as given. With a ``job_id`` the verdict is
    recorded, and a job that was decided before returns its first verdict unchanged.

    Every verdict is a ``VerificationResult``, rejections included. Infrastructure errors (a
    database that is down) propagate, so that the adapter can retry or report them.
    """

    def __init__(
        self,
        *,
        policy: Policy,
        sessions: sessionmaker[Session],
        cache: IntermediateCache | None = None,
        clock: Callable[[], datetime] = utc_now,
        issued_challenges: bool = False,
    ) -> None:
        self.policy = policy
        self.sessions = sessions
        self.cache = cache if cache is not None else IntermediateCache()
        self.clock = clock
        self.issued_challenges = issued_challenges

    def handle(
        self, request: PluginRequest, *, now: datetime | None = None, job_id: str | None = None
    ) -> VerificationResult:
        """Register or assert, by the request's type."""
        at = now or self.clock()
        if job_id is not None:
            with self.sessions() as session:
                recorded = verdicts.get_verdict(session, job_id)
            if recorded is not None:
                return VerificationResult.model_validate(recorded)
        if isinstance(request, RegistrationRequest):
            pending = self._prepare_registration(request, at)
            return self._commit_registration(request, pending, at, job_id)
        pending = self._prepare_assertion(request, at)
        return self._commit_assertion(request, pending, at, job_id)

    # Registration -------------------------------------------------------------------------

    def _prepare_registration(self, request: RegistrationRequest, at: datetime) -> _Pending:
        try:
            decoded = decode_plugin_fields(request)
            with self.sessions() as session:
                # Early refusals, before any signature work; the transaction decides again.
                if self.issued_challenges and (
                    problem := challenges.challenge_problem(
                        session,
                        challenge=request.challenge,
                        purpose=Purpose.REGISTRATION,
                        key_id=request.key_id,
                        now=at,
                    )
                ):
                    raise Rejected(problem, "the challenge cannot be used")
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
        except Rejected as exc:
            return _Pending(result=_rejection("registration", request, exc))
        result = VerificationResult(
            ok=True,
            kind="registration",
            keyId=request.key_id,
            appId=verified.app_id,
            environment=verified.environment,
            counter=0,
            extensions=_extensions(verified.extensions),
            verifiedAt=at,
        )
        return _Pending(result=result, attestation=verified, decoded=decoded)

    def _commit_registration(
        self, request: RegistrationRequest, pending: _Pending, at: datetime, job_id: str | None
    ) -> VerificationResult:
        with self.sessions() as session, session.begin():
            result = pending.result
            if self.issued_challenges:
                # Every attempt burns its challenge, accepted or not.
                problem = challenges.consume_challenge(
                    session,
                    challenge=request.challenge,
                    purpose=Purpose.REGISTRATION,
                    key_id=request.key_id,
                    job_id=job_id or "",
                    now=at,
                )
                if problem is not None and result.ok:
                    result = _rejection(
                        "registration", request, Rejected(problem, "the challenge was just used")
                    )
            verified, decoded = pending.attestation, pending.decoded
            if result.ok and verified is not None and decoded is not None:
                inserted = keys.insert_key(
                    session,
                    key_id=request.key_id,
                    app_id=verified.app_id,
                    environment=verified.environment.value,
                    public_key=verified.public_key,
                    receipt=verified.receipt,
                    attestation=decoded.token,
                    client_data_hash=client_data_hash(request.challenge),
                    verified_at=at,
                    leaf_fingerprint=verified.leaf_fingerprint,
                    intermediate_fingerprint=verified.intermediate_fingerprint,
                )
                if not inserted:
                    result = _rejection(
                        "registration",
                        request,
                        Rejected(Reason.KEY_ALREADY_REGISTERED, "keyId is already registered"),
                    )
            return self._record(session, job_id, result, at)

    # Assertion ----------------------------------------------------------------------------

    def _prepare_assertion(self, request: AssertionRequest, at: datetime) -> _Pending:
        try:
            decoded = decode_plugin_fields(request)
            challenge = _assertion_challenge(request)
            with self.sessions() as session:
                if self.issued_challenges and (
                    problem := challenges.challenge_problem(
                        session,
                        challenge=challenge,
                        purpose=Purpose.ASSERTION,
                        key_id=request.key_id,
                        now=at,
                    )
                ):
                    raise Rejected(problem, "the challenge cannot be used")
                stored = keys.get_key(session, request.key_id)
            if stored is None:
                raise Rejected(Reason.KEY_UNKNOWN, "keyId is not registered")
            if stored.revoked_at is not None:
                raise Rejected(
                    Reason.KEY_REVOKED,
                    f"key was revoked ({stored.revoked_reason}) by run {stored.revoked_by_run}",
                )
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
        except Rejected as exc:
            return _Pending(result=_rejection("assertion", request, exc))
        result = VerificationResult(
            ok=True,
            kind="assertion",
            keyId=request.key_id,
            appId=stored.app_id,
            environment=environment,
            counter=verified.counter,
            extensions=_extensions(verified.extensions),
            verifiedAt=at,
        )
        return _Pending(result=result, new_counter=verified.counter)

    def _commit_assertion(
        self, request: AssertionRequest, pending: _Pending, at: datetime, job_id: str | None
    ) -> VerificationResult:
        with self.sessions() as session, session.begin():
            result = pending.result
            if self.issued_challenges and result.reason is not Reason.INVALID_REQUEST:
                problem = challenges.consume_challenge(
                    session,
                    challenge=_assertion_challenge(request),
                    purpose=Purpose.ASSERTION,
                    key_id=request.key_id,
                    job_id=job_id or "",
                    now=at,
                )
                if problem is not None and result.ok:
                    result = _rejection(
                        "assertion", request, Rejected(problem, "the challenge was just used")
                    )
            # The conditional update decides races between workers: only a counter above the
            # stored one at this moment is accepted.
            if (
                result.ok
                and pending.new_counter is not None
                and not keys.advance_counter(session, request.key_id, pending.new_counter)
            ):
                result = _rejection(
                    "assertion",
                    request,
                    Rejected(
                        Reason.COUNTER_REPLAY,
                        f"counter {pending.new_counter} was overtaken by a concurrent assertion",
                    ),
                )
            return self._record(session, job_id, result, at)

    # Verdicts -----------------------------------------------------------------------------

    def _record(
        self, session: Session, job_id: str | None, result: VerificationResult, at: datetime
    ) -> VerificationResult:
        """Record the verdict in the open transaction; a job decided before keeps its first."""
        if job_id is None:
            return result
        recorded = verdicts.record_verdict(
            session,
            job_id=job_id,
            kind=result.kind or "unknown",
            key_id=result.key_id,
            app_id=result.app_id,
            ok=result.ok,
            reason=result.reason.value if result.reason else None,
            result=result.to_json_dict(),
            decided_at=at,
        )
        if recorded:
            return result
        session.rollback()
        first = verdicts.get_verdict(session, job_id)
        if first is None:  # pragma: no cover - the conflicting row cannot vanish
            raise RuntimeError(f"verdict of job {job_id} conflicted but is missing")
        return VerificationResult.model_validate(first)
