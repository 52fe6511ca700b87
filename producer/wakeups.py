"""Wake-ups for waiting requests: a subscription to the Redis channels on which Celery's Redis
result backend announces each result it stores.

When that backend stores a task's result it also PUBLISHes the result, in the same
transaction, on a channel named like the result's key: ``celery-task-meta-<task id>``
(``RedisBackend._set`` in ``celery/backends/redis.py``). A job's task is its batch, so a
subscription to the channels of the batches awaited tells the producer that a verdict was
stored the moment it was, where polling would see it at its next read.

The message is only a wake-up: the watcher reads the statuses as it always does
(``JobQueue.statuses_of``), and what the message carries is never looked at. Polling stays
the fallback, for what no message announces: a result stored before the subscription took
effect (a confirmed subscription is followed by a read), a connection that broke (messages
may have been lost with it), a verdict only the store has.

Nothing here can fail a request. A connection that cannot be opened or that breaks is
reported to the watcher, which polls as it would without wake-ups, and is opened again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import redis
import redis.asyncio.connection as aioredis
from celery.backends.redis import RedisBackend, SentinelBackend
from redis.exceptions import RedisError

log = logging.getLogger("appattest.producer")

# How long opening the connection (TCP, AUTH, SELECT, CLIENT SETNAME) may take.
_CONNECT_TIMEOUT: Final = 2.0
# The pause before opening a connection again after one failed or broke: the first, then
# doubling up to the last while it keeps failing.
_RECONNECT_FIRST: Final = 0.5
_RECONNECT_MAX: Final = 15.0
# A connection that served this long before it broke was healthy: the pauses start again.
_HEALTHY_SECONDS: Final = 30.0
# How long a connection with no channel to listen to stays open: light load leaves gaps
# between waits, and opening a connection for each would cost a handshake per request.
_IDLE_SECONDS: Final = 30.0
# The name the connection shows in CLIENT LIST.
CLIENT_NAME: Final = "appattest-api-wakeups"

_FAILURES: Final[tuple[type[BaseException], ...]] = (RedisError, OSError, TimeoutError)

# The options of the backend's (synchronous) connections that an asyncio connection takes too;
# socket_timeout is not one of them: a subscribed connection waits for messages indefinitely.
_CARRIED_OPTIONS: Final = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
    }
)
_ASYNC_CLASSES: Final[dict[type[Any] | None, type[aioredis.AbstractConnection]]] = {
    None: aioredis.Connection,
    redis.Connection: aioredis.Connection,
    redis.SSLConnection: aioredis.SSLConnection,
    redis.UnixDomainSocketConnection: aioredis.UnixDomainSocketConnection,
}


class ResultWakeups:
    """One pub/sub connection of an event loop, subscribed to the channels of exactly the
    batches ``want``-ed and not yet ``drop``-ped.

    ``on_wake(batch_id, stored)`` is called on the loop when a subscription to that batch's
    channel took effect (``stored`` False: its result may have been stored before, so read it
    now) and when its result was stored (``stored`` True). ``on_lost()`` is called when the
    connection broke: messages may have been lost, and until the subscriptions are back (each
    confirmed again through ``on_wake``) only polling sees results.

    Subscriptions change in a task of their own, so ``want`` and ``drop`` never wait on Redis.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[tuple[aioredis.AbstractConnection, int]]],
        prefix: bytes,
        *,
        on_wake: Callable[[str, bool], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._connect = connect
        self._prefix = prefix
        self._on_wake = on_wake
        self._on_lost = on_lost
        # Batch ids wanted, and the channels subscribed (or being subscribed) on the current
        # connection; the channels whose subscription may have to change.
        self._wanted: set[str] = set()
        self._sent: set[bytes] = set()
        self._changed: set[str] = set()
        # Batches whose subscription Redis confirmed on the current connection.
        self.subscribed: set[str] = set()
        self._live = False
        self._nudge = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # What happened, for tests and logs: result messages received, connections opened,
        # connections that could not be opened or broke; the current connection's CLIENT ID.
        self.messages = 0
        self.connections = 0
        self.failures = 0
        self.client_id: int | None = None

    @property
    def live(self) -> bool:
        """Whether the connection is open (its confirmed subscriptions are in effect)."""
        return self._live

    def covers(self, batch_ids: Iterable[str]) -> bool:
        """Whether a stored result of each of these batches will wake the watcher: the
        connection is open and every one of their subscriptions is confirmed."""
        return self._live and all(batch_id in self.subscribed for batch_id in batch_ids)

    def want(self, batch_id: str) -> None:
        """Subscribe to the channel of ``batch_id`` (soon; ``on_wake`` tells when it took
        effect)."""
        self._wanted.add(batch_id)
        self._changed.add(batch_id)
        self._nudge.set()
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._maintain())
            self._task.add_done_callback(self._ended)

    def drop(self, batch_id: str) -> None:
        """Unsubscribe from the channel of ``batch_id`` (soon)."""
        self._wanted.discard(batch_id)
        self._changed.add(batch_id)
        self._nudge.set()

    async def aclose(self) -> None:
        """Close the connection; wake-ups end for good."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("result wake-ups stopped", exc_info=task.exception())
        elif self._wanted and not self._closed:
            # Wanted again while the idle connection was closing.
            self._task = asyncio.get_running_loop().create_task(self._maintain())
            self._task.add_done_callback(self._ended)

    async def _maintain(self) -> None:
        """Open the connection while batches are wanted, keep its subscriptions in step, and
        open it again (after a pause) when it breaks; close it once idle."""
        pause = _RECONNECT_FIRST
        while True:
            if not self._wanted:
                self._nudge.clear()
                if not await self._nudged(_IDLE_SECONDS):
                    return
                continue
            try:
                connection, self.client_id = await asyncio.wait_for(
                    self._connect(), _CONNECT_TIMEOUT
                )
            except _FAILURES as exc:
                self.failures += 1
                log.warning(
                    "result wake-ups: cannot connect (%s); polling, retrying in %.1f s",
                    type(exc).__name__,
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RECONNECT_MAX)
                continue
            self.connections += 1
            opened = time.monotonic()
            try:
                await self._serve(connection)
            except _FAILURES as exc:
                self.failures += 1
                if time.monotonic() - opened >= _HEALTHY_SECONDS:
                    # It served a while: this break starts the pauses again from the first.
                    pause = _RECONNECT_FIRST
                log.warning(
                    "result wake-ups: the connection broke (%s); polling, reconnecting in %.1f s",
                    type(exc).__name__,
                    pause,
                )
                self._forget()
                self._on_lost()
            else:
                return  # idle for long enough: closed
            finally:
                self._forget()
                await connection.disconnect(nowait=True)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RECONNECT_MAX)

    def _forget(self) -> None:
        """The connection is gone, and its subscriptions with it."""
        self._live = False
        self.subscribed.clear()
        self._sent.clear()
        self.client_id = None

    async def _nudged(self, timeout: float) -> bool:
        """Whether ``want`` or ``drop`` was called (since the nudge was last cleared) within
        ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._nudge.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _serve(self, connection: aioredis.AbstractConnection) -> None:
        """Subscribe to every wanted channel, then follow ``want`` and ``drop`` until the
        connection breaks (raises) or nothing was wanted for ``_IDLE_SECONDS`` (returns)."""
        self._live = True
        self._changed = set(self._wanted)
        reader = asyncio.get_running_loop().create_task(self._read(connection))
        reader.add_done_callback(lambda _: self._nudge.set())
        try:
            while not reader.done():
                self._nudge.clear()
                await self._flush(connection)
                if self._wanted:
                    await self._nudge.wait()
                elif not await self._nudged(_IDLE_SECONDS) and not self._wanted:
                    return
            reader.result()  # raises what broke the connection
            raise ConnectionError("the pub/sub connection closed")
        finally:
            reader.cancel()

    async def _flush(self, connection: aioredis.AbstractConnection) -> None:
        """Send one SUBSCRIBE for the channels newly wanted and one UNSUBSCRIBE for those no
        longer wanted (never an UNSUBSCRIBE without channels: that would drop them all)."""
        subscribe: list[bytes] = []
        unsubscribe: list[bytes] = []
        for batch_id in self._changed:
            channel = self._prefix + batch_id.encode()
            if batch_id in self._wanted:
                if channel not in self._sent:
                    subscribe.append(channel)
            elif channel in self._sent:
                unsubscribe.append(channel)
        self._changed = set()
        commands: list[tuple[str | bytes, ...]] = []
        if subscribe:
            self._sent.update(subscribe)
            commands.append(("SUBSCRIBE", *subscribe))
        if unsubscribe:
            self._sent.difference_update(unsubscribe)
            commands.append(("UNSUBSCRIBE", *unsubscribe))
        if commands:
            await connection.send_packed_command(connection.pack_commands(commands))

    async def _read(self, connection: aioredis.AbstractConnection) -> None:
        """Follow the replies and messages of the connection until it breaks."""
        prefix = len(self._prefix)
        while True:
            reply = await connection.read_response()
            kind, channel = reply[0], reply[1]
            batch_id = channel[prefix:].decode()
            if kind == b"message":
                self.messages += 1
                if batch_id in self._wanted:
                    self._on_wake(batch_id, True)
            elif kind == b"subscribe":
                self.subscribed.add(batch_id)
                if batch_id in self._wanted:
                    self._on_wake(batch_id, False)
            elif kind == b"unsubscribe":
                self.subscribed.discard(batch_id)


def _connector(
    backend: RedisBackend,
) -> Callable[[], Awaitable[tuple[aioredis.AbstractConnection, int]]] | None:
    """How to open an asyncio connection to the server of ``backend``, with its address,
    database, credentials and TLS options; None for a kind of connection not known here."""
    params = dict(backend.connparams)
    connection_class = _ASYNC_CLASSES.get(params.get("connection_class"))
    if connection_class is None:
        return None
    options = {
        key: value
        for key, value in params.items()
        if key in _CARRIED_OPTIONS or (key.startswith("ssl_") and value is not None)
    }
    if options.get("socket_connect_timeout") is None:
        options["socket_connect_timeout"] = _CONNECT_TIMEOUT

    async def connect() -> tuple[aioredis.AbstractConnection, int]:
        """Open a connection; return it and its CLIENT ID."""
        # RESP2: messages come as plain replies (RESP3 would send them as push frames, which
        # redis-py hands to a handler of its own), and any Redis speaks it.
        connection = connection_class(
            **options, socket_timeout=None, client_name=CLIENT_NAME, protocol=2
        )
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            await connection.send_command("CLIENT", "ID")
            client_id = int(await connection.read_response())
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        return connection, client_id

    return connect


def result_wakeups(
    backend: object,
    *,
    on_wake: Callable[[str, bool], None],
    on_lost: Callable[[], None],
) -> ResultWakeups | None:
    """Wake-ups for the results stored in ``backend`` (see ``ResultWakeups``), or None when
    it announces none: a backend other than Celery's Redis backend (the database backend of
    the embedded default, for one), or a Redis reached through Sentinel, where a subscription
    would have to follow the master's failovers."""
    if not isinstance(backend, RedisBackend) or isinstance(backend, SentinelBackend):
        return None
    connect = _connector(backend)
    prefix = backend.task_keyprefix
    sample = "batch-0"
    if connect is None or backend.get_key_for_task(sample) != prefix + sample.encode():
        return None
    return ResultWakeups(connect, prefix, on_wake=on_wake, on_lost=on_lost)
