"""The embedded broker's transport: kombu's SQLAlchemy transport, polled more often.

kombu 5.7 hands every transport option to ``create_engine``, so ``polling_interval`` cannot
be passed as an option (SQLAlchemy refuses it); this subclass sets it instead. Polling every
50 ms bounds the queueing delay a single job sees in embedded mode.
"""

from __future__ import annotations

from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport


class Transport(SQLAlchemyTransport):
    """SQLAlchemy transport polling every 50 ms."""

    polling_interval = 0.05
