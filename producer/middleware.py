"""Pure ASGI middlewares: the request body limit and the last-resort 500 answer."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.errors import ErrorCode, error_body

log = logging.getLogger("appattest.producer")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses such requests; counting still applies
    return None


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        error_body(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is larger than {limit} bytes"),
        status_code=413,
        # The rest of the body was not read; the connection cannot carry another request.
        headers={"Connection": "close"},
    )


class BodySizeLimit:
    """Refuse HTTP request bodies larger than ``limit`` bytes with 413 ``payload_too_large``.

    Enforced before anything parses the body: a declared ``Content-Length`` above the limit is
    refused without reading a byte, and a body without one (chunked) is read only up to the
    limit. The accepted body is then handed on whole, so nothing downstream reads past it.

    ``per_path`` gives other limits for exact paths (the batch route takes more than one body).
    """

    def __init__(self, app: ASGIApp, *, limit: int, per_path: Mapping[str, int] | None = None):
        self.app = app
        self.limit = limit
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.limit)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone; there is no one to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(limit)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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
