"""Registration and assertion against the store: challenges, keys, counters and verdicts.

Jobs are decided in batches (a single job is a batch of one): the reads of a batch are a few
set-at-a-time queries, the signature checks run outside any transaction, and everything a
batch changes (challenges consumed, keys inserted, counters advanced, verdicts recorded)
happens in one transaction whose conditional statements decide every race.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
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
from worker.core.assertion import load_public_key
from worker.core.receipt import parse_receipt
from worker.service.plugin import DecodedRequest, decode_plugin_fields
from worker.store import bulk
from worker.store import receipts as receipt_store
from worker.store.bulk import IssuedChallenge, StoredKey
from worker.store.challenges import Purpose, challenge_digest

# A batch whose verdicts conflict with a concurrent delivery of the same jobs is decided again;
# the second attempt finds the recorded verdicts. More attempts would mean a bug.
_ATTEMPTS = 3
# Batches of at most this many jobs keep their read transaction through the checks (about
# 0.5 ms of checks per registration): see ``_attempt``.
_READ_HELD_UP_TO = 4
# Lines decided in order in one transaction (``decide_in_order``): few enough that their key
# reads are one statement on any store (SQLite allows 32,766 parameters) and that a failed
# transaction repeats little.
ORDERED_CHUNK = 500
# Loaded public keys kept per service, by their stored point: about 2 KiB each (OpenSSL's key
# structures), so the default bound is about 100 MiB per worker process once that many
# distinct devices have asserted.
PUBLIC_KEY_CACHE_SIZE = 50_000


class ConcurrentChange(Exception):
    """Another writer changed a key that an in-order transaction read: nothing was written,
    and the lines are to be decided again one at a time."""


def utc_now() -> datetime:
    """The wall clock, in UTC. The only place the service reads it."""
    return datetime.now(UTC)


def receipt_state(key_id: str, receipt: bytes) -> dict[str, Any]:
    """The first receipt state of a newly registered key: its attestation receipt with the
    dates it carries, so that its first refresh can be scheduled. The receipt is parsed, not
    verified (registration does not gate on it); one that does not parse leaves the dates
    empty and the key due at once."""
    try:
        parsed = parse_receipt(receipt)
    except Rejected:
        return {"key_id": key_id, "receipt": receipt}
    return {
        "key_id": key_id,
        "receipt": receipt,
        "receipt_type": parsed.receipt_type,
        "created_at": parsed.creation_time,
        "not_before": parsed.not_before,
        "expires_at": parsed.expiration_time,
        "next_refresh_at": parsed.not_before,
    }


def _extensions(ext: AuthDataExtensions | None) -> Extensions | None:
    if ext is None:
        return None
    other = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in ext.other.items()}
    return Extensions(
        validationCategory=ext.validation_category, bundleVersion=ext.bundle_version, other=other
    )


def _assertion_challenge(request: AssertionRequest) -> str:
    """The challenge an assertion uses: the payload itself, or one the payload embeds."""
    if request.challenge is None:
        return request.payload
    if request.challenge not in request.payload:
        raise Rejected(Reason.INVALID_REQUEST, "payload does not contain the given challenge")
    return request.challenge


def _key_row(
    key_id: str,
    verified: VerifiedAttestation,
    token: bytes,
    challenge: str,
    at: datetime,
    registered_by: str | None = None,
) -> dict[str, Any]:
    """The ``device_keys`` row of a newly registered key (``registered_by``: the API key's
    name that submitted it, the only one that may read its state)."""
    return {
        "key_id": key_id,
        "app_id": verified.app_id,
        "environment": verified.environment.value,
        "public_key": verified.public_key,
        "counter": 0,
        "receipt": verified.receipt,
        "attestation": token,
        "client_data_hash": client_data_hash(challenge),
        "verified_at": at,
        "leaf_fingerprint": verified.leaf_fingerprint,
        "intermediate_fingerprint": verified.intermediate_fingerprint,
        "registered_by": registered_by,
    }


@dataclass
class _Job:
    """One job on its way through a batch."""

    job_id: str | None
    request: PluginRequest | None
    result: VerificationResult | None = None
    recorded: bool = False
    decoded: DecodedRequest | None = None
    digest: bytes | None = None
    claimable: bool = False
    attestation: VerifiedAttestation | None = None
    new_counter: int | None = None
    submitted_by: str | None = None
    request_id: str | None = None

    # The key's current risk metric and when it was measured (assertions).
    risk: tuple[int, datetime | None] | None = None

    @property
    def kind(self) -> Kind:
        return "registration" if isinstance(self.request, RegistrationRequest) else "assertion"

    @property
    def key_id(self) -> str:
        assert self.request is not None
        return self.request.key_id

    def reject(self, reason: Reason, detail: str) -> None:
        self.result = VerificationResult.rejection(
            kind=self.kind, key_id=self.key_id, reason=reason, detail=detail
        )

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.ok


class VerificationService:
    """Verifies plugin requests and keeps keys, counters, challenges and verdicts in the store.

    Takes the policy, a session factory, the process's intermediate cache and a clock. With
    ``issued_challenges=True`` (the service) a challenge must be one the producer issued,
    unused and unexpired, and it is consumed in the transaction that records the verdict; with
    False (offline batches) the challenge is taken as given. Jobs with an id have their verdict
    recorded, and a job decided before returns its first verdict unchanged.

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
        public_key_cache_size: int = PUBLIC_KEY_CACHE_SIZE,
        max_risk_metric: int | None = None,
    ) -> None:
        if public_key_cache_size < 0:
            raise ValueError("public_key_cache_size must not be negative")
        self.policy = policy
        self.sessions = sessions
        self.cache = cache if cache is not None else IntermediateCache()
        self.clock = clock
        self.issued_challenges = issued_challenges
        # Optional policy: assertions of a key whose risk metric is above it are refused.
        self.max_risk_metric = max_risk_metric
        self._public_key_cache_size = public_key_cache_size
        self._public_keys: OrderedDict[bytes, ec.EllipticCurvePublicKey] = OrderedDict()
        self._public_keys_lock = threading.Lock()
        # Counted for the workers' metrics (the cache's hits and misses since it was built).
        self.public_key_hits = 0
        self.public_key_misses = 0

    def _public_key(self, point: bytes) -> ec.EllipticCurvePublicKey:
        """The loaded form of a stored public key, from a bounded per-process cache: loading a
        point and its first use cost about a fifth of an assertion's signature check."""
        with self._public_keys_lock:
            key = self._public_keys.get(point)
            if key is not None:
                self._public_keys.move_to_end(point)
                self.public_key_hits += 1
                return key
            self.public_key_misses += 1
        key = load_public_key(point)
        with self._public_keys_lock:
            self._public_keys[point] = key
            while len(self._public_keys) > self._public_key_cache_size:
                self._public_keys.popitem(last=False)
        return key

    def handle(
        self, request: PluginRequest, *, now: datetime | None = None, job_id: str | None = None
    ) -> VerificationResult:
        """Register or assert, by the request's type."""
        return self.handle_batch([(job_id, request)], now=now)[0]

    def handle_batch(
        self,
        items: Sequence[tuple[str | None, PluginRequest | VerificationResult]],
        *,
        now: datetime | None = None,
        submitted_by: Sequence[str | None] | None = None,
        request_ids: Sequence[str | None] | None = None,
    ) -> list[VerificationResult]:
        """Decide a batch of jobs, given as (job id or None, request); return the verdicts in
        the same order. An item may already be a verdict (a body that failed the contract),
        which is then only recorded. ``submitted_by`` names, per item, who submitted it (an
        API key's name), recorded with the verdict; ``request_ids`` likewise names the HTTP
        request that submitted each (for log correlation)."""
        at = now or self.clock()
        owners = list(submitted_by) if submitted_by is not None else [None] * len(items)
        requests = list(request_ids) if request_ids is not None else [None] * len(items)
        if len(owners) != len(items) or len(requests) != len(items):
            raise ValueError("submitted_by and request_ids must name one per item")
        for _ in range(_ATTEMPTS):
            decided = self._attempt(items, owners, at, requests)
            if decided is not None:
                return decided
        raise RuntimeError("verdicts of a batch kept conflicting with another delivery")

    # In order, offline -----------------------------------------------------------------------

    def decide_in_order(
        self,
        items: Sequence[PluginRequest | VerificationResult],
        *,
        now: datetime | None = None,
    ) -> list[VerificationResult]:
        """Decide offline requests as if one after another, in one transaction: each sees the
        keys registered and the counters advanced by those before it, exactly as if each had
        been ``handle``d and committed in turn. An item may already be a verdict (a line that
        failed the contract), returned as it is. The clock is read once per request, as
        ``handle`` would.

        The keys are read in one statement, the checks run in order against what the earlier
        requests changed, then the new keys and the final counters are written in one
        transaction. Raises ``ConcurrentChange`` (nothing written) when another writer
        registered one of those keys or moved one of those counters meanwhile; any other error
        propagates with nothing written, so that the caller can decide the requests again one
        at a time. Only for a service that takes challenges as given, without job ids.
        """
        if self.issued_challenges:
            raise ValueError("decide_in_order takes challenges as given")
        jobs = [
            _Job(None, None, result=item)
            if isinstance(item, VerificationResult)
            else _Job(None, item)
            for item in items
        ]
        for job in jobs:
            if job.result is None:
                self._decode(job)
        wanted = [job.key_id for job in jobs if job.result is None]
        if not wanted:
            return [job.result for job in jobs if job.result is not None]
        with self.sessions() as session:
            stored = bulk.get_keys(session, wanted)
            risks = receipt_store.get_risk_metrics(session, wanted)
        for job in jobs:
            if job.result is None and isinstance(job.request, AssertionRequest):
                job.risk = risks.get(job.key_id)
        known: dict[str, StoredKey] = dict(stored)
        new_keys: dict[str, dict[str, Any]] = {}
        counters: dict[str, int] = {}
        for job in jobs:
            if job.result is not None:
                continue
            at = now or self.clock()
            self._check(job, {}, known, at)
            if not job.ok:
                continue
            if job.attestation is not None:
                known[job.key_id] = self._registered(job, at, new_keys)
            elif job.new_counter is not None:
                known[job.key_id] = dataclasses.replace(known[job.key_id], counter=job.new_counter)
                if job.key_id in new_keys:
                    new_keys[job.key_id]["counter"] = job.new_counter
                else:
                    counters[job.key_id] = job.new_counter
        with self.sessions() as session, session.begin():
            if len(bulk.insert_keys(session, list(new_keys.values()))) != len(new_keys):
                raise ConcurrentChange("a key was registered by another writer")
            receipt_store.insert_receipt_states(
                session, [receipt_state(k, row["receipt"]) for k, row in new_keys.items()]
            )
            if not bulk.advance_all_counters(session, list(counters.items())):
                raise ConcurrentChange("a counter was advanced by another writer")
        return [job.result for job in jobs if job.result is not None]

    def _registered(
        self, job: _Job, at: datetime, new_keys: dict[str, dict[str, Any]]
    ) -> StoredKey:
        """The row of a key a job registers (added to ``new_keys``) and its stored form."""
        verified, decoded, request = job.attestation, job.decoded, job.request
        assert verified and decoded and isinstance(request, RegistrationRequest)
        row = _key_row(job.key_id, verified, decoded.token, request.challenge, at, job.submitted_by)
        new_keys[job.key_id] = row
        return StoredKey(
            key_id=job.key_id,
            app_id=verified.app_id,
            environment=verified.environment.value,
            public_key=verified.public_key,
            counter=0,
            revoked_at=None,
            revoked_reason=None,
            revoked_by_run=None,
        )

    # One attempt ---------------------------------------------------------------------------

    def _attempt(
        self,
        items: Sequence[tuple[str | None, PluginRequest | VerificationResult]],
        owners: Sequence[str | None],
        at: datetime,
        request_ids: Sequence[str | None],
    ) -> list[VerificationResult] | None:
        jobs = [
            _Job(job_id, None, result=item, submitted_by=owner, request_id=request_id)
            if isinstance(item, VerificationResult)
            else _Job(job_id, item, submitted_by=owner, request_id=request_id)
            for (job_id, item), owner, request_id in zip(items, owners, request_ids, strict=True)
        ]
        # One session for the attempt: the reads, the checks, then the writes and the commit.
        # On PostgreSQL a small batch's reads and writes share one transaction (read
        # committed: the writes' conditional statements decide every race, as they would in
        # a transaction of their own), which saves a ROLLBACK and a BEGIN, what a batch of one
        # job mostly pays for; a larger batch's checks take long enough that its connection
        # must not sit idle in a transaction meanwhile (it would hold back a migration's
        # lock, or meet idle_in_transaction_session_timeout), so its read ends before them.
        # A SQLite read always ends before the checks: a snapshot held while checking would
        # make the write fail at once when another process wrote meanwhile.
        with self.sessions() as session:
            challenges, keys = self._read(session, jobs)
            if len(jobs) > _READ_HELD_UP_TO or not bulk.is_postgresql(session):
                session.rollback()
            for job in jobs:
                if job.result is None:
                    self._check(job, challenges, keys, at)
            self._consume_challenges(session, jobs, at)
            self._insert_keys(session, jobs, at)
            self._advance_counters(session, jobs)
            if not self._record(session, jobs, at):
                session.rollback()
                return None
            session.commit()
        return [job.result for job in jobs if job.result is not None]

    def _read(
        self, session: Session, jobs: list[_Job]
    ) -> tuple[dict[bytes, IssuedChallenge], dict[str, StoredKey]]:
        """Recorded verdicts, decoded fields, and the challenges and keys the batch needs, in
        one read (``bulk.read_batch``). Every open job is decoded first, so that the read can
        name its challenge and key; a job whose verdict is recorded (a redelivered batch) then
        takes that verdict, whatever its decoding said."""
        for job in jobs:
            if job.result is None:
                self._decode(job)
        open_jobs = [j for j in jobs if j.result is None]
        read = bulk.read_batch(
            session,
            [j.job_id for j in jobs if j.job_id],
            [j.digest for j in open_jobs if j.digest] if self.issued_challenges else [],
            [j.key_id for j in open_jobs],
        )
        for job in jobs:
            if job.job_id is not None and job.job_id in read.verdicts:
                job.result = VerificationResult.model_validate(read.verdicts[job.job_id])
                job.recorded = True
            elif job.result is None and job.kind == "assertion":
                job.risk = read.risks.get(job.key_id)
        return read.challenges, read.keys

    def _decode(self, job: _Job) -> None:
        request = job.request
        assert request is not None
        try:
            job.decoded = decode_plugin_fields(request)
            text = (
                request.challenge
                if isinstance(request, RegistrationRequest)
                else _assertion_challenge(request)
            )
        except Rejected as exc:
            job.reject(exc.reason, exc.detail)
            return
        if self.issued_challenges:
            job.digest = challenge_digest(text)

    def _check(
        self,
        job: _Job,
        challenges: dict[bytes, IssuedChallenge],
        keys: dict[str, StoredKey],
        at: datetime,
    ) -> None:
        """Everything that decides a job before the transaction: challenge, stored key and the
        signatures. Sets the job's result."""
        try:
            if self.issued_challenges:
                self._check_challenge(job, challenges.get(job.digest or b""), at)
            if isinstance(job.request, RegistrationRequest):
                self._check_registration(job, job.request, keys.get(job.key_id), at)
            else:
                assert isinstance(job.request, AssertionRequest)
                self._check_assertion(job, job.request, keys.get(job.key_id), at)
            # Only a job whose cryptographic checks passed may spend its challenge: a forgery
            # must not burn the challenge a genuine device is about to use.
            job.claimable = self.issued_challenges
        except Rejected as exc:
            job.reject(exc.reason, exc.detail)

    def _check_challenge(self, job: _Job, row: IssuedChallenge | None, at: datetime) -> None:
        purpose = Purpose.REGISTRATION if job.kind == "registration" else Purpose.ASSERTION
        if row is None or row.purpose != purpose or row.key_id not in (None, job.key_id):
            raise Rejected(Reason.CHALLENGE_UNKNOWN, "the challenge was not issued for this")
        if row.used_at is not None:
            raise Rejected(Reason.CHALLENGE_USED, "the challenge was used before")
        if row.expires_at <= at:
            raise Rejected(Reason.CHALLENGE_EXPIRED, "the challenge expired")

    def _check_registration(
        self, job: _Job, request: RegistrationRequest, stored: StoredKey | None, at: datetime
    ) -> None:
        if stored is not None:
            raise Rejected(Reason.KEY_ALREADY_REGISTERED, "keyId is already registered")
        assert job.decoded is not None
        verified = verify_attestation(
            attestation_object=job.decoded.token,
            key_id=job.decoded.key_id,
            client_data_hash=client_data_hash(request.challenge),
            policy=self.policy,
            now=at,
            cache=self.cache,
        )
        job.attestation = verified
        job.result = VerificationResult(
            ok=True,
            kind="registration",
            keyId=request.key_id,
            appId=verified.app_id,
            environment=verified.environment,
            counter=0,
            extensions=_extensions(verified.extensions),
            verifiedAt=at,
        )

    def _check_assertion(
        self, job: _Job, request: AssertionRequest, stored: StoredKey | None, at: datetime
    ) -> None:
        if stored is None:
            raise Rejected(Reason.KEY_UNKNOWN, "keyId is not registered")
        assert job.decoded is not None
        # The signature first: what the service knows of a key (revoked, its App ID's policy)
        # is told only to a caller who holds the key.
        verified = verify_assertion(
            assertion_object=job.decoded.token,
            client_data_hash=client_data_hash(request.payload),
            public_key=self._public_key(stored.public_key),
            app_id=stored.app_id,
            previous_counter=stored.counter,
        )
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
                Reason.ENVIRONMENT_MISMATCH, f"{app.app_id} no longer accepts {environment} keys"
            )
        # Last, the app's rules for the iOS 27 extensions, on every assertion on its own: an
        # assertion from an app version retired since its key registered is refused.
        app.extensions.check(verified.extensions)

        limit = self.max_risk_metric
        if limit is not None and job.risk is not None and job.risk[0] > limit:
            raise Rejected(
                Reason.RISK_METRIC_EXCEEDED, f"risk metric {job.risk[0]} is above {limit}"
            )
        job.new_counter = verified.counter
        job.result = VerificationResult(
            ok=True,
            kind="assertion",
            keyId=request.key_id,
            appId=stored.app_id,
            environment=environment,
            counter=verified.counter,
            extensions=_extensions(verified.extensions),
            verifiedAt=at,
            riskMetric=job.risk[0] if job.risk else None,
            riskMetricAt=job.risk[1] if job.risk else None,
        )

    # The transaction -----------------------------------------------------------------------

    def _consume_challenges(self, session: Session, jobs: list[_Job], at: datetime) -> None:
        """Burn the challenge of every job whose signatures verified; of several jobs
        presenting one challenge, the first in the batch claims it. A job refused before or by
        its cryptographic checks (a forgery, an unknown key) leaves its challenge unused."""
        claims: dict[bytes, tuple[bulk.Claim, _Job]] = {}
        late: list[_Job] = []
        for job in jobs:
            if not job.claimable or job.recorded or job.digest is None:
                continue
            if job.digest in claims:
                late.append(job)
                continue
            purpose = "registration" if job.kind == "registration" else "assertion"
            claim = bulk.Claim(job.digest, purpose, job.key_id, job.job_id or "")
            claims[job.digest] = (claim, job)
        consumed = bulk.consume_challenges(session, [c for c, _ in claims.values()], at)
        for digest, (_, job) in claims.items():
            if digest not in consumed and job.ok:
                job.reject(Reason.CHALLENGE_USED, "the challenge was used by a concurrent job")
        for job in late:
            if job.ok:
                job.reject(Reason.CHALLENGE_USED, "the challenge was used by another job")

    def _insert_keys(self, session: Session, jobs: list[_Job], at: datetime) -> None:
        first: dict[str, _Job] = {}
        for job in jobs:
            if job.recorded or not job.ok or job.attestation is None:
                continue
            if job.key_id in first:
                job.reject(Reason.KEY_ALREADY_REGISTERED, "keyId is registered by another job")
                continue
            first[job.key_id] = job
        rows: list[dict[str, Any]] = []
        for key_id, job in first.items():
            verified, decoded, request = job.attestation, job.decoded, job.request
            assert verified and decoded and isinstance(request, RegistrationRequest)
            rows.append(
                _key_row(key_id, verified, decoded.token, request.challenge, at, job.submitted_by)
            )
        inserted = bulk.insert_keys(session, rows)
        receipt_store.insert_receipt_states(
            session,
            [receipt_state(r["key_id"], r["receipt"]) for r in rows if r["key_id"] in inserted],
        )
        for key_id, job in first.items():
            if key_id not in inserted:
                job.reject(Reason.KEY_ALREADY_REGISTERED, "keyId is already registered")

    def _advance_counters(self, session: Session, jobs: list[_Job]) -> None:
        """Only a counter above the stored one at this moment is accepted: the conditional
        updates decide races between workers. Several assertions of one key in a batch go in
        batch order, one after another."""
        rounds: list[dict[str, _Job]] = []
        for job in jobs:
            if job.recorded or not job.ok or job.new_counter is None:
                continue
            for round_ in rounds:
                if job.key_id not in round_:
                    round_[job.key_id] = job
                    break
            else:
                rounds.append({job.key_id: job})
        for round_ in rounds:
            updates = [(key_id, job.new_counter or 0) for key_id, job in round_.items()]
            advanced = bulk.advance_counters(session, updates)
            for key_id, job in round_.items():
                if key_id not in advanced:
                    job.reject(
                        Reason.COUNTER_REPLAY,
                        f"counter {job.new_counter} is not above the stored counter",
                    )

    def _record(self, session: Session, jobs: list[_Job], at: datetime) -> bool:
        """Record the new verdicts; False when another delivery recorded one first."""
        rows = []
        for job in jobs:
            if job.job_id is None or job.recorded or job.result is None:
                continue
            result = job.result
            rows.append(
                {
                    "job_id": job.job_id,
                    "kind": result.kind or "unknown",
                    "key_id": result.key_id,
                    "app_id": result.app_id,
                    "ok": result.ok,
                    "reason": result.reason.value if result.reason else None,
                    "result": result.to_json_dict(),
                    "decided_at": at,
                    "submitted_by": job.submitted_by,
                    "request_id": job.request_id,
                }
            )
        return len(bulk.record_verdicts(session, rows)) == len(rows)
