"""Issuing challenges for ``POST /v1/challenges``: the challenges that requests ask for at the
same time are stored together.

A request draws its challenge on the event loop and joins the group of challenges waiting to be
written. One writer task, which lives only while challenges wait, writes the groups in turn,
each as one executemany of one cached INSERT in one transaction, in one hop to a worker thread
(no ORM unit of work, no session). A lone request is written at once; requests that arrive
while a write is in flight form the next group (up to ``max_group`` challenges). A request is
answered only after its group's transaction committed; when the write fails, every request of
the group is refused and none of its rows is stored; one not written within ``timeout``
seconds (a write stuck behind a lock) is answered 503.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import anyio.to_thread
from sqlalchemy import Engine

from producer.errors import ApiError, ErrorCode
from producer.handlers import DATABASE_DOWN, STORE_UNAVAILABLE
from worker.store.challenges import NewChallenge, Purpose, new_challenge, store_challenges

log = logging.getLogger("appattest.producer")

# Enough to absorb a burst of callers in one transaction, small enough that one statement's
# parameters stay far below what a driver accepts (five per row).
MAX_GROUP: Final = 256
# Seconds a request waits for its challenge's group to be stored before it is answered 503.
WRITE_TIMEOUT: Final = 10.0


class _Group:
    """Challenges written in one transaction, and how that went."""

    __slots__ = ("challenges", "error", "written")

    def __init__(self) -> None:
        self.challenges: list[NewChallenge] = []
        # An event rather than a future: a waiter that is cancelled (its client went away)
        # must not cancel what the others wait on.
        self.written = asyncio.Event()
        self.error: BaseException | None = None


class ChallengeIssuer:
    """Draws challenges and stores them in groups through ``engine`` (see the module).

    One issuer serves one event loop, the app's: its groups and its writer task belong to the
    loop that first used it.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        ttl: timedelta,
        max_group: int = MAX_GROUP,
        timeout: float = WRITE_TIMEOUT,
    ) -> None:
        if max_group < 1 or timeout <= 0:
            raise ValueError("max_group must be at least 1 and timeout above 0")
        self._timeout = timeout
        self._engine = engine
        self._ttl = ttl
        self._max_group = max_group
        # Groups not yet written, oldest first; the last one takes new challenges until full.
        self._waiting: deque[_Group] = deque()
        self._writer: asyncio.Task[None] | None = None

    async def issue(self, *, purpose: Purpose, key_id: str | None) -> NewChallenge:
        """A fresh challenge for ``purpose`` (for ``key_id`` alone, when given), returned once
        its row is committed. Raises ``ApiError`` 503 ``service_unavailable`` when the store
        cannot be reached, and ``RuntimeError`` when it refused the write otherwise."""
        issued = new_challenge(purpose=purpose, key_id=key_id, ttl=self._ttl, now=datetime.now(UTC))
        if not self._waiting or len(self._waiting[-1].challenges) >= self._max_group:
            self._waiting.append(_Group())
        group = self._waiting[-1]
        group.challenges.append(issued)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_waiting())
        try:
            await asyncio.wait_for(group.written.wait(), self._timeout)
        except TimeoutError:
            # A write stuck behind a lock or a stalled connection: this caller is answered,
            # and the challenge, if it is stored after all, is never used.
            log.warning("a challenge was not stored within %.0f s", self._timeout)
            raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, STORE_UNAVAILABLE) from None
        if group.error is not None:
            if isinstance(group.error, DATABASE_DOWN):
                raise ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, STORE_UNAVAILABLE)
            raise RuntimeError("storing a group of challenges failed") from group.error
        return issued

    async def _write_waiting(self) -> None:
        """Write the waiting groups in turn, until none is left."""
        try:
            while self._waiting:
                group = self._waiting.popleft()
                try:
                    await anyio.to_thread.run_sync(self._write, group.challenges)
                except BaseException as exc:
                    group.error = exc
                    self._log_failure(exc, len(group.challenges))
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    group.written.set()
        finally:
            # Only when this task is cancelled (the loop shuts down) are groups left: their
            # challenges were never stored.
            while self._waiting:
                group = self._waiting.popleft()
                group.error = RuntimeError("the challenge writer stopped")
                group.written.set()
            self._writer = None

    def _write(self, challenges: Sequence[NewChallenge]) -> None:
        with self._engine.begin() as connection:
            store_challenges(connection, challenges)

    @staticmethod
    def _log_failure(exc: BaseException, count: int) -> None:
        # The class and the stack only: a driver's message may quote the statement.
        if isinstance(exc, DATABASE_DOWN):
            log.warning(
                "%d challenges not stored: the store is unavailable (%s)", count, type(exc).__name__
            )
        else:
            log.error(
                "%d challenges not stored: unexpected %s\n%s",
                count,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
            )
