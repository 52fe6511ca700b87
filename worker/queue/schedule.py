"""The periodic receipt refresh: the workers hand due keys to the receipts queue on their own.

With ``APPATTEST_RECEIPT_REFRESH_SCHEDULE_SECONDS`` set, the main process of every worker that
serves the receipts queue runs a ``RefreshSchedule`` thread. Every interval one of them (a lock
in Redis whose lifetime is the interval, never released, so the rounds of all workers are
spaced by it) selects the keys that are due (not revoked, Apple still holds their data, their
next refresh has come), at most ``receipt_refresh_max_keys``, claims them (they are not due
again for a while, see ``CLAIM_LEASE``) and publishes them in batches. Deciding a
key sets its real next refresh: daily by default, never before its receipt's not-before,
always before it expires. Without Redis (the embedded broker, one machine) the lock is this
process's own.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Final

import redis
from celery import Celery
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker.queue.messaging import PUBLISH_ERRORS, RefreshReceipts, publish
from worker.service.refresh_runs import RefreshFilters, select_keys
from worker.store import refresh_runs

log = logging.getLogger("appattest.schedule")

# How long a key handed to the workers is not handed out again by another run or the periodic
# refresh (deciding it sets its real next refresh; a key whose message was lost is due again).
CLAIM_LEASE = timedelta(minutes=15)

LOCK_KEY: Final = "appattest:receipts:schedule"
_BATCH: Final = 100
# What ends a round early (the store, Redis or the broker failed): the keys stay due.
_ROUND_ERRORS: Final[tuple[type[BaseException], ...]] = (
    SQLAlchemyError,
    redis.RedisError,
    *PUBLISH_ERRORS,
)


def publish_refresh(
    sessions: sessionmaker[Session],
    app: Celery,
    run_id: str | None,
    key_ids: Iterable[list[str]],
    *,
    now: datetime,
) -> int:
    """Hand batches of keys to the receipts queue (``RefreshReceipts`` through ``publish``),
    claiming each batch first (see ``CLAIM_LEASE``); return how many keys were published.

    Without the ledger: the run's pending rows and the keys' due times in PostgreSQL are what
    brings a lost message's keys back (a resumed run, the periodic refresh), not a resend."""
    published = 0
    with app.producer_or_acquire() as producer:
        for batch in key_ids:
            with sessions() as session, session.begin():
                refresh_runs.claim_keys(session, batch, now + CLAIM_LEASE)
            message = RefreshReceipts(run_id=run_id, key_ids=tuple(batch))
            publish(app, str(uuid.uuid4()), message, ledger=None, producer=producer)
            published += len(batch)
    return published


class RefreshSchedule:
    """See the module docstring. ``tick()`` does one round (when it gets the lock) and returns
    how many keys it published, or None when another worker had the round."""

    def __init__(
        self,
        app: Celery,
        sessions: sessionmaker[Session],
        client: redis.Redis | None,
        *,
        interval: float,
        max_keys: int,
    ) -> None:
        self.app = app
        self.sessions = sessions
        self.client = client
        self.interval = interval
        self.max_keys = max_keys
        self._token = f"{os.getpid()}-{id(self)}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="receipt-schedule", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _locked(self) -> bool:
        if self.client is None:
            return True
        lock_ms = max(100, int(self.interval * 900))
        return bool(self.client.set(LOCK_KEY, self._token, nx=True, px=lock_ms))

    def tick(self, now: datetime | None = None) -> int | None:
        if not self._locked():
            return None
        at = now or datetime.now(UTC)
        filters = RefreshFilters(due_only=True, limit=self.max_keys)
        with self.sessions() as session:
            due = select_keys(session, filters, at)

        def batches() -> Iterator[list[str]]:
            for start in range(0, len(due), _BATCH):
                yield due[start : start + _BATCH]

        published = publish_refresh(self.sessions, self.app, None, batches(), now=at)
        if published:
            log.info("periodic refresh: %d due keys handed to the receipts queue", published)
        return published

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except _ROUND_ERRORS as exc:
                # The keys stay due: the next round takes them.
                log.warning("periodic refresh skipped a round: %s", type(exc).__name__)
            except Exception:
                log.exception("periodic refresh: unexpected error")
