"""Keeping each key's risk metric current: trade its receipt at Apple, verify, store.

``ReceiptRefresher.refresh_batch`` takes a batch of key ids and decides each one: skip it when
revoked or unknown, exchange its current receipt at Apple's fraud-metric service (under the
rate limit shared by all workers), verify the receipt Apple returned, and record the outcome,
the new receipt, its dates, the risk metric and its history, and when the key is due again.
It does no queueing of its own: an adapter hands it batches and acts on ``RefreshBatch``
(``stopped`` ends the run, ``retry`` are keys to hand out again after ``backoff``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final, Protocol

from sqlalchemy.orm import Session, sessionmaker

from worker.core.attestation import parse_attestation_object
from worker.core.reasons import Rejected
from worker.core.receipt import ReceiptTrustStore
from worker.core.refreshed import RefreshRejected, verify_refreshed_receipt
from worker.service.apple import Exchange, ExchangeOutcome
from worker.service.apple_rate import RateLimit
from worker.store import receipts as store
from worker.store.receipts import STALE_OUTCOME, ReceiptUpdate, RefreshTarget

__all__ = [
    "DEFAULT_REFRESH_INTERVAL",
    "ReceiptRefresher",
    "RefreshBatch",
    "RefreshOutcome",
    "RefreshResult",
]

DEFAULT_REFRESH_INTERVAL: Final = timedelta(days=1)
# A refresh is scheduled at least this long before the receipt expires.
_EXPIRY_MARGIN: Final = timedelta(hours=1)
_RETRY_BASE: Final = timedelta(minutes=5)
_RETRY_MAX: Final = timedelta(hours=6)


class Exchanger(Protocol):
    """Trades a receipt at Apple (``worker.service.apple.ReceiptExchange``)."""

    def exchange(self, receipt: bytes, environment: str) -> Exchange: ...  # pragma: no cover


class RefreshOutcome(StrEnum):
    """What refreshing one key came to; stored as the key's last outcome and reported."""

    REFRESHED = "refreshed"
    TOO_EARLY = "too_early"
    BAD_REQUEST = "bad_request"
    RECEIPT_STALE = STALE_OUTCOME
    RETRY_LATER = "retry_later"
    RECEIPT_REJECTED = "receipt_rejected"
    UNAUTHORIZED = "unauthorized"
    REVOKED = "revoked"
    KEY_UNKNOWN = "key_unknown"


@dataclass(frozen=True)
class RefreshResult:
    """One key's outcome; ``reason`` names the failed check of a rejected receipt."""

    key_id: str
    outcome: RefreshOutcome
    detail: str | None = None
    reason: str | None = None
    risk_metric: int | None = None
    next_refresh_at: datetime | None = None


@dataclass(frozen=True)
class RefreshBatch:
    """A decided batch. ``stopped`` is set when Apple refused the token (401): a configuration
    error, so the run must stop; ``untried`` keys were not exchanged then. ``backoff`` is the
    seconds to wait before the ``retry_later`` keys are handed out again (429 or 5xx)."""

    results: tuple[RefreshResult, ...]
    stopped: bool = False
    untried: tuple[str, ...] = ()
    backoff: float | None = None
    retry: tuple[str, ...] = field(default=())


class SavedHook(Protocol):
    """Called in the transaction that stores a batch's outcomes (see ``refresh_batch``)."""

    def __call__(
        self, session: Session, results: Sequence[RefreshResult], stopped: bool
    ) -> None: ...  # pragma: no cover


class ClaimHook(Protocol):
    """Called first in the transaction that stores a batch's outcomes: which of these keys
    this batch may store (the others were stored by another delivery meanwhile)."""

    def __call__(
        self, session: Session, key_ids: Sequence[str]
    ) -> set[str]: ...  # pragma: no cover


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ReceiptRefresher:
    """Refreshes the receipts of batches of keys; see the module docstring.

    Takes the session factory, the exchange client, the receipt trust store, the shared rate
    limit, the refresh interval (daily by default), a clock and a random source for jitter.
    Database errors propagate (the adapter retries the batch; a key is decided again, which
    only costs one more exchange).
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        exchange: Exchanger,
        trust: ReceiptTrustStore,
        limit: RateLimit,
        interval: timedelta = DEFAULT_REFRESH_INTERVAL,
        clock: Callable[[], datetime] = _utc_now,
        rng: random.Random | None = None,
    ) -> None:
        if interval <= timedelta(0):
            raise ValueError("the refresh interval must be positive")
        self.sessions = sessions
        self.exchange = exchange
        self.trust = trust
        self.limit = limit
        self.interval = interval
        self.clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def refresh_batch(
        self,
        key_ids: Sequence[str],
        *,
        on_saved: SavedHook | None = None,
        claim: ClaimHook | None = None,
    ) -> RefreshBatch:
        """Decide every key of the batch (see the class docstring) and store the outcomes.

        ``on_saved(session, results, stopped)`` runs in the transaction that stores them (a
        run records its rows there, so both are stored or neither). ``claim(session, keys)``
        runs first in it and names the keys whose outcomes may be stored: the outcomes of the
        others are left out of what is stored, of ``on_saved``'s results and of the batch's
        results (another delivery decided them)."""
        with self.sessions() as session:
            targets = store.get_refresh_targets(session, key_ids)
        results: list[RefreshResult] = []
        updates: list[ReceiptUpdate] = []
        untried: list[str] = []
        stopped = False
        backoff: float | None = None
        for key_id in dict.fromkeys(key_ids):
            target = targets.get(key_id)
            if stopped:
                untried.append(key_id)
                continue
            if target is None:
                results.append(RefreshResult(key_id, RefreshOutcome.KEY_UNKNOWN))
                continue
            if target.revoked:
                results.append(RefreshResult(key_id, RefreshOutcome.REVOKED))
                continue
            if target.outcome == STALE_OUTCOME:
                results.append(RefreshResult(key_id, RefreshOutcome.RECEIPT_STALE))
                continue
            if backoff is not None:
                # Apple asked us to slow down: the rest of the batch waits too.
                update = self._retry(target, backoff, "not tried: Apple asked to slow down")
            else:
                self.limit.wait()
                answer = self.exchange.exchange(target.receipt, target.environment)
                if answer.outcome is ExchangeOutcome.UNAUTHORIZED:
                    stopped = True
                    results.append(
                        RefreshResult(key_id, RefreshOutcome.UNAUTHORIZED, detail=answer.detail)
                    )
                    continue
                if answer.outcome is ExchangeOutcome.RETRY_LATER:
                    backoff = self._backoff_seconds(answer.retry_after)
                    update = self._retry(target, backoff, answer.detail)
                else:
                    update = self._decide(target, answer)
            updates.append(update)
            results.append(self._result(update))
        if updates or on_saved is not None:
            at = self.clock()
            with self.sessions() as session, session.begin():
                if claim is not None:
                    mine = claim(session, [r.key_id for r in results])
                    updates = [u for u in updates if u.key_id in mine]
                    results = [r for r in results if r.key_id in mine]
                store.save_refreshes(session, updates, targets, at)
                if on_saved is not None:
                    on_saved(session, results, stopped)
        return RefreshBatch(
            results=tuple(results),
            stopped=stopped,
            untried=tuple(untried),
            backoff=backoff,
            retry=tuple(r.key_id for r in results if r.outcome is RefreshOutcome.RETRY_LATER),
        )

    # One key ---------------------------------------------------------------------------------

    def _decide(self, target: RefreshTarget, answer: Exchange) -> ReceiptUpdate:
        now = self.clock()
        outcome = answer.outcome
        if outcome is ExchangeOutcome.TOO_EARLY:
            # Apple answers 304 before the receipt's not-before: try right after it.
            due = target.not_before if target.not_before and target.not_before > now else None
            return ReceiptUpdate(
                target.key_id,
                RefreshOutcome.TOO_EARLY,
                answer.detail,
                due or now + self._jittered(_RETRY_BASE * 12),
            )
        if outcome is ExchangeOutcome.BAD_REQUEST:
            return ReceiptUpdate(
                target.key_id, RefreshOutcome.BAD_REQUEST, answer.detail, now + self.interval
            )
        if outcome is ExchangeOutcome.NO_DATA:
            return ReceiptUpdate(target.key_id, RefreshOutcome.RECEIPT_STALE, answer.detail, None)
        assert outcome is ExchangeOutcome.REFRESHED and answer.receipt is not None
        return self._verify(target, answer.receipt, now)

    def _verify(self, target: RefreshTarget, raw: bytes, now: datetime) -> ReceiptUpdate:
        try:
            credential = parse_attestation_object(target.attestation).x5c[0]
        except (Rejected, IndexError) as exc:
            return ReceiptUpdate(
                target.key_id,
                RefreshOutcome.RECEIPT_REJECTED,
                f"stored_attestation_unreadable: {exc}",
                now + self.interval,
            )
        try:
            receipt = verify_refreshed_receipt(
                receipt=raw,
                trust=self.trust,
                now=now,
                app_ids=frozenset({target.app_id}),
                credential_certificate=credential,
                stored_created_at=target.created_at,
            )
        except RefreshRejected as exc:
            # Never stored; the stored receipt is still the one to send next time.
            return ReceiptUpdate(
                target.key_id,
                RefreshOutcome.RECEIPT_REJECTED,
                f"{exc.reason}: {exc.detail}",
                now + self._jittered(_RETRY_BASE * 12),
            )
        return ReceiptUpdate(
            target.key_id,
            RefreshOutcome.REFRESHED,
            None,
            self._schedule(now, receipt.not_before, receipt.expiration_time),
            receipt=raw,
            receipt_type=receipt.receipt_type,
            created_at=receipt.creation_time,
            not_before=receipt.not_before,
            expires_at=receipt.expiration_time,
            risk_metric=receipt.risk_metric,
        )

    def _schedule(
        self, now: datetime, not_before: datetime | None, expires_at: datetime
    ) -> datetime:
        """Daily by default, never before not-before, always before expiration."""
        due = now + self.interval
        if not_before is not None and due < not_before:
            due = not_before
        latest = expires_at - _EXPIRY_MARGIN
        if due > latest:
            due = max(latest, not_before or now)
        return due

    def _retry(self, target: RefreshTarget, backoff: float, detail: str) -> ReceiptUpdate:
        return ReceiptUpdate(
            target.key_id,
            RefreshOutcome.RETRY_LATER,
            detail,
            self.clock() + timedelta(seconds=backoff),
        )

    def _backoff_seconds(self, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after + self._rng.uniform(0, 1)
        return self._jittered(_RETRY_BASE).total_seconds()

    def _jittered(self, base: timedelta) -> timedelta:
        return min(base * self._rng.uniform(0.5, 1.5), _RETRY_MAX)

    @staticmethod
    def _result(update: ReceiptUpdate) -> RefreshResult:
        outcome = RefreshOutcome(update.outcome)
        reason = None
        if outcome is RefreshOutcome.RECEIPT_REJECTED and update.detail:
            reason = update.detail.split(":", 1)[0]
        return RefreshResult(
            key_id=update.key_id,
            outcome=outcome,
            detail=update.detail,
            reason=reason,
            risk_metric=update.risk_metric,
            next_refresh_at=update.next_refresh_at,
        )
