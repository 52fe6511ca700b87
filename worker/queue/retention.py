"""The retention purge as the workers run it: periodically, one worker at a time, and by hand
(``appattest purge``). What is purged and how is ``worker.store.retention``'s."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from worker.queue.metrics import worker_metrics
from worker.settings import Settings
from worker.store.db import session_factory
from worker.store.retention import Cutoffs, PurgeCounts, count_purgeable, purge, purge_lock

log = logging.getLogger("appattest.retention")


def cutoffs_for(settings: Settings, now: datetime) -> Cutoffs:
    """The purge's cutoffs under these settings, as of ``now``."""
    days = settings.verdict_retention_days
    return Cutoffs.at(
        now,
        challenge_grace=timedelta(seconds=settings.challenge_purge_grace_seconds),
        verdict_retention=timedelta(days=days) if days else None,
        idempotency_ttl=timedelta(seconds=settings.idempotency_ttl_seconds),
    )


def run_purge(
    engine: Engine,
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> PurgeCounts | None:
    """Purge (or with ``dry_run`` count) what the settings' retention lets go; None when
    another purge holds the lock (PostgreSQL)."""
    cutoffs = cutoffs_for(settings, now or datetime.now(UTC))
    sessions = session_factory(engine)
    if dry_run:
        with sessions() as session:
            return count_purgeable(session, cutoffs)
    metrics = worker_metrics()
    with engine.connect() as lock_holder, purge_lock(lock_holder) as taken:
        if not taken:
            return None
        counts = purge(
            sessions,
            cutoffs,
            batch_size=settings.purge_batch_size,
            on_batch=lambda table, rows: metrics.purged.labels(table).inc(rows),
            should_stop=stop.is_set if stop is not None else lambda: False,
        )
    if any(rows for _, rows in counts.items()):
        log.info(
            "purged %s", ", ".join(f"{rows} {table}" for table, rows in counts.items() if rows)
        )
    return counts


class Purger:
    """A daemon thread of a worker's main process that runs the purge every
    ``purge_interval_seconds``; on PostgreSQL the advisory lock lets one worker purge at a
    time, the others skip that round."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention-purge", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.engine.dispose()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.purge_interval_seconds):
            try:
                run_purge(self.engine, self.settings, stop=self._stop)
            except Exception as exc:  # a down store, or a bug: log it, try again next round
                log.warning("retention purge failed: %s", type(exc).__name__)
