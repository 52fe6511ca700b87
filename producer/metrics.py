"""The producer's Prometheus metrics and its request context (``X-Request-ID``).

Each app has a registry of its own (tests build many apps in one process). ``GET /metrics``
answers with it, the broker's queues (``worker.queue.metrics.BrokerQueues``) and, under
``appattest serve``, the embedded worker's metrics read from their multiprocess folder.
Labels are bounded: a route is its path template (``other`` when nothing matched), a method
one of the HTTP methods, a status the number.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.queue.logs import request_id_var

REQUEST_ID_HEADER: Final = "X-Request-ID"
# A caller's request id is kept when it is this (else the producer makes one): short, and
# nothing that could break a log line or a header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_METHODS: Final = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class ProducerMetrics:
    """The metrics of one producer app (see the README, "Operating it")."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "appattest_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "appattest_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.jobs_submitted = Counter(
            "appattest_jobs_submitted",
            "Jobs accepted and queued (idempotent replays excluded), by kind.",
            ["kind"],
            registry=registry,
        )
        self.challenges_issued = Counter(
            "appattest_challenges_issued",
            "Challenges issued, by purpose.",
            ["purpose"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "appattest_rate_limited_requests",
            "Requests refused with 429 rate_limited.",
            registry=registry,
        )
        self.wait_timeouts = Counter(
            "appattest_wait_timeouts",
            "Requests with ?wait whose verdicts were not all in when the wait ended.",
            registry=registry,
        )

    def add_worker_folder(self, directory: Path) -> None:
        """Also answer with the metrics the worker's processes write to ``directory``."""
        multiprocess.MultiProcessCollector(self.registry, path=str(directory))  # type: ignore[no-untyped-call]


def request_id_of(header: bytes | None) -> str:
    """The request id: the caller's ``X-Request-ID`` when it is a plain short token, else a
    fresh one."""
    if header is not None:
        text = header.decode("latin-1")
        if _REQUEST_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class RequestContext:
    """The outermost middleware: gives each HTTP request its id (``X-Request-ID``, taken or
    made, set for the request's log lines and returned in the answer's headers), and counts
    the request and its latency by route template."""

    def __init__(self, app: ASGIApp, *, metrics: ProducerMetrics, routes: Sequence[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        # The router records the route it chose; a request answered before routing (a
        # refusal of the guard) is matched here.
        chosen = scope.get("route")
        if chosen is not None:
            return str(getattr(chosen, "path", "other"))
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", "other"))
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"x-request-id")
        request_id = request_id_of(header)
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers: list[Any] = list(message.get("headers") or [])
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            method = scope.get("method", "OTHER")
            method = method if method in _METHODS else "OTHER"
            route = self._route(scope)
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)
