"""Pure ASGI middlewares: the guard every request passes (per-address bound, key, media
type, body size, body deadline, JSON syntax) and the last-resort 500 answer."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Callable, Collection, Mapping
from typing import Final

import anyio
import anyio.to_thread
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.errors import ErrorCode, error_body

log = logging.getLogger("appattest.producer")


# Bodies larger than this are checked for JSON syntax in a worker thread, off the event loop.
_THREAD_PARSE_BYTES: Final = 256 * 1024


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _declared_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # the server refuses such requests; counting still applies


def _bearer_token(scope: Scope) -> str | None:
    """The credentials of ``Authorization: Bearer <key>`` (the scheme in any case), as
    FastAPI's ``HTTPBearer`` reads them, or None."""
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, credentials = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


def _is_json(scope: Scope) -> bool:
    """Whether the declared Content-Type is ``application/json``, with no parameter but an
    optional ``charset=utf-8`` (JSON is UTF-8: RFC 8259, section 8.1)."""
    value = _header(scope, b"content-type")
    if value is None:
        return False
    media_type, *parameters = (part.strip().lower() for part in value.split(b";"))
    if media_type != b"application/json":
        return False
    return all(
        parameter.replace(b" ", b"") in (b"charset=utf-8", b'charset="utf-8"', b"")
        for parameter in parameters
    )


def _is_valid_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def _refusal(
    status: int, code: ErrorCode, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    # The rest of the body, if any, is not read: the connection cannot carry another request.
    return JSONResponse(
        error_body(code, detail),
        status_code=status,
        headers={**(headers or {}), "Connection": "close"},
    )


def _too_large(limit: int) -> JSONResponse:
    return _refusal(
        413, ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is larger than {limit} bytes"
    )


class _TooLarge(Exception):
    """The body grew past the limit while it was read."""


class RequestGuard:
    """What every HTTP request passes before the app reads it, in this order:

    1. At most ``max_in_flight_per_client`` requests of one client address are in progress
       at once; another is refused with 429 ``too_many_connections``.
    2. Under ``protected`` (the ``/v1`` routes), the ``Authorization: Bearer`` key is checked
       with ``authorized`` from the headers alone: 401 ``unauthorized`` before a byte of the
       body is read, and the connection is closed instead of draining the body.
    3. A POST to one of ``json_routes`` (the paths whose POST takes a body) must declare
       ``Content-Type: application/json`` (415 ``unsupported_media_type``). Other methods
       and paths are left to the router (405, 404).
    4. The body may not be larger than ``limit`` bytes (``per_path`` gives other limits for
       exact paths): a larger ``Content-Length`` is refused at once, and a body without one
       (chunked) is read only up to the limit (413 ``payload_too_large``).
    5. The whole body must arrive within ``body_timeout`` seconds of the request's head
       (408 ``request_timeout``), so that a slow sender holds a connection for that long at
       most.
    6. The body of a POST to one of ``json_routes`` must parse as JSON (400
       ``invalid_json``); what is JSON but not the route's schema is the route's 422.

    Between 4 and 5, the body's bytes are reserved from ``max_body_bytes_in_flight``, which
    bounds the bodies (and what the routes build from them) that the process holds at once:
    its ``Content-Length``, or the path's limit for a chunked body, until the request ends. A
    request that would pass the budget is 503 ``service_unavailable`` with ``Retry-After``,
    unless nothing else is held (so one request of any admitted size always gets through).

    The accepted body is then handed on whole, so nothing downstream reads past it. The key
    check is repeated by the routes (``producer.app``), which also learn which key it was.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authorized: Callable[[str | None], bool],
        limit: int,
        body_timeout: float,
        max_in_flight_per_client: int,
        json_routes: Collection[str] = (),
        per_path: Mapping[str, int] | None = None,
        protected: str = "/v1/",
        max_body_bytes_in_flight: int | None = None,
    ) -> None:
        self.app = app
        self.authorized = authorized
        self.limit = limit
        self.body_timeout = body_timeout
        self.max_in_flight_per_client = max_in_flight_per_client
        self.json_routes = frozenset(json_routes)
        self.per_path = dict(per_path or {})
        self.protected = protected
        # client address -> requests in progress. Only the event loop of the server touches
        # it, and an address leaves it when its last request ends, so its size is bounded by
        # the open connections.
        self._in_flight: dict[str, int] = {}
        self.max_body_bytes_in_flight = max_body_bytes_in_flight
        # Body bytes reserved by the requests in progress (the event loop alone touches it).
        self._buffered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = str(client[0]) if client else ""
        held = self._in_flight.get(address, 0)
        if held >= self.max_in_flight_per_client:
            log.info("refused a request from %s: %d requests in progress", address, held)
            response = _refusal(
                429,
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"at most {self.max_in_flight_per_client} requests of one client address "
                "may be in progress at once",
                {"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self._in_flight[address] = held + 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            remaining = self._in_flight[address] - 1
            if remaining:
                self._in_flight[address] = remaining
            else:
                del self._in_flight[address]

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        protected = path.startswith(self.protected) or path == self.protected.rstrip("/")
        wants_json = scope["method"] == "POST" and path in self.json_routes
        refusal: JSONResponse | None = None
        if protected and not self.authorized(_bearer_token(scope)):
            refusal = _refusal(
                401,
                ErrorCode.UNAUTHORIZED,
                "a valid API key is required: Authorization: Bearer <key>",
                {"WWW-Authenticate": "Bearer"},
            )
        elif wants_json and not _is_json(scope):
            refusal = _refusal(
                415,
                ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent as Content-Type: application/json",
            )
        limit = self.per_path.get(path, self.limit)
        declared = _declared_length(scope)
        if refusal is None and declared is not None and declared > limit:
            refusal = _too_large(limit)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        reserve = declared if declared is not None else limit
        budget = self.max_body_bytes_in_flight
        if budget is not None and self._buffered and self._buffered + reserve > budget:
            log.warning(
                "refused %s %s: %d body bytes held, %d more would pass the budget of %d",
                scope["method"],
                path,
                self._buffered,
                reserve,
                budget,
            )
            refusal = _refusal(
                503,
                ErrorCode.SERVICE_UNAVAILABLE,
                "the server holds as many request bodies as it may; try again shortly",
                {"Retry-After": "1"},
            )
            await refusal(scope, receive, send)
            return
        self._buffered += reserve
        try:
            await self._admitted(scope, receive, send, path, limit, wants_json)
        finally:
            self._buffered -= reserve

    async def _admitted(
        self, scope: Scope, receive: Receive, send: Send, path: str, limit: int, wants_json: bool
    ) -> None:
        try:
            # asyncio's own timeout: the servers run the app on asyncio, and it costs a third
            # of anyio's cancel scope per request.
            async with asyncio.timeout(self.body_timeout):
                body = await self._read_body(receive, limit)
        except _TooLarge:
            await _too_large(limit)(scope, receive, send)
            return
        except TimeoutError:
            log.info(
                "%s %s: the body did not arrive within %s s",
                scope["method"],
                path,
                self.body_timeout,
            )
            response = _refusal(
                408,
                ErrorCode.REQUEST_TIMEOUT,
                f"the request body did not arrive within {self.body_timeout} s",
            )
            await response(scope, receive, send)
            return
        if body is None:
            return  # the client is gone; there is no one to answer
        if wants_json:
            # Parsed twice (here, then by the route) so that one rule holds on every route: a
            # body that is not JSON is 400. For an ordinary body that costs microseconds.
            valid = (
                await anyio.to_thread.run_sync(_is_valid_json, body)
                if len(body) > _THREAD_PARSE_BYTES
                else _is_valid_json(body)
            )
            if not valid:
                response = JSONResponse(
                    error_body(ErrorCode.INVALID_JSON, "the body is not valid JSON"),
                    status_code=400,
                )
                await response(scope, receive, send)
                return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read_body(receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None when the client disconnected; raises ``_TooLarge`` past
        ``limit`` bytes."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class InternalErrors:
    """Answer an exception that no handler took with 500 ``internal_error``.

    Unlike Starlette's own handler for ``Exception``, this one does not re-raise, so the server
    does not log the exception's message either: messages can quote request data (a pydantic
    error quotes its input). The log gets the exception's class and its stack.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error(
                "unexpected %s in %s %s\n%s",
                type(exc).__name__,
                scope.get("method"),
                scope.get("path"),
                "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
            )
            if started:
                return  # too late for another answer; the server closes the connection
            response = JSONResponse(
                error_body(ErrorCode.INTERNAL_ERROR, "unexpected error; see the producer log"),
                status_code=500,
            )
            await response(scope, receive, send)
