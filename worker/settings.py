"""Settings of the service, read from environment variables prefixed ``APPATTEST_``.

Nothing reads them at import time: ``load_settings()`` is called by the entry points and the
result is passed to ``create_app(settings)`` and ``create_celery_app(settings)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.core import Policy, TrustStore
from worker.core.refreshed import APPLE_DATA_DEVELOPMENT_URL, APPLE_DATA_URL
from worker.store.db import DEFAULT_STORE_URL


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the producer and the worker."""

    model_config = SettingsConfigDict(env_prefix="APPATTEST_", extra="ignore", frozen=True)

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    store_url: str = DEFAULT_STORE_URL

    app_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    dev_app_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    root_ca: Path | None = None

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    challenge_ttl_seconds: int = Field(default=300, ge=1, le=86_400)
    result_ttl_seconds: int = Field(default=86_400, ge=60)
    # How long an Idempotency-Key answers with the job it first created.
    idempotency_ttl_seconds: int = Field(default=86_400, ge=60, le=30 * 86_400)
    max_wait_seconds: float = Field(default=30.0, gt=0, le=120)
    max_body_bytes: int = Field(default=192 * 1024, ge=1024)
    # Per producer process: the request bodies held at once (each counted by its
    # Content-Length, or its route's limit when chunked, until its request ends).
    max_body_bytes_in_flight: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_batch_jobs: int = Field(default=1000, ge=1, le=10_000)
    # Per API key, per producer process (each process enforces its own share).
    rate_limit_per_second: float = Field(default=1000.0, gt=0, allow_inf_nan=False)
    rate_limit_burst: int = Field(default=2000, ge=1)

    # How long a delivered but unacknowledged message waits before the Redis broker hands it
    # to another worker: what bounds the delay of a job whose worker was killed outright.
    visibility_timeout_seconds: int = Field(default=120, ge=1, le=86_400)
    # Redis broker only (see worker.queue.ledger): how often a worker looks for accepted jobs whose
    # message was lost, and how old such a job must be before it is published again.
    ledger_sweep_seconds: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    ledger_resend_seconds: float = Field(default=60.0, gt=0, le=86_400, allow_inf_nan=False)
    # Loaded device public keys kept per worker process (about 2 KiB each; 0 turns it off):
    # a device asserting again skips loading its key, about a fifth of an assertion's cost.
    # (The service's own default is the same; settings never import the service layer.)
    public_key_cache_size: int = Field(default=50_000, ge=0, le=10_000_000)
    task_max_retries: int = Field(default=5, ge=0, le=50)
    task_retry_backoff_max: int = Field(default=30, ge=1)

    # The producer's defences against callers that hold its memory, time or connections (see
    # producer.middleware and producer.server). A request's whole body must arrive within
    # body_timeout_seconds, and its head (request line and headers) within
    # header_timeout_seconds of the connection opening or of the previous answer.
    body_timeout_seconds: float = Field(default=10.0, gt=0, le=300, allow_inf_nan=False)
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300, allow_inf_nan=False)
    # Per client address, per producer process: open connections (under `appattest api` and
    # `appattest serve`) and requests in progress (under any server).
    max_connections_per_client: int = Field(default=128, ge=1, le=100_000)
    # Per API key, per producer process: how many job ids the key's requests may be waiting
    # on (?wait) at once. One request asking for more is admitted only when the key has no
    # other wait in progress.
    max_waits_per_key: int = Field(default=5000, ge=1, le=1_000_000)

    # Apple's fraud-metric service (see worker.service.receipts): the team's DeviceCheck key
    # (team id, 10-character key id, the .p8 file), the service's URLs (tests point them at a
    # local fake), the root receipts must chain to (Apple Root CA - G3 unless a test root is
    # given explicitly), a rate limit shared by every worker (kept in Redis), how often a key
    # is refreshed, and the optional policy refusing assertions of keys above a risk metric.
    apple_team_id: str | None = None
    apple_key_id: str | None = None
    apple_private_key_file: Path | None = None
    apple_data_url: str = APPLE_DATA_URL
    apple_data_development_url: str = APPLE_DATA_DEVELOPMENT_URL
    apple_timeout_seconds: float = Field(default=10.0, gt=0, le=120, allow_inf_nan=False)
    receipt_root_ca: Path | None = None
    apple_rate_limit_per_second: float = Field(default=20.0, gt=0, le=10_000, allow_inf_nan=False)
    apple_rate_limit_burst: int = Field(default=20, ge=1, le=10_000)
    receipt_refresh_interval_seconds: int = Field(default=86_400, ge=60, le=30 * 86_400)
    max_risk_metric: int | None = Field(default=None, ge=0)
    # The Redis holding the shared rate limit and the periodic refresh's lock (default: the
    # broker's Redis, else the result backend's; without Redis each worker limits itself).
    apple_rate_limit_redis_url: str | None = None
    # How often a batch's keys that Apple asked to retry later (429, 5xx, network) are tried
    # again by their task before the run records them as retry_later (they stay due).
    receipt_refresh_retries: int = Field(default=5, ge=0, le=50)
    # The periodic refresh: every this many seconds one worker (a lock in Redis) hands the
    # due keys, at most receipt_refresh_max_keys of them, to the receipts queue. Unset: off.
    receipt_refresh_schedule_seconds: float | None = Field(
        default=None, gt=0, le=86_400, allow_inf_nan=False
    )
    receipt_refresh_max_keys: int = Field(default=100_000, ge=1, le=10_000_000)
    # Threads of the I/O pool serving the receipts queue (exchanges wait on Apple).
    receipt_refresh_threads: int = Field(default=16, ge=1, le=512)

    def apple_configured(self) -> bool:
        """Whether the DeviceCheck key that receipt refreshes need is configured."""
        return bool(self.apple_team_id and self.apple_key_id and self.apple_private_key_file)

    def rate_limit_redis_url(self) -> str | None:
        """The Redis of the shared rate limit towards Apple (see apple_rate_limit_redis_url)."""
        if self.apple_rate_limit_redis_url:
            return self.apple_rate_limit_redis_url
        for url in (self.broker_url, self.result_backend):
            if url.startswith(("redis://", "rediss://")):
                return url
        return None

    @field_validator("app_ids", "dev_app_ids", "api_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    def policy(self) -> Policy:
        """The verification policy these settings describe; fails closed when incomplete."""
        trust = (
            TrustStore.replacing_apple_root(self.root_ca.read_bytes())
            if self.root_ca is not None
            else TrustStore.apple()
        )
        return Policy.build(
            trust=trust, production_apps=self.app_ids, development_apps=self.dev_app_ids
        )


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit overrides taking precedence."""
    return Settings(**overrides)  # type: ignore[arg-type]
