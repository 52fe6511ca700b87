"""Builds the receipt refresh service from the settings, for the adapters that run it.

The queue adapter (a Celery task on its own I/O queue), the CLI and the periodic task each call
``build_refresher`` once per process and ``refresher.refresh_batch(key_ids)`` per batch.
"""

from __future__ import annotations

from datetime import timedelta

import redis
from sqlalchemy.orm import Session, sessionmaker

from worker.core.receipt import ReceiptTrustStore
from worker.service.apple import AppleToken, ReceiptExchange
from worker.service.apple_rate import LocalTokenBucket, RateLimit, RedisTokenBucket
from worker.service.receipts import ReceiptRefresher
from worker.service.refresh_runs import RefreshRunner
from worker.settings import Settings


class RefreshNotConfigured(Exception):
    """The settings lack what talking to Apple needs (team id, key id, .p8 file)."""


def receipt_trust(settings: Settings) -> ReceiptTrustStore:
    """Apple Root CA - G3, or the test root given explicitly by ``receipt_root_ca``."""
    if settings.receipt_root_ca is None:
        return ReceiptTrustStore.apple()
    return ReceiptTrustStore.replacing_apple_root(settings.receipt_root_ca.read_bytes())


def rate_limit(settings: Settings, client: redis.Redis | None) -> RateLimit:
    """The token bucket towards Apple: in ``client`` (shared by every worker), or in this
    process when there is no Redis."""
    rate, burst = settings.apple_rate_limit_per_second, settings.apple_rate_limit_burst
    if client is None:
        return LocalTokenBucket(rate=rate, burst=burst)
    return RedisTokenBucket(client, rate=rate, burst=burst)


def redis_client(settings: Settings) -> redis.Redis | None:
    """A client of the Redis that holds the shared rate limit and the schedule's lock."""
    url = settings.rate_limit_redis_url()
    return None if url is None else redis.Redis.from_url(url, socket_timeout=5.0)


def build_runner(
    settings: Settings, *, sessions: sessionmaker[Session], client: redis.Redis | None
) -> tuple[RefreshRunner, ReceiptExchange]:
    """The run-aware refresher of a worker process (see ``build_refresher``)."""
    refresher, exchange = build_refresher(settings, sessions=sessions, client=client)
    return RefreshRunner(sessions=sessions, refresher=refresher), exchange


def build_refresher(
    settings: Settings, *, sessions: sessionmaker[Session], client: redis.Redis | None
) -> tuple[ReceiptRefresher, ReceiptExchange]:
    """The refresher and the HTTP client it uses (close it when the process ends).

    ``client`` is the Redis that holds the rate limit every worker shares. Raises
    ``RefreshNotConfigured`` when the DeviceCheck key is not configured, ``ValueError`` for a
    key file that is not a P-256 key.
    """
    team, kid, path = settings.apple_team_id, settings.apple_key_id, settings.apple_private_key_file
    if not team or not kid or path is None:
        raise RefreshNotConfigured(
            "APPATTEST_APPLE_TEAM_ID, APPATTEST_APPLE_KEY_ID and "
            "APPATTEST_APPLE_PRIVATE_KEY_FILE are required to refresh receipts"
        )
    token = AppleToken.from_p8(team_id=team, key_id=kid, pem=path.read_bytes())
    exchange = ReceiptExchange(
        token=token,
        production_url=settings.apple_data_url,
        development_url=settings.apple_data_development_url,
        timeout=settings.apple_timeout_seconds,
        max_connections=max(32, settings.receipt_refresh_threads),
    )
    refresher = ReceiptRefresher(
        sessions=sessions,
        exchange=exchange,
        trust=receipt_trust(settings),
        limit=rate_limit(settings, client),
        interval=timedelta(seconds=settings.receipt_refresh_interval_seconds),
    )
    return refresher, exchange
