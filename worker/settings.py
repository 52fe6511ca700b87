"""Settings of the service, read from environment variables prefixed ``APPATTEST_``.

Nothing reads them at import time: ``load_settings()`` is called by the entry points and the
result is passed to ``create_app(settings)`` and ``create_celery_app(settings)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.core import Policy, PolicyError, PolicySpec, parse_bundle_version
from worker.core.integrity import (
    AndroidApp,
    AndroidPolicy,
    AppRecognition,
    DeviceLevel,
    parse_certificate_digest,
)
from worker.core.refreshed import APPLE_DATA_DEVELOPMENT_URL, APPLE_DATA_URL
from worker.queue.play_integrity import PLAY_INTEGRITY_URL
from worker.store.db import DEFAULT_STORE_URL


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


_CATEGORY = Annotated[int, Field(ge=0, le=2**32 - 1)]


def _check_bundle_version(value: str | None) -> str | None:
    if value is not None and parse_bundle_version(value) is None:
        raise ValueError(
            f"{value!r} is not a bundle version (one to three period-separated non-negative "
            "integers, such as 2.0)"
        )
    return value


class AppPolicy(BaseModel):
    """One App ID's own rules for the iOS 27 extensions (``APPATTEST_APP_POLICIES``); each rule
    it gives replaces the global one for that app, the others stay global. An explicit null
    means every category, or no minimum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_validation_categories: list[_CATEGORY] | None = None
    min_bundle_version: str | None = None
    require_extensions: bool = False

    _version = field_validator("min_bundle_version")(_check_bundle_version)


class AndroidAppSettings(BaseModel):
    """One Android app's policy as written in ``APPATTEST_ANDROID_APPS`` (camelCase keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    certificate_digests: list[str] = Field(alias="certificateDigests", min_length=1)
    app_recognition: AppRecognition = Field(
        default=AppRecognition.PLAY_RECOGNIZED, alias="appRecognition"
    )
    device_level: DeviceLevel = Field(
        default=DeviceLevel.MEETS_DEVICE_INTEGRITY, alias="deviceLevel"
    )
    require_licensed: bool = Field(default=True, alias="requireLicensed")
    max_age_seconds: int = Field(default=300, ge=1, le=86_400, alias="maxAgeSeconds")
    min_version_code: int | None = Field(default=None, ge=0, alias="minVersionCode")

    def build(self, package_name: str) -> AndroidApp:
        """The core's policy of this app; raises ``PolicyError`` for a bad name or digest."""
        return AndroidApp(
            package_name=package_name,
            certificate_digests=frozenset(
                parse_certificate_digest(d) for d in self.certificate_digests
            ),
            app_recognition=self.app_recognition,
            device_level=self.device_level,
            require_licensed=self.require_licensed,
            max_age=timedelta(seconds=self.max_age_seconds),
            min_version_code=self.min_version_code,
        )


class Settings(BaseSettings):
    """Every knob of the producer and the worker."""

    model_config = SettingsConfigDict(env_prefix="APPATTEST_", extra="ignore", frozen=True)

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    store_url: str = DEFAULT_STORE_URL

    app_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    dev_app_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)
    root_ca: Path | None = None
    # Rules for the iOS 27 authenticator-data extensions (see worker.core.policy.ExtensionRules):
    # None allows every validation category and sets no minimum bundle version.
    allowed_validation_categories: Annotated[list[_CATEGORY] | None, NoDecode] = None
    min_bundle_version: str | None = None
    require_extensions: bool = False
    # Per App ID, JSON: {"TEAMID.bundle.id": {"min_bundle_version": "3.0", ...}}.
    app_policies: Annotated[dict[str, AppPolicy], NoDecode] = Field(default_factory=dict)

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
    # Per producer process: how long the first of the single submissions (POST /v1/attestations
    # or /v1/assertions) arriving together waits for others to share its message. A request
    # with ?wait while no other wait is in progress in the process is sent at once.
    batch_window_seconds: float = Field(default=0.002, ge=0, le=60, allow_inf_nan=False)

    # --- Operating it (metrics, logs, events, retention) -----------------------------------
    # The producer's GET /metrics (no API key); false turns the route off (404).
    metrics_enabled: bool = True
    # The port a worker serves its metrics on (all its processes aggregated); None: off.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Log lines as JSON objects (one per line) or as text, for api, worker and serve.
    log_format: Literal["text", "json"] = "text"
    # One INFO line per decided job (its ids, kind, App ID, reason): 20 to 40 us of worker
    # CPU per job as text, 40 to 60 as JSON (a job costs 300 us and more); false: none.
    log_verdicts: bool = True
    # Celery's task events (sent, received, started, succeeded...), for Flower and exporters.
    celery_events: bool = True
    # Verdict rows older than this many days are purged; 0 keeps them forever.
    verdict_retention_days: int = Field(default=30, ge=0, le=36_500)
    # Challenges are purged this long after they expired (a job still queued with one gets
    # challenge_expired, not challenge_unknown, within it).
    challenge_purge_grace_seconds: int = Field(default=3600, ge=0, le=30 * 86_400)
    # How often a worker runs the purge (one worker at a time), and the rows per transaction.
    purge_interval_seconds: float = Field(default=600.0, gt=0, le=86_400, allow_inf_nan=False)
    purge_batch_size: int = Field(default=1000, ge=1, le=100_000)
    # --- end of operating settings ---------------------------------------------------------

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

    # Android (Google Play Integrity). The apps, as JSON keyed by package name,
    # {"com.example.app": {"certificateDigests": ["AB:CD:..."], "deviceLevel": ...}}, or the
    # path of a file holding that JSON.
    android_apps: Annotated[dict[str, AndroidAppSettings], NoDecode] = Field(default_factory=dict)
    # The Google Cloud service account's JSON key, which may decode the apps' tokens, and the
    # Play Integrity API's base URL.
    google_credentials_file: Path | None = None
    play_integrity_url: str = PLAY_INTEGRITY_URL
    # One call to Google: its timeout, and how many attempts a decode makes (429, 5xx, a
    # timeout or a network error are tried again with jittered backoff; after the last the
    # job's verdict is internal_error and its challenge stays unused).
    play_integrity_timeout_seconds: float = Field(default=10.0, gt=0, le=120, allow_inf_nan=False)
    play_integrity_attempts: int = Field(default=4, ge=1, le=10)
    # Per worker process: concurrent calls to Google (threads and pooled connections).
    play_integrity_concurrency: int = Field(default=32, ge=1, le=1000)

    @field_validator("android_apps", mode="before")
    @classmethod
    def _json_or_file(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text.startswith("{"):
            try:
                text = Path(text).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"neither JSON nor a readable JSON file: {exc}") from exc
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from exc

    @model_validator(mode="after")
    def _android_is_complete(self) -> Settings:
        # Built here so that a bad package name or digest stops the process at start.
        try:
            self.android_policy()
        except PolicyError as exc:
            raise ValueError(f"APPATTEST_ANDROID_APPS: {exc}") from exc
        if self.android_apps and self.google_credentials_file is None:
            raise ValueError(
                "APPATTEST_ANDROID_APPS needs APPATTEST_GOOGLE_CREDENTIALS_FILE: only Google "
                "can decode Play Integrity tokens"
            )
        if not self.play_integrity_url.startswith(("https://", "http://")):
            raise ValueError("APPATTEST_PLAY_INTEGRITY_URL is not an http(s) URL")
        return self

    def android_policy(self) -> AndroidPolicy:
        """The Android apps these settings accept (possibly none)."""
        return AndroidPolicy.build(
            app.build(package_name) for package_name, app in self.android_apps.items()
        )

    @field_validator("app_ids", "dev_app_ids", "api_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("allowed_validation_categories", mode="before")
    @classmethod
    def _categories(cls, value: object) -> object:
        # An empty variable is the default (every category), not "no category at all".
        return (_split_csv(value) or None) if isinstance(value, str) else value

    _version = field_validator("min_bundle_version")(_check_bundle_version)

    @field_validator("app_policies", mode="before")
    @classmethod
    def _app_policies(cls, value: object) -> object:
        # Read here rather than by pydantic-settings, whose error for bad JSON names neither
        # the variable nor the problem.
        if not isinstance(value, str):
            return value
        if not value.strip():
            return {}
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                "APPATTEST_APP_POLICIES must be a JSON object keyed by App ID, such as "
                f'{{"TEAMID.bundle.id": {{"min_bundle_version": "2.0"}}}}: {exc}'
            ) from exc

    def policy_spec(
        self,
        *,
        distrusted_certificates: Iterable[str] = (),
        distrusted_key_ids: Iterable[str] = (),
    ) -> PolicySpec:
        """The verification policy these settings describe, as configuration (normalized);
        ``distrusted_*`` are a re-verification run's lists. Raises OSError when the root
        certificate file cannot be read."""
        categories = self.allowed_validation_categories
        return PolicySpec(
            app_ids=tuple(self.app_ids),
            dev_app_ids=tuple(self.dev_app_ids),
            root_pem=self.root_ca.read_text() if self.root_ca is not None else None,
            distrusted_certificates=tuple(distrusted_certificates),
            distrusted_key_ids=tuple(distrusted_key_ids),
            allowed_validation_categories=None if categories is None else tuple(categories),
            min_bundle_version=self.min_bundle_version,
            require_extensions=self.require_extensions,
            app_rules={
                app_id: rules.model_dump(exclude_unset=True)
                for app_id, rules in self.app_policies.items()
            },
        ).normalized()

    def policy(self) -> Policy:
        """The verification policy these settings describe; fails closed when incomplete
        (``ValueError`` subclasses, or OSError for an unreadable root certificate)."""
        return self.policy_spec().build()


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit overrides taking precedence."""
    return Settings(**overrides)  # type: ignore[arg-type]
