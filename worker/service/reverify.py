"""Re-verification of stored registrations against today's policy, in resumable runs.

A run snapshots the keys it covers as ``pending`` rows when it starts; each batch decides its
keys and turns their rows to ``done`` with one conditional update, so a batch delivered twice,
or a run started again after an interruption, never counts a key twice. Every stored
attestation is verified again as of the instant it was first verified (credential certificates
live only days), against the run's trust root, apps, environment rules, distrust lists and
rules for the iOS 27 extensions (``worker.core.PolicySpec``).
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from worker.core import (
    IntermediateCache,
    Policy,
    PolicySpec,
    Reason,
    Rejected,
    verify_attestation,
)
from worker.service.verification import utc_now
from worker.store import bulk
from worker.store import reverify as runs
from worker.store.bulk import StoredRegistration
from worker.store.models import ReverifyResult
from worker.store.reverify import DONE, PENDING
from worker.store.reverify import RunFilters as RunFilters  # the CLI builds them


class RunMismatch(ValueError):
    """A run id was reused with another policy, other filters or another --apply choice."""


@dataclass(frozen=True)
class RunState:
    """How far a run has come."""

    run_id: str
    total: int
    done: int
    apply: bool

    @property
    def pending(self) -> int:
        return self.total - self.done


def start_run(
    session: Session,
    *,
    run_id: str,
    policy: PolicySpec,
    filters: RunFilters,
    apply: bool,
    now: datetime,
) -> RunState:
    """Create the run and its pending rows, or return the state of the run with this id.

    Raises ``RunMismatch`` when the id exists with other parameters: resuming must not quietly
    change what a run means.
    """
    existing = runs.get_run(session, run_id)
    policy = policy.normalized()
    if existing is not None:
        # Compared as specs, so that a run stored before a release added policy fields (which
        # it lacks, and which then take the defaults it ran with) resumes under the same policy.
        stored_policy = PolicySpec.from_json(existing.policy).normalized()
        if (stored_policy, existing.filters, existing.apply) != (
            policy,
            filters.to_json(),
            apply,
        ):
            raise RunMismatch(f"run {run_id} exists with another policy, filters or --apply")
        return run_state(session, run_id)
    runs.create_run(
        session, run_id=run_id, apply=apply, policy=policy.to_json(), filters=filters, now=now
    )
    return run_state(session, run_id)


def run_state(session: Session, run_id: str) -> RunState:
    """Counts of a run; raises ``KeyError`` for an unknown run."""
    run = runs.get_run(session, run_id)
    if run is None:
        raise KeyError(run_id)
    return RunState(
        run_id=run_id, total=run.total, done=runs.count_done(session, run_id), apply=run.apply
    )


def iter_pending_batches(
    sessions: sessionmaker[Session], run_id: str, batch_size: int
) -> Iterator[list[str]]:
    """All pending keys of a run, in batches, read page by page."""
    after = ""
    while True:
        with sessions() as session:
            batch = runs.pending_key_ids(session, run_id, after=after, limit=batch_size)
        if not batch:
            return
        yield batch
        after = batch[-1]


def results(session: Session, run_id: str) -> Iterator[ReverifyResult]:
    """Every decided result of a run, in key order."""
    return runs.decided_results(session, run_id)


@dataclass(frozen=True)
class _Outcome:
    key_id: str
    ok: bool
    reason: str | None
    detail: str | None
    app_id: str | None
    environment: str | None


@dataclass
class Reverifier:
    """Decides batches of a run's keys; one per process, holding the built policies."""

    sessions: sessionmaker[Session]
    cache: IntermediateCache = field(default_factory=IntermediateCache)
    clock: Callable[[], datetime] = utc_now
    _policies: OrderedDict[str, tuple[Policy, bool]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, session: Session, run_id: str) -> tuple[Policy, bool]:
        with self._lock:
            if run_id in self._policies:
                return self._policies[run_id]
        run = runs.get_run(session, run_id)
        if run is None:
            raise KeyError(f"unknown re-verification run {run_id}")
        built = (PolicySpec.from_json(run.policy).build(), run.apply)
        with self._lock:
            self._policies[run_id] = built
            while len(self._policies) > 16:
                self._policies.popitem(last=False)
        return built

    def _decide(self, key: StoredRegistration | None, key_id: str, policy: Policy) -> _Outcome:
        if key is None:
            return _Outcome(key_id, False, Reason.KEY_UNKNOWN, "key was deleted", None, None)
        if key.client_data_hash is None:
            return _Outcome(
                key_id,
                False,
                Reason.INTERNAL_ERROR,
                "no clientDataHash was stored for this key",
                key.app_id,
                key.environment,
            )
        try:
            verified = verify_attestation(
                attestation_object=key.attestation,
                key_id=base64.b64decode(key.key_id, validate=True),
                client_data_hash=key.client_data_hash,
                policy=policy,
                now=key.verified_at,
                cache=self.cache,
            )
        except Rejected as exc:
            return _Outcome(key_id, False, exc.reason, exc.detail, key.app_id, key.environment)
        return _Outcome(key_id, True, None, None, verified.app_id, verified.environment.value)

    def decide_batch(self, run_id: str, key_ids: Sequence[str]) -> int:
        """Decide these keys of the run; return how many were newly decided.

        Keys already decided (a redelivered batch, a resumed run) are skipped, and so are their
        revocation updates. With --apply, a key that fails is revoked and a revoked key that
        passes is restored, in the same transaction as its result.
        """
        with self.sessions() as session:
            policy, apply = self._run(session, run_id)
            keys = bulk.get_registrations(session, key_ids)
        outcomes = [self._decide(keys.get(k), k, policy) for k in key_ids]
        now = self.clock()
        rows = [
            {
                "key_id": o.key_id,
                "ok": o.ok,
                "reason": o.reason,
                "detail": (o.detail or "")[:500] or None,
                "app_id": o.app_id,
                "environment": o.environment,
            }
            for o in outcomes
        ]
        with self.sessions() as session, session.begin():
            finished = bulk.finish_reverify_results(
                session, run_id, rows, now, pending=PENDING, done=DONE
            )
            if apply:
                # Only keys decided now, and by a verdict: a key that could not be judged
                # (internal_error) is neither revoked nor restored.
                judged = [
                    o
                    for o in outcomes
                    if o.key_id in finished
                    and o.key_id in keys
                    and o.reason != Reason.INTERNAL_ERROR
                ]
                bulk.restore_keys(session, [o.key_id for o in judged if o.ok])
                bulk.revoke_keys(
                    session, [(o.key_id, o.reason) for o in judged if not o.ok], run_id, now
                )
        return len(finished)
