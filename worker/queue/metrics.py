"""Prometheus metrics of the workers, and the broker's queues as the producer reports them.

A worker machine runs several processes (the Celery main process, its prefork children, and
the ones that replace them); their counters are added up by the client's multiprocess mode:
each process writes its values to files in one folder (``PROMETHEUS_MULTIPROC_DIR``), and the
process serving ``/metrics`` reads them all. ``enable_multiprocess`` must run in the worker's
main process before any metric is created and before the pool forks; ``worker_metrics`` then
builds the metrics once per process (a forked child reopens its own files).

Labels stay bounded: kinds and reasons are enumerations, an App ID is one the policy names
(any other is ``other``), the environment is one of two. No key id, job id or request id is
ever a label.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from base64 import b64decode
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.queue.messaging import REVERIFY_TASK, VERIFY_BATCH_TASK, VERIFY_TASK

log = logging.getLogger("appattest.metrics")

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: a verification takes about a millisecond, a queue wait may take minutes.
_VERIFY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
)  # fmt: skip
_BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

PURGED_TABLES: Final = ("challenges", "verdicts", "idempotency_keys")
CACHES: Final = ("intermediate", "public_key")
KINDS: Final = frozenset({"registration", "assertion"})
ENVIRONMENTS: Final = frozenset({"production", "development"})
OTHER: Final = "other"


class WorkerMetrics:
    """The metrics a worker process updates (see the README, "Operating it")."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.verdicts = Counter(
            "appattest_verdicts",
            "Verdicts decided, by kind, reason (ok when accepted), App ID and environment.",
            ["kind", "reason", "app_id", "environment"],
            registry=registry,
        )
        self.verification_seconds = Histogram(
            "appattest_verification_seconds",
            "Worker time per job (a batch's time shared among its jobs), by kind.",
            ["kind"],
            buckets=_VERIFY_BUCKETS,
            registry=registry,
        )
        self.batch_jobs = Histogram(
            "appattest_batch_jobs",
            "Jobs per batch message a worker decided.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.submission_to_verdict = Histogram(
            "appattest_submission_to_verdict_seconds",
            "From the job's publication to its verdict, by kind.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "appattest_task_retries",
            "Tasks retried after an infrastructure error (the store was unreachable).",
            ["task"],
            registry=registry,
        )
        self.ledger_republished = Counter(
            "appattest_ledger_republished",
            "Jobs whose queue message was lost and that the ledger published again.",
            registry=registry,
        )
        self.cache_hits = Counter(
            "appattest_cache_hits",
            "Cache hits, by cache (intermediate certificates, device public keys).",
            ["cache"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "appattest_cache_misses",
            "Cache misses, by cache (intermediate certificates, device public keys).",
            ["cache"],
            registry=registry,
        )
        self.purged = Counter(
            "appattest_purged_rows",
            "Rows deleted by the retention purge, by table.",
            ["table"],
            registry=registry,
        )
        # Every label value known in advance is shown from the start (at 0), so that
        # dashboards and alerts find the series before the first event.
        for task in (VERIFY_TASK, VERIFY_BATCH_TASK, REVERIFY_TASK):
            self.retries.labels(task)
        for table in PURGED_TABLES:
            self.purged.labels(table)
        for cache in CACHES:
            self.cache_hits.labels(cache)
            self.cache_misses.labels(cache)


_lock = threading.Lock()
_metrics: WorkerMetrics | None = None


def worker_metrics() -> WorkerMetrics:
    """This process's worker metrics, built on first use (after ``enable_multiprocess`` in a
    worker that serves them). Without multiprocess mode they live in a private registry."""
    global _metrics
    with _lock:
        if _metrics is None:
            multi = os.environ.get(MULTIPROC_ENV)
            _metrics = WorkerMetrics(None if multi else CollectorRegistry())
        return _metrics


def enable_multiprocess(directory: Path, *, clear: bool) -> None:
    """Write this process's metrics (and those of the processes it forks or starts with this
    environment) to files in ``directory``; ``clear`` first removes the files of an earlier
    run. Call before any metric exists."""
    directory.mkdir(parents=True, exist_ok=True)
    if clear:
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """A registry that reads every process's metric files in ``directory``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


def process_exited(pid: int) -> None:
    """Tell the multiprocess files that a pool process is gone (its counters stay counted)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def app_id_label(app_id: str | None, known: frozenset[str]) -> str:
    """An App ID as a label: one the policy names, else ``other`` (a caller's claim is not)."""
    return app_id if app_id is not None and app_id in known else OTHER


def observe_verdicts(
    metrics: WorkerMetrics,
    results: Iterable[dict[str, Any]],
    *,
    known_apps: frozenset[str],
    seconds: float,
    submitted_at: datetime | None,
    now: datetime,
) -> None:
    """Count the verdicts of one task (their JSON), share its ``seconds`` among them, and
    observe the time since ``submitted_at``. Jobs of one batch share their labels mostly, so
    each distinct label set is counted once, by the number of its jobs."""
    counts: dict[tuple[str, str, str, str], int] = {}
    kinds: dict[str, int] = {}
    for result in results:
        kind = result.get("kind")
        kind = kind if kind in KINDS else "unknown"
        reason = "ok" if result.get("ok") else str(result.get("reason") or "unknown")
        environment = result.get("environment")
        environment = environment if environment in ENVIRONMENTS else "none"
        labels = (kind, reason, app_id_label(result.get("appId"), known_apps), environment)
        counts[labels] = counts.get(labels, 0) + 1
        kinds[kind] = kinds.get(kind, 0) + 1
    jobs = sum(kinds.values())
    if not jobs:
        return
    for labels, n in counts.items():
        metrics.verdicts.labels(*labels).inc(n)
    share = seconds / jobs
    waited = max(0.0, (now - submitted_at).total_seconds()) if submitted_at is not None else None
    for kind, n in kinds.items():
        verification = metrics.verification_seconds.labels(kind)
        latency = metrics.submission_to_verdict.labels(kind) if waited is not None else None
        for _ in range(n):
            verification.observe(share)
            if latency is not None and waited is not None:
                latency.observe(waited)


class CacheCounts:
    """Moves the cache counters by what a cache counted since the last call (caches count
    their own hits and misses; this turns the running totals into counter increments)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._hits = 0
        self._misses = 0

    def update(self, metrics: WorkerMetrics, hits: int, misses: int) -> None:
        if hits > self._hits:
            metrics.cache_hits.labels(self.name).inc(hits - self._hits)
        if misses > self._misses:
            metrics.cache_misses.labels(self.name).inc(misses - self._misses)
        self._hits, self._misses = hits, misses


class WorkerCpu(Collector):
    """``appattest_worker_cpu_seconds_total``: CPU time of this worker's main process and of
    its pool processes (read from /proc at each scrape; nothing on systems without it)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def describe(self) -> Iterable[Metric]:
        return []

    @staticmethod
    def _stat(pid: str) -> tuple[int, float] | None:
        """(parent pid, user + system ticks) of a process."""
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = raw[raw.rindex(")") + 2 :].split()  # after the command name
        return int(fields[1]), float(fields[11]) + float(fields[12])

    def collect(self) -> Iterable[Metric]:
        cpu = CounterMetricFamily(
            "appattest_worker_cpu_seconds",
            "CPU time of the worker's main process and its pool processes.",
        )
        own = self._stat(str(self.pid))
        if own is None:
            return []
        ticks = own[1]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                found = self._stat(entry.name)
                if found is not None and found[0] == self.pid:
                    ticks += found[1]
        cpu.add_metric([], ticks / self._tick)
        return [cpu]


# The broker's queues ------------------------------------------------------------------------


class BrokerQueues(Collector):
    """``appattest_queue_messages{queue}`` and ``appattest_queue_oldest_age_seconds{queue}``,
    read from the broker at each scrape.

    Redis: the length of the queue's list and the ``submittedAt`` of the message workers take
    next (``worker.queue.messaging``). The embedded broker (kombu's SQL transport): its
    visible rows, and the ``submittedAt`` of the first. RabbitMQ: the message count of a
    passive declare (it has no age of the oldest message to give). A broker that does not
    answer yields no sample and ``appattest_broker_up 0``.
    """

    def __init__(self, broker_url: str, queues: Sequence[str]) -> None:
        self.broker_url = broker_url
        self.queues = tuple(queues)
        self._reader = _reader_for(broker_url)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "appattest_queue_messages", "Messages waiting in a broker queue.", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "appattest_queue_oldest_age_seconds",
            "Age of the oldest waiting message of a queue (0 when empty).",
            labels=["queue"],
        )
        up = GaugeMetricFamily("appattest_broker_up", "1 when the broker answered the scrape.")
        try:
            for queue, count, oldest in self._reader(self.queues):
                depth.add_metric([queue], count)
                if oldest is not None:
                    age.add_metric([queue], max(0.0, time.time() - oldest) if count else 0.0)
            up.add_metric([], 1)
        except Exception as exc:  # any broker failure: the scrape still answers
            log.warning("queue metrics: the broker did not answer (%s)", type(exc).__name__)
            up.add_metric([], 0)
        return [depth, age, up]

    def close(self) -> None:
        closer = getattr(self._reader, "close", None)
        if closer is not None:
            closer()


_QueueRead = Iterator[tuple[str, int, float | None]]


def _reader_for(broker_url: str) -> Any:
    if broker_url.startswith(("redis://", "rediss://")):
        return _RedisQueues(broker_url)
    if broker_url.startswith("sqla+"):
        return _SqlQueues(broker_url.removeprefix("sqla+"))
    return _KombuQueues(broker_url)


def _submitted_at(raw: bytes | None) -> float | None:
    """The ``submittedAt`` of a kombu Redis message (None when it has none)."""
    if raw is None:
        return None
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = b64decode(body)
        args = json.loads(body)[0]
        stamp = args[0].get("submittedAt")
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


class _RedisQueues:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def __call__(self, queues: Sequence[str]) -> _QueueRead:
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
            pipe.lindex(queue, -1)  # kombu pushes on the left and takes from the right
        answers = pipe.execute()
        for n, queue in enumerate(queues):
            count, head = int(answers[2 * n]), answers[2 * n + 1]
            yield queue, count, _submitted_at(head) if count else time.time()

    def close(self) -> None:
        self.client.close()


class _SqlQueues:
    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(url)

    def __call__(self, queues: Sequence[str]) -> _QueueRead:
        from sqlalchemy import inspect, text

        with self.engine.connect() as conn:
            if not inspect(conn).has_table("kombu_message"):
                for queue in queues:
                    yield queue, 0, time.time()
                return
            for queue in queues:
                count = conn.scalar(
                    text(
                        "SELECT COUNT(*) FROM kombu_message m "
                        "JOIN kombu_queue q ON m.queue_id = q.id "
                        "WHERE q.name = :queue AND m.visible"
                    ),
                    {"queue": queue},
                )
                # kombu stamps a row only when it is taken: the age is the oldest message's
                # submittedAt, as on Redis.
                head = conn.scalar(
                    text(
                        "SELECT m.payload FROM kombu_message m "
                        "JOIN kombu_queue q ON m.queue_id = q.id "
                        "WHERE q.name = :queue AND m.visible ORDER BY m.id LIMIT 1"
                    ),
                    {"queue": queue},
                )
                raw = head.encode() if isinstance(head, str) else None
                yield queue, int(count or 0), _submitted_at(raw) if count else time.time()

    def close(self) -> None:
        self.engine.dispose()


class _KombuQueues:
    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, queues: Sequence[str]) -> _QueueRead:
        from kombu import connection

        counts: list[tuple[str, int, float | None]] = []
        with connection.Connection(self.url, connect_timeout=2) as conn:  # type: ignore[no-untyped-call]
            channel = conn.default_channel
            for queue in queues:
                # A queue not declared yet (no worker started) has no count to give.
                with contextlib.suppress(Exception):
                    declared = channel.queue_declare(queue=queue, passive=True)
                    counts.append((queue, int(declared.message_count), None))
        yield from counts
