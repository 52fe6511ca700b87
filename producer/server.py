"""The producer's HTTP server: uvicorn, with bounds on what one connection may hold.

uvicorn alone waits forever for a request's head (its keep-alive timer is disarmed by the first
byte of the next request and is not armed at all on a new connection), lets one address open
as many connections as it likes, and (with httptools, its fastest parser, which measured a
fifth less CPU per challenge than h11 here) buffers a head of any size and drains a body the
app refused before reading it. The protocol built here bounds all of it, below the app:

- the head of each request (request line and headers) must arrive within
  ``header_timeout_seconds`` of the connection opening or of the previous answer; otherwise
  the connection is answered 408 ``request_timeout`` and closed;
- a head may hold at most ``MAX_HEAD_BYTES`` (its request line and headers) and
  ``_MAX_FIELDS`` header fields, and a body's framing (chunk lines, trailers) as much again
  plus a little per chunk; past that the request is answered 431 ``invalid_request`` (when
  no request before it is still to be answered) and the connection closed;
- one client address may hold at most ``max_connections_per_client`` open connections; one
  more is answered 429 ``too_many_connections`` and closed at once;
- a request answered before its body was read (a refusal of the app's guard) has its
  connection closed, not its body drained.

The app's own guard (``producer.middleware.RequestGuard``) bounds what follows the head: the
key, the body's size and the time its body takes. ``appattest api`` and ``appattest serve``
run the app with ``server_config``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar, Final

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from producer.errors import ErrorCode, error_body
from worker.settings import Settings

log = logging.getLogger("appattest.producer")

# Seconds an idle connection stays open after an answer (uvicorn's default, stated here).
KEEP_ALIVE_SECONDS: Final = 5
# The largest request head (request line and headers) read before the connection is answered
# 431 and closed: what uvicorn's h11 protocol buffered at most.
MAX_HEAD_BYTES: Final = 16 * 1024
# What each chunk of a chunked body may add to that bound for its size line and its end.
_CHUNK_LINE_BYTES: Final = 64
# The most header fields a head may have (each kept as a pair of byte strings).
_MAX_FIELDS: Final = 256
# Reads are parsed in slices of this many bytes (see _BoundedProtocol).
_SLICE: Final = 4096


def _raw_answer(status: int, reason: str, code: ErrorCode, detail: str) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, for when no request (or no
    whole request head) was read, so that the app cannot answer."""
    body = json.dumps(error_body(code, detail), separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound for each request head, a
    bound on what a body's framing (chunk lines, trailers) may add to it, a bound on the
    connections of one client address, and no draining of a body that the app answered
    before reading it (the class attributes are set by ``bounded_protocol``, one subclass
    per server).

    Reads are parsed in slices of ``_SLICE`` bytes. A slice that both starts and ends inside
    one head (or inside one body) belongs to it whole, so its bytes count against the bound
    while the parser buffers a header or trailer value it has not finished: what one request
    can make the parser hold is bounded by the limit and a slice or two, whatever else (other
    requests, pipelined) shares its reads."""

    header_timeout: ClassVar[float]
    max_per_client: ClassVar[int]
    # client address -> open connections, of this server (one event loop touches it).
    open_per_client: ClassVar[dict[str, int]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._address: str | None = None
        self._head_deadline: asyncio.TimerHandle | None = None
        # Where the parser is: inside a head, or inside a body (its framing included); which
        # request it is in (a number).
        self._in_head = False
        self._in_body = False
        self._request = 0
        # The current head: its URL and fields as parsed, their count, bytes of the slices
        # inside it, and whether it went past a bound (its fields are no longer kept).
        self._fields_size = 0
        self._fields = 0
        self._head_bytes = 0
        self._too_large = False
        # The current body: bytes of the slices inside it that were not body, its chunks;
        # body bytes of the connection (never reset).
        self._framing = 0
        self._chunks = 0
        self._body_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else ""
        held = self.open_per_client.get(address, 0)
        if held >= self.max_per_client:
            log.info("refused a connection from %s: %d connections open", address, held)
            transport.write(
                _raw_answer(
                    429,
                    "Too Many Requests",
                    ErrorCode.TOO_MANY_CONNECTIONS,
                    f"at most {self.max_per_client} connections of one client address",
                )
            )
            transport.close()
            return
        self._address = address
        self.open_per_client[address] = held + 1
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        if self._address is not None:
            remaining = self.open_per_client.get(self._address, 0) - 1
            if remaining > 0:
                self.open_per_client[self._address] = remaining
            else:
                self.open_per_client.pop(self._address, None)
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        for start in range(0, len(data), _SLICE):
            if self.transport.is_closing():
                return
            piece = data[start : start + _SLICE] if len(data) > _SLICE else data
            request, in_head, in_body = self._request, self._in_head, self._in_body
            body_before = self._body_bytes
            super().data_received(piece)
            if self.transport.is_closing():
                return
            if self._too_large:
                self._refuse_head(current=False)
                return
            if self._request != request:
                continue  # a head began in this slice: the slice is not all one request's
            if in_head and self._in_head:
                self._head_bytes += len(piece)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse_head(current=False)
                    return
            elif in_body and self._in_body:
                self._framing += len(piece) - (self._body_bytes - body_before)
                if self._framing > MAX_HEAD_BYTES + _CHUNK_LINE_BYTES * self._chunks:
                    self._refuse_head(current=True, what="the body's chunk lines and trailers are")
                    return

    # The parser's callbacks.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request += 1
        self._in_head = True
        self._fields_size = self._fields = self._head_bytes = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._fields_size += len(url)
        if self._fields_size > MAX_HEAD_BYTES:
            self._too_large = True
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields_size += len(name) + len(value) + 4
        self._fields += 1
        if self._too_large or self._fields_size > MAX_HEAD_BYTES or self._fields > _MAX_FIELDS:
            self._too_large = True  # kept no longer; refused once the slice is parsed
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.transport.is_closing():
            return
        self._in_head = False
        self._disarm_head_deadline()  # the head is in; the app's guard takes over
        if self._too_large:
            return  # refused once the slice is parsed
        self._in_body = True
        self._framing = self._chunks = 0
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if not self._too_large:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._too_large:
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        answered = self.cycle
        if (
            answered is not None
            and answered.response_complete
            and answered.more_body
            and not self.transport.is_closing()
        ):
            # Answered before its body was read (a refusal): close rather than drain it.
            self.transport.close()
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not self.transport.is_closing() and not pipelined:
            # Nothing else to answer: the next head (begun or not) is due within the
            # deadline from this answer.
            self._arm_head_deadline()

    # The deadline and the refusals.

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _may_answer(self, *, current: bool) -> bool:
        """Whether an answer of this protocol's own may be written now: no request before the
        one it answers is waiting for its answer, nor being answered. ``current``: it
        answers the request whose body is being read (else the one whose head is)."""
        if self.pipeline:
            return False
        cycle = self.cycle
        if cycle is None:
            return True
        return not cycle.response_started if current else cycle.response_complete

    def _head_timed_out(self) -> None:
        # Armed only while no request is being answered (on opening, after an answer with
        # none pipelined) and disarmed when a head is in: the connection is idle or inside
        # the next head.
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if not self._in_head:
            self.transport.close()  # nothing came: close without a word
            return
        # Part of a head came, too slowly: say why before closing.
        log.info("closed a connection from %s: no request head in time", self._address)
        self._close_with(
            408,
            "Request Timeout",
            ErrorCode.REQUEST_TIMEOUT,
            f"the request head did not arrive within {self.header_timeout} s",
            current=False,
        )

    def _refuse_head(self, *, current: bool, what: str = "the request head is") -> None:
        log.info("closed a connection from %s: %s too large", self._address, what)
        self._close_with(
            431,
            "Request Header Fields Too Large",
            ErrorCode.INVALID_REQUEST,
            f"{what} larger than {MAX_HEAD_BYTES} bytes",
            current=current,
        )

    def _close_with(
        self, status: int, reason: str, code: ErrorCode, detail: str, *, current: bool
    ) -> None:
        """Answer with this error when no other answer is due first (``_may_answer``), and
        close the connection."""
        if self._may_answer(current=current):
            self.transport.write(_raw_answer(status, reason, code, detail))
        self.transport.close()


def bounded_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """An HTTP protocol class for one uvicorn server, with the head deadline and the
    per-address connection bound of ``settings``."""
    return type(
        "BoundedProtocol",
        (_BoundedProtocol,),
        {
            "header_timeout": settings.header_timeout_seconds,
            "max_per_client": settings.max_connections_per_client,
            "open_per_client": {},
        },
    )


def server_config(
    app: Any, settings: Settings, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Config:
    """The uvicorn configuration the producer runs with: the bounded httptools protocol (a
    deadline and a size bound for each request head), a short keep-alive, no WebSocket
    upgrades."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # JSON logs: uvicorn's loggers propagate to the root logger and its JSON lines
        # (worker.logs.configure_logging) instead of uvicorn's own text handlers.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        http=bounded_protocol(settings),
        ws="none",
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
