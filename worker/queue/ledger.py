"""The ledger of accepted jobs: what closes the one gap in the Redis broker's delivery.

Kombu's Redis transport takes a message off the queue (``BRPOP``) and records it as
unacknowledged in a second command. A Redis that dies between the two, or whose reply to the
first never reaches the worker, loses that message: it is neither queued nor unacknowledged,
so the visibility timeout never brings it back, and the job would stay pending for ever.

So every message published (``worker.queue.messaging.publish``) is first written here, in the
broker's own Redis (its append-only file keeps both or neither): a sorted set of task ids
scored by publish time, and a hash of the task name and encoded message. A worker removes
the entry once the task's result is stored. A worker's main process sweeps the ledger every
few seconds (one sweeper at a time across all workers, by a lock with a timeout) and
publishes again, under the same task id, every entry that is older than ``resend_after``
seconds and provably not on its way:

- it has no result in the result backend (a result of any final state ends the entry);
- no worker holds it: its task id is not among the broker's unacknowledged messages, where
  every delivered, prefetched or retry-scheduled message of the Redis transport sits;
- it is not queued: the queue is empty, or its oldest message (the next one a worker takes)
  was published after this entry. A long backlog therefore delays a resend; it never causes
  one.

A resend that races a worker taking the same message off the queue is possible and harmless:
verification is idempotent per job id (a second delivery returns the first verdict).
Only the Redis broker needs the ledger; RabbitMQ and the embedded database broker take messages
off their queues transactionally.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis
from celery import Celery, states

from worker.queue.messaging import Message, decode, publish, read_task_metas
from worker.queue.metrics import worker_metrics

log = logging.getLogger("appattest.ledger")

LEDGER_KEY: Final = "appattest:ledger"
JOBS_KEY: Final = "appattest:ledger:jobs"
LOCK_KEY: Final = "appattest:ledger:sweeping"
# Kombu's Redis transport keeps delivered, unacknowledged messages in this hash (its default
# ``unacked_key``, which this service does not change).
UNACKED_KEY: Final = "unacked"
# Entries looked at per sweep: bounds the work and the memory of one round.
SWEEP_BATCH: Final = 500

_SOCKET_TIMEOUT: Final = 5.0


def uses_ledger(broker_url: str) -> bool:
    """Whether messages on this broker need the ledger (the Redis transport only)."""
    return broker_url.startswith(("redis://", "rediss://"))


def ledger_for(celery_app: Celery) -> Ledger | None:
    """The ledger of this app's broker, or None when its broker needs none."""
    conf = getattr(celery_app, "conf", None)
    broker_url = getattr(conf, "broker_url", None)
    if not isinstance(broker_url, str) or not uses_ledger(broker_url):
        return None
    return Ledger(broker_url, queue=conf.task_default_queue)  # type: ignore[union-attr]


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    examined: int
    finished: int
    resent: list[str]


class Ledger:
    """The ledger in the broker's Redis; thread-safe (a connection pool)."""

    def __init__(self, broker_url: str, *, queue: str) -> None:
        self.client: redis.Redis = redis.Redis.from_url(
            broker_url, socket_timeout=_SOCKET_TIMEOUT, socket_connect_timeout=_SOCKET_TIMEOUT
        )
        self.queue = queue

    def close(self) -> None:
        self.client.close()

    def record(self, entries: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Enter ``(task_id, task_name, job)`` entries, in one transaction."""
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(LEDGER_KEY, {task_id: now for task_id, _, _ in entries})
        pipe.hset(
            JOBS_KEY,
            mapping={
                task_id: json.dumps({"task": task, "job": job}, separators=(",", ":"))
                for task_id, task, job in entries
            },
        )
        pipe.execute()

    def forget(self, task_ids: Iterable[str]) -> None:
        """Remove entries (their result is stored, or they were never published)."""
        ids = list(task_ids)
        if not ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(LEDGER_KEY, *ids)
        pipe.hdel(JOBS_KEY, *ids)
        pipe.execute()

    def holding(self, task_ids: Sequence[str]) -> dict[str, float]:
        """Which of these tasks have an entry (accepted, and no result stored yet), with the
        time (epoch seconds) it was last published."""
        if not task_ids:
            return {}
        scores = self.client.zmscore(LEDGER_KEY, list(task_ids))
        return {
            task_id: float(score)
            for task_id, score in zip(task_ids, scores, strict=True)
            if score is not None
        }

    def pending(self) -> int:
        """Entries whose result is not yet stored."""
        return int(self.client.zcard(LEDGER_KEY))

    def _in_flight(self) -> set[str]:
        """Task ids of the messages workers hold (delivered and not yet acknowledged)."""
        held: set[str] = set()
        for raw in self.client.hvals(UNACKED_KEY):
            task_id = _task_id_of(raw, wrapped=True)
            if task_id is not None:
                held.add(task_id)
        return held

    def _queue_head_score(self, queue: str | None = None) -> float | None:
        """Publish time of the message workers take next from ``queue`` (the default queue
        when None); +inf for an empty queue, None when that message is not in the ledger
        (nothing can then be concluded)."""
        raw = self.client.lindex(queue or self.queue, -1)
        if raw is None:
            return float("inf")
        task_id = _task_id_of(raw, wrapped=False)
        if task_id is None:
            return None
        score = self.client.zscore(LEDGER_KEY, task_id)
        return None if score is None else float(score)

    def sweep(self, celery_app: Celery, *, resend_after: float) -> SweepReport:
        """One sweep (see the module docstring); the caller holds the sweeping lock."""
        cutoff = time.time() - resend_after
        stale: list[tuple[bytes, float]] = self.client.zrangebyscore(  # type: ignore[assignment]
            LEDGER_KEY, "-inf", cutoff, start=0, num=SWEEP_BATCH, withscores=True
        )
        if not stale:
            return SweepReport(0, 0, [])
        metas = read_task_metas(celery_app.backend, [raw_id.decode() for raw_id, _ in stale])
        finished: list[str] = []
        open_entries: list[tuple[str, float]] = []
        for raw_id, score in stale:
            task_id = raw_id.decode()
            if metas[task_id].get("status") in states.READY_STATES:
                finished.append(task_id)
            else:
                open_entries.append((task_id, score))
        self.forget(finished)
        if not open_entries:
            return SweepReport(len(stale), len(finished), [])
        held = self._in_flight()
        candidates = [(task_id, score) for task_id, score in open_entries if task_id not in held]
        stored = (
            self.client.hmget(JOBS_KEY, [task_id for task_id, _ in candidates])
            if candidates
            else []
        )
        # Each message is compared with the head of its own queue: a backlog on the Android
        # queue (jobs waiting on Google) says nothing of Apple's, and the other way round.
        heads: dict[str, float | None] = {}
        resent: list[str] = []
        lost: list[tuple[str, Message]] = []
        for (task_id, score), raw in zip(candidates, stored, strict=True):
            if raw is None:
                self.forget([task_id])
                continue
            entry = json.loads(raw)
            try:
                message = decode(entry["task"], entry["job"])
            except ValueError as exc:  # MessageError: nothing a worker could run
                log.error("task %s: ledger entry dropped: %s", task_id, exc)
                self.forget([task_id])
                continue
            if message.queue not in heads:
                heads[message.queue] = self._queue_head_score(message.queue)
            head = heads[message.queue]
            if head is not None and score < head:
                lost.append((task_id, message))
        if lost:
            with celery_app.producer_or_acquire() as producer:
                for task_id, message in lost:
                    # Re-scored first: the next sweep sees it as just published.
                    self.client.zadd(LEDGER_KEY, {task_id: time.time()})
                    publish(celery_app, task_id, message, ledger=None, producer=producer)
                    resent.append(task_id)
                    log.warning("task %s: its message was lost; published again", task_id)
        return SweepReport(len(stale), len(finished), resent)


def _task_id_of(raw: bytes | str, *, wrapped: bool) -> str | None:
    """The Celery task id in a kombu Redis message (``wrapped``: an unacked entry,
    ``[message, exchange, routing_key]``)."""
    try:
        message = json.loads(raw)
        if wrapped:
            message = message[0]
        task_id = message["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return task_id if isinstance(task_id, str) else None


class Sweeper:
    """A daemon thread of a worker's main process that sweeps the ledger periodically."""

    def __init__(
        self, celery_app: Celery, ledger: Ledger, *, interval: float, resend_after: float
    ) -> None:
        self.celery_app = celery_app
        self.ledger = ledger
        self.interval = interval
        self.resend_after = resend_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-sweeper", daemon=True)
        self._token = f"{os.getpid()}-{id(self)}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + _SOCKET_TIMEOUT)
        self.ledger.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                report = self.sweep_once()
                if report is not None and report.resent:
                    worker_metrics().ledger_republished.inc(len(report.resent))
            except Exception as exc:  # a down broker, or a bug: log it, try again next round
                log.warning("ledger sweep failed: %s: %s", type(exc).__name__, exc)

    def sweep_once(self) -> SweepReport | None:
        """Sweep unless another worker swept less than an interval ago; None then."""
        # Never released: the lock's lifetime is what spaces the sweeps of all the workers.
        lock_ms = max(100, int(self.interval * 900))
        if not self.ledger.client.set(LOCK_KEY, self._token, nx=True, px=lock_ms):
            return None
        return self.ledger.sweep(self.celery_app, resend_after=self.resend_after)
