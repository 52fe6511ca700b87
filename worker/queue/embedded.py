"""The embedded default's worker side: the data folder, its lock, and the settings a worker
started beside the HTTP producer shares (``appattest.serve`` composes the two).

The key store, the broker and the result backend are SQLite files in one data folder (the
broker through kombu's SQLAlchemy transport, results through Celery's database backend). Any
of them can be switched to a server (Redis, PostgreSQL) with the usual ``APPATTEST_*``
variables; only the ones left unset are embedded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

from pydantic import BaseModel, SecretStr

from worker.settings import Settings

log = logging.getLogger("appattest.serve")

LOCK_FILE = "serve.lock"


class DataDirInUse(RuntimeError):
    """Another ``appattest serve`` holds the data directory."""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[int]:
    """Hold ``data_dir`` for the length of the block: an exclusive ``flock`` on its lock file;
    yields the file descriptor. The kernel releases the lock once every process holding the
    descriptor exited, however it exited (``serve`` passes it to its worker, so that the lock
    lasts until the worker is gone too). Raises DataDirInUse when another process holds it.

    Two servers on one data directory would share its queue while each ran a worker with
    its own settings (App IDs, root): one server's jobs would be decided by the other's
    worker.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirInUse(
                f"the data directory {str(data_dir.resolve())!r} is in use by another "
                f"appattest serve (pid {holder}) or its worker; stop it, or give another "
                "--data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def embedded_overrides(data_dir: Path, environ: Mapping[str, str]) -> dict[str, object]:
    """Settings that point at SQLite files in ``data_dir``, for those the environment leaves
    unset."""
    data_dir = data_dir.resolve()
    defaults = {
        "store_url": ("APPATTEST_STORE_URL", f"sqlite:///{data_dir / 'keys.db'}"),
        "broker_url": ("APPATTEST_BROKER_URL", f"sqla+sqlite:///{data_dir / 'broker.db'}"),
        "result_backend": ("APPATTEST_RESULT_BACKEND", f"db+sqlite:///{data_dir / 'results.db'}"),
    }
    return {name: value for name, (var, value) in defaults.items() if not environ.get(var)}


def ensure_api_key(settings: Settings) -> tuple[Settings, str | None]:
    """Settings with at least one API key; returns the generated key when one was made."""
    if settings.api_keys:
        return settings, None
    key = secrets.token_urlsafe(32)
    return settings.model_copy(update={"api_keys": [SecretStr(key)]}), key


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_env_value(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, default=_json_value)
    return str(value)


def _json_value(value: object) -> object:
    # A model inside a mapping setting (an App ID's own policy, APPATTEST_APP_POLICIES) is
    # written with the fields it was given only: a rule it leaves out stays the global one.
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    raise TypeError(f"{type(value).__name__} is not a setting value")


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment for a worker subprocess that shares these settings, all of them: every
    field as its ``APPATTEST_*`` variable (a field left unset, None, stays unset), and no
    other ``APPATTEST_*`` variable of this process. ``Settings`` read from it equal
    ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    prefix = Settings.model_config.get("env_prefix", "")
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"{prefix}{name}".upper()] = _env_value(value)
    return env
