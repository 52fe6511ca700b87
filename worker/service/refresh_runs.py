"""Receipt refresh runs: which keys a run covers, and each batch's outcomes recorded in it.

A run (``appattest receipts refresh``) snapshots the keys it selects as ``pending`` rows when
it starts. A batch of the run (``RefreshRunner.decide``) exchanges only keys still pending,
and records their outcomes in the same transaction as their new receipt states, so a batch
delivered twice, or a run resumed after it was killed, never exchanges a decided key again.
Keys Apple asked to retry later (429, 5xx, network) stay pending and come back in the step's
``retry``; a refused token (401) stops the run: its remaining keys stay pending, to be resumed
once the configuration is fixed. The periodic refresh decides batches without a run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy.orm import Session, sessionmaker

from worker.service.receipts import ReceiptRefresher, RefreshOutcome, RefreshResult
from worker.service.verification import utc_now
from worker.store import receipts as receipt_store
from worker.store import refresh_runs as runs

__all__ = [
    "RefreshFilters",
    "RefreshRunner",
    "RunMismatch",
    "RunState",
    "RunStep",
    "select_keys",
    "start_run",
]

# Outcomes that leave a key pending in its run: it is tried again.
_NOT_FINAL: Final = frozenset({RefreshOutcome.RETRY_LATER, RefreshOutcome.UNAUTHORIZED})
_PAGE: Final = 5000
# The (run, key) pairs that batches of this process are exchanging now (see ``decide``).
_HOLDING: set[tuple[str, str]] = set()
_HOLDING_LOCK = threading.Lock()


class RunMismatch(ValueError):
    """A run id was reused with other filters."""


@dataclass(frozen=True)
class RefreshFilters:
    """Which keys a run selects: App IDs (empty: all), one environment, only due keys, at most
    ``limit`` keys. Revoked keys and keys Apple no longer holds data for are never selected."""

    app_ids: tuple[str, ...] = ()
    environment: str | None = None
    due_only: bool = False
    limit: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["app_ids"] = list(self.app_ids)
        return data


@dataclass(frozen=True)
class RunState:
    """How far a run has come, and why it stopped if it did."""

    run_id: str
    total: int
    done: int
    stopped_reason: str | None

    @property
    def pending(self) -> int:
        return self.total - self.done


def select_keys(session: Session, filters: RefreshFilters, now: datetime) -> list[str]:
    """The key ids ``filters`` select at ``now``, in key order."""
    selected: list[str] = []
    after = ""
    while filters.limit is None or len(selected) < filters.limit:
        page = _PAGE if filters.limit is None else min(_PAGE, filters.limit - len(selected))
        batch = receipt_store.due_key_ids(
            session,
            now=now,
            after=after,
            limit=page,
            app_ids=filters.app_ids,
            environment=filters.environment,
            due_only=filters.due_only,
        )
        selected.extend(batch)
        if len(batch) < page:
            break
        after = batch[-1]
    return selected


def run_state(session: Session, run_id: str) -> RunState:
    """Counts of a run; raises ``KeyError`` for an unknown run."""
    stored = runs.get_run(session, run_id)
    if stored is None:
        raise KeyError(run_id)
    total, done = runs.counts(session, run_id)
    return RunState(run_id, total, done, stored.stopped_reason)


def start_run(session: Session, *, run_id: str, filters: RefreshFilters, now: datetime) -> RunState:
    """Create the run and its pending rows, or return the state of the run with this id (a
    stopped run is let go on). Raises ``RunMismatch`` when the id exists with other filters."""
    existing = runs.get_run(session, run_id)
    if existing is not None:
        if existing.filters != filters.to_json():
            raise RunMismatch(f"run {run_id} exists with other filters")
        runs.clear_stop(session, run_id)
        return run_state(session, run_id)
    runs.create_run(
        session,
        run_id=run_id,
        filters=filters.to_json(),
        key_ids=select_keys(session, filters, now),
        now=now,
    )
    return run_state(session, run_id)


@dataclass(frozen=True)
class RunStep:
    """What one batch came to: how many keys it decided, the keys to try again after
    ``backoff`` seconds, and the stop reason when Apple refused the token."""

    decided: int
    retry: tuple[str, ...] = ()
    backoff: float | None = None
    stopped: str | None = None


def _row(result: RefreshResult) -> dict[str, Any]:
    return {
        "key_id": result.key_id,
        "outcome": result.outcome.value,
        "reason": result.reason,
        "detail": result.detail,
        "risk_metric": result.risk_metric,
    }


class RefreshRunner:
    """Decides batches of keys with a ``ReceiptRefresher``, inside a run or (``run_id`` None)
    for the periodic refresh; see the module docstring."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        refresher: ReceiptRefresher,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.sessions = sessions
        self.refresher = refresher
        self.clock = clock

    def decide(self, run_id: str | None, key_ids: Sequence[str]) -> RunStep:
        """Exchange these keys (those still pending, in a run) and record the outcomes.

        In a run, a key is exchanged only by the one batch of this process that holds it:
        two deliveries of it at once to the worker's threads (a batch the worker held when
        its run was resumed and sent again) would otherwise both find it pending and both
        exchange it. Each batch takes the keys no other batch holds, reads which of those
        are still pending, exchanges them, and lets them go once their outcomes are
        recorded; a key another batch holds is that batch's to decide. (Two worker processes
        given the same key at the same moment can still both exchange it; only the first to
        store its outcome finds its row pending, see ``claim``.)"""
        keys = list(dict.fromkeys(key_ids))
        if run_id is None:
            return self._decide(None, keys)
        with self._held(run_id, keys) as held:
            with self.sessions() as session:
                stored = runs.get_run(session, run_id)
                if stored is None:
                    raise KeyError(f"no refresh run {run_id}")
                if stored.stopped_reason is not None:
                    return RunStep(0, stopped=stored.stopped_reason)
                pending = runs.pending_keys(session, run_id, held)
            return self._decide(run_id, pending)

    @staticmethod
    @contextlib.contextmanager
    def _held(run_id: str, keys: list[str]) -> Iterator[list[str]]:
        """The keys of ``keys`` no other batch of this process is exchanging, held by this
        batch while the block runs (see ``decide``)."""
        with _HOLDING_LOCK:
            mine = [key for key in keys if (run_id, key) not in _HOLDING]
            _HOLDING.update((run_id, key) for key in mine)
        try:
            yield mine
        finally:
            with _HOLDING_LOCK:
                _HOLDING.difference_update((run_id, key) for key in mine)

    def _decide(self, run_id: str | None, keys: list[str]) -> RunStep:
        if not keys:
            return RunStep(0)
        decided: list[dict[str, Any]] = []

        def record(session: Session, results: Sequence[RefreshResult], stopped: bool) -> None:
            if run_id is None:
                return
            decided.extend(_row(r) for r in results if r.outcome not in _NOT_FINAL)
            runs.finish_results(session, run_id, decided, self.clock())
            if stopped:
                detail = next(
                    (r.detail for r in results if r.outcome is RefreshOutcome.UNAUTHORIZED), ""
                )
                runs.stop_run(session, run_id, _stop_reason(detail), self.clock())

        def claim(session: Session, key_ids: Sequence[str]) -> set[str]:
            # Two deliveries of a key may both exchange it (two workers at once); only the
            # first to store finds its row pending, the other stores nothing of it.
            assert run_id is not None
            return set(runs.pending_keys(session, run_id, key_ids, for_update=True))

        batch = self.refresher.refresh_batch(
            keys, on_saved=record, claim=None if run_id is None else claim
        )
        stopped = None
        if batch.stopped:
            detail = next(
                (r.detail for r in batch.results if r.outcome is RefreshOutcome.UNAUTHORIZED), ""
            )
            stopped = _stop_reason(detail)
        count = (
            len(decided)
            if run_id is not None
            else len([r for r in batch.results if r.outcome not in _NOT_FINAL])
        )
        return RunStep(count, retry=batch.retry, backoff=batch.backoff, stopped=stopped)

    def give_up(self, run_id: str | None, key_ids: Sequence[str], detail: str) -> None:
        """End keys that were retried as often as allowed: their run rows are done with
        outcome ``retry_later`` (their receipt states are due again after the backoff, so a
        later run or the periodic refresh takes them up)."""
        if run_id is None or not key_ids:
            return
        rows = [
            {"key_id": k, "outcome": RefreshOutcome.RETRY_LATER.value, "detail": detail}
            for k in key_ids
        ]
        with self.sessions() as session, session.begin():
            runs.finish_results(session, run_id, rows, self.clock())


def _stop_reason(detail: str | None) -> str:
    return (
        "Apple refused the DeviceCheck token (401"
        + (f": {detail}" if detail and detail != "401" else "")
        + "): check APPATTEST_APPLE_TEAM_ID, APPATTEST_APPLE_KEY_ID and "
        "APPATTEST_APPLE_PRIVATE_KEY_FILE"
    )
