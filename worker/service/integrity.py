"""Android jobs (Google Play Integrity) against the store: challenges and verdicts.

An Android job has no device key and no counter: its token is an encrypted Play Integrity
token that Google decodes. A batch is decided in three steps. First the reads: verdicts
recorded before, and the issued challenges, so that a request whose challenge is unknown, used
or expired is refused without spending Google's quota. Then Google decodes the remaining
tokens, outside any transaction (concurrently when an executor is given), and the pure core
judges each payload. Last, one transaction consumes the challenges and records the verdicts.

A challenge is consumed by a job whose token Google decoded and whose request hash is that of
the challenge (or payload): such a token was made for this challenge, so its verdict is final
whether the device passed or not. A token Google refuses, one bound to another hash, or one
Google could not be asked about leaves the challenge for the genuine request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from worker.contract import (
    FORMAT_PLAY_INTEGRITY,
    PLATFORM_ANDROID,
    AssertionRequest,
    IntegrityVerdict,
    Kind,
    PluginRequest,
    RegistrationRequest,
    VerificationResult,
)
from worker.core import Reason, Rejected
from worker.core.integrity import (
    AndroidApp,
    AndroidPolicy,
    GoogleUnavailable,
    TokenRefused,
    VerifiedIntegrity,
    parse_payload,
    request_hash,
    verify_integrity,
)
from worker.service.verification import utc_now
from worker.store import bulk
from worker.store.bulk import IssuedChallenge
from worker.store.challenges import Purpose, challenge_digest

# A batch whose verdicts conflict with a concurrent delivery of the same jobs records the rest
# again; more rounds than this would mean a bug.
_ATTEMPTS = 3


class TokenDecoder(Protocol):
    """What the service needs of Google: ``PlayIntegrityClient`` or a test's stand-in."""

    def decode(self, *, package_name: str, token: str) -> dict[str, Any]: ...


@dataclass
class _Job:
    job_id: str | None
    request: PluginRequest | None
    submitted_by: str | None
    result: VerificationResult | None = None
    recorded: bool = False
    app: AndroidApp | None = None
    digest: bytes | None = None
    expected_hash: str = ""
    claimable: bool = False

    @property
    def kind(self) -> Kind:
        return "registration" if isinstance(self.request, RegistrationRequest) else "assertion"

    @property
    def key_id(self) -> str:
        assert self.request is not None
        return self.request.key_id

    def reject(self, reason: Reason, detail: str) -> None:
        self.result = VerificationResult.rejection(
            kind=self.kind,
            key_id=self.key_id,
            reason=reason,
            detail=detail,
            platform=PLATFORM_ANDROID,
        )


def _signed_text(request: PluginRequest) -> tuple[str, str]:
    """(the text the app hashed into requestHash, the challenge it carries)."""
    if isinstance(request, RegistrationRequest):
        return request.challenge, request.challenge
    assert isinstance(request, AssertionRequest)
    if request.challenge is None:
        return request.payload, request.payload
    if request.challenge not in request.payload:
        raise Rejected(Reason.INVALID_REQUEST, "payload does not contain the given challenge")
    return request.payload, request.challenge


def _verdict(verified: VerifiedIntegrity) -> IntegrityVerdict:
    return IntegrityVerdict(
        appRecognition=verified.app_recognition,
        versionCode=verified.version_code,
        deviceLabels=list(verified.device_labels),
        recentDeviceActivity=verified.recent_device_activity,
        licensing=verified.licensing,
        playProtect=verified.play_protect,
        requestedAt=verified.requested_at,
    )


class IntegrityService:
    """Decides Android jobs: Google decodes the token, the core judges it, the store keeps the
    challenge and the verdict.

    Takes the Android policy, the decoder (Google), a session factory and a clock; with
    ``issued_challenges=True`` (the service) a request's challenge must be one the producer
    issued, unused and unexpired. ``executor`` (a thread pool, say) runs a batch's calls to
    Google concurrently; without one they run one after another.

    Every verdict is a ``VerificationResult`` with ``platform: android``. Google unreachable
    or over quota after the client's retries is an ``internal_error`` verdict that leaves the
    challenge unused. Database errors propagate, for the adapter to retry.
    """

    def __init__(
        self,
        *,
        policy: AndroidPolicy,
        decoder: TokenDecoder,
        sessions: sessionmaker[Session],
        clock: Callable[[], datetime] = utc_now,
        issued_challenges: bool = True,
        executor: Executor | None = None,
    ) -> None:
        self.policy = policy
        self.decoder = decoder
        self.sessions = sessions
        self.clock = clock
        self.issued_challenges = issued_challenges
        self.executor = executor

    def handle(
        self, request: PluginRequest, *, now: datetime | None = None, job_id: str | None = None
    ) -> VerificationResult:
        """Decide one Android request."""
        return self.handle_batch([(job_id, request)], now=now)[0]

    def handle_batch(
        self,
        items: Sequence[tuple[str | None, PluginRequest | VerificationResult]],
        *,
        now: datetime | None = None,
        submitted_by: Sequence[str | None] | None = None,
    ) -> list[VerificationResult]:
        """Decide a batch of Android jobs, given as (job id or None, request); return the
        verdicts in the same order. As in ``VerificationService.handle_batch``, an item may
        already be a verdict (only recorded), ``submitted_by`` names each item's submitter,
        and a job decided before returns its first verdict."""
        at = now or self.clock()
        owners = list(submitted_by) if submitted_by is not None else [None] * len(items)
        if len(owners) != len(items):
            raise ValueError("submitted_by must name one submitter per item")
        jobs = [
            _Job(job_id, None, owner, result=item)
            if isinstance(item, VerificationResult)
            else _Job(job_id, item, owner)
            for (job_id, item), owner in zip(items, owners, strict=True)
        ]
        challenges = self._read(jobs, at)
        undecided: list[_Job] = []
        for job in jobs:
            if job.result is None:
                self._check_challenge(job, challenges.get(job.digest or b""), at)
                if job.result is None:
                    undecided.append(job)
        decide: Callable[[_Job], None] = lambda job: self._judge(job, at)  # noqa: E731
        if self.executor is not None and len(undecided) > 1:
            list(self.executor.map(decide, undecided))
        else:
            for job in undecided:
                decide(job)
        for _ in range(_ATTEMPTS):
            if self._commit(jobs, at):
                return [job.result for job in jobs if job.result is not None]
        raise RuntimeError("verdicts of a batch kept conflicting with another delivery")

    # Before Google ---------------------------------------------------------------------------

    def _read(self, jobs: list[_Job], at: datetime) -> dict[bytes, IssuedChallenge]:
        with self.sessions() as session:
            recorded = bulk.get_verdicts(session, [j.job_id for j in jobs if j.job_id])
            for job in jobs:
                if job.job_id in recorded:
                    job.result = VerificationResult.model_validate(recorded[job.job_id])
                    job.recorded = True
                elif job.result is None:
                    self._prepare(job)
            if not self.issued_challenges:
                return {}
            digests = [j.digest for j in jobs if j.result is None and j.digest]
            return bulk.get_challenges(session, digests)

    def _prepare(self, job: _Job) -> None:
        request = job.request
        assert request is not None
        try:
            if request.platform != PLATFORM_ANDROID or request.format != FORMAT_PLAY_INTEGRITY:
                raise Rejected(
                    Reason.UNSUPPORTED_FORMAT,
                    f"platform {request.platform[:20]!r} with format {request.format[:40]!r} "
                    f"is not {PLATFORM_ANDROID} {FORMAT_PLAY_INTEGRITY}",
                )
            job.app = self.policy.app_for(request.package_name)
            signed, challenge = _signed_text(request)
        except Rejected as exc:
            job.reject(exc.reason, exc.detail)
            return
        job.expected_hash = request_hash(signed)
        job.digest = challenge_digest(challenge)

    def _check_challenge(self, job: _Job, row: IssuedChallenge | None, at: datetime) -> None:
        if not self.issued_challenges:
            return
        purpose = Purpose.REGISTRATION if job.kind == "registration" else Purpose.ASSERTION
        if row is None or row.purpose != purpose or row.key_id not in (None, job.key_id):
            job.reject(Reason.CHALLENGE_UNKNOWN, "the challenge was not issued for this")
        elif row.used_at is not None:
            job.reject(Reason.CHALLENGE_USED, "the challenge was used before")
        elif row.expires_at <= at:
            job.reject(Reason.CHALLENGE_EXPIRED, "the challenge expired")

    # Google and the core ---------------------------------------------------------------------

    def _judge(self, job: _Job, at: datetime) -> None:
        """Have Google decode the token and the core judge it; sets the job's result and
        whether it may consume its challenge."""
        assert job.request is not None and job.app is not None
        try:
            document = self.decoder.decode(
                package_name=job.app.package_name, token=job.request.token
            )
        except TokenRefused as exc:
            job.reject(Reason.INTEGRITY_TOKEN_INVALID, f"Google refused the token: {exc.detail}")
            return
        except GoogleUnavailable as exc:
            job.reject(Reason.INTERNAL_ERROR, f"the token could not be decoded: {exc}")
            return
        try:
            payload = parse_payload(document)
            # The token is bound to this request once its hash is ours; every later check
            # decides a verdict that spends the challenge.
            verified = verify_integrity(
                payload=payload, app=job.app, expected_request_hash=job.expected_hash, now=at
            )
        except Rejected as exc:
            job.claimable = exc.reason not in (
                Reason.INTEGRITY_TOKEN_INVALID,
                Reason.INTEGRITY_REQUEST_HASH_MISMATCH,
            )
            job.reject(exc.reason, exc.detail)
            return
        job.claimable = True
        job.result = VerificationResult(
            ok=True,
            kind=job.kind,
            keyId=job.key_id,
            appId=verified.package_name,
            platform=PLATFORM_ANDROID,
            integrity=_verdict(verified),
            verifiedAt=at,
        )

    # The transaction -------------------------------------------------------------------------

    def _commit(self, jobs: list[_Job], at: datetime) -> bool:
        """Consume the challenges and record the verdicts in one transaction. False when
        another delivery recorded a verdict first: those jobs then take the recorded verdict
        and the caller commits the rest again."""
        with self.sessions() as session, session.begin():
            self._consume_challenges(session, jobs, at)
            rows = [
                self._row(job, at)
                for job in jobs
                if job.job_id and not job.recorded and job.result is not None
            ]
            inserted = set(bulk.record_verdicts(session, rows))
            if len(inserted) == len(rows):
                return True
            session.rollback()
        with self.sessions() as session:
            missing = [r["job_id"] for r in rows if r["job_id"] not in inserted]
            recorded = bulk.get_verdicts(session, missing)
        for job in jobs:
            if job.job_id in recorded:
                job.result = VerificationResult.model_validate(recorded[job.job_id])
                job.recorded = True
        return False

    def _consume_challenges(self, session: Session, jobs: list[_Job], at: datetime) -> None:
        if not self.issued_challenges:
            return
        claims: dict[bytes, tuple[bulk.Claim, _Job]] = {}
        for job in jobs:
            if not job.claimable or job.recorded or job.digest is None:
                continue
            if job.digest in claims:
                if job.result is not None and job.result.ok:
                    job.reject(Reason.CHALLENGE_USED, "the challenge was used by another job")
                continue
            claim = bulk.Claim(job.digest, job.kind, job.key_id, job.job_id or "")
            claims[job.digest] = (claim, job)
        consumed = bulk.consume_challenges(session, [c for c, _ in claims.values()], at)
        for digest, (_, job) in claims.items():
            if digest not in consumed and job.result is not None and job.result.ok:
                job.reject(Reason.CHALLENGE_USED, "the challenge was used by a concurrent job")

    @staticmethod
    def _row(job: _Job, at: datetime) -> dict[str, Any]:
        result = job.result
        assert result is not None
        return {
            "job_id": job.job_id,
            "kind": result.kind or "unknown",
            "key_id": result.key_id,
            "app_id": result.app_id,
            "ok": result.ok,
            "reason": result.reason.value if result.reason else None,
            "result": result.to_json_dict(),
            "decided_at": at,
            "submitted_by": job.submitted_by,
        }
