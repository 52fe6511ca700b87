"""kombu's Redis transport, with one fix: a channel closed after its connection was closed
fails with a connection error, which Celery ignores, instead of an AttributeError, which
ends the worker (``Unrecoverable error: AttributeError("'NoneType' object has no attribute
'hostname'")``).

How it happens (kombu 5.7). Redis dies while a channel of the worker's connection waits for
a message (a BRPOP in flight) and holds an unacknowledged one. Celery's consumer then calls
``connection.collect()`` and ``connection.close()``:

1. ``collect()`` closes the default channel. ``Channel.close()`` first reads the reply of the
   BRPOP in flight, which raises ConnectionError; the channel is left open (ignored as a
   connection error). It then closes every channel of the transport, but stops at the first
   that raises ConnectionError, so the default channel may not be closed a second time.
   Finally it detaches the transport: ``transport.client = None``.
2. ``close()`` closes the default channel again. Nothing is in flight now, so it goes on to
   restore the unacknowledged message, which needs a new connection pool, whose parameters
   are read from ``transport.client``: None. The AttributeError is not a connection error,
   so ``ignore_errors`` lets it through ``Consumer.start`` and the worker exits.

Here a channel whose transport is detached raises ConnectionError when it needs a
connection. The unacknowledged message stays in the broker's unacknowledged set, as when
Redis refuses the restore, and comes back when its visibility timeout passed.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        connection = self.connection
        if connection is None or connection.client is None:
            raise RedisConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    Channel = Channel
