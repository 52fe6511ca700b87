"""Private Redis and PostgreSQL servers that fault-injection tests may stop and start at will.

Each server listens on a free port of 127.0.0.1 and keeps its files in its own temporary
directory, so stopping it never disturbs the shared servers (or another test session). Every
start and stop waits with a deadline, and the context managers always clean up: they kill the
server's processes and remove its directory, also when the test fails.

PostgreSQL refuses to run as root: when the tests run as root, ``initdb``, ``pg_ctl`` and the
server run as the ``postgres`` user (through ``runuser``), in a directory owned by that user.

``serve_app`` runs the producer's ASGI app in a real uvicorn server on a free port, in a thread
of the test process, so that its logs reach pytest's log capture.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import uvicorn
from sqlalchemy import create_engine, text

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class ServerUnavailable(RuntimeError):
    """The server's programs are not installed, or it could not be started."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# Redis --------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A ``redis-server`` on ``port``, restartable on the same port with the same files.

    With ``persistent`` the server keeps an append-only file fsynced after every write, so a
    restart (even after SIGKILL) finds every queued message again; without it, it keeps
    nothing, like the shared test server.
    """

    port: int
    directory: Path
    persistent: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://{HOST}:{self.port}/{db}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerUnavailable("redis-server is not installed")
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            *persistence,
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
        ]

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the server answers PING (not while it is still loading its files)."""
        client = redis.Redis(
            host=HOST, port=self.port, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        self.process = subprocess.Popen(
            self._command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerUnavailable(
                    f"redis-server exited with {self.process.returncode}:\n{_tail(self.log_path)}"
                )
            if self.ping():
                return
            time.sleep(0.05)
        self.stop(kill=True)
        raise ServerUnavailable(f"redis-server did not answer within {timeout} s")

    def stop(self, *, kill: bool = False, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server: SIGTERM (a clean shutdown) or, with ``kill``, SIGKILL (a crash)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def redis_server(*, persistent: bool = False) -> Iterator[RedisServer]:
    """A started private Redis server; killed and its directory removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="appattest-redis-"))
    server = RedisServer(port=free_port(), directory=directory, persistent=persistent)
    try:
        server.start()
        yield server
    finally:
        server.stop(kill=True)
        shutil.rmtree(directory, ignore_errors=True)


# PostgreSQL ---------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: ``APPATTEST_TEST_PG_BINDIR``, the ``PATH``, or the
    newest ``/usr/lib/postgresql/*/bin`` (Debian does not put them on the ``PATH``)."""
    configured = os.environ.get("APPATTEST_TEST_PG_BINDIR")
    candidates = [Path(configured)] if configured else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    candidates += [
        Path(p)
        for p in sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
            reverse=True,
        )
    ]
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise ServerUnavailable("the PostgreSQL server programs (initdb, pg_ctl) are not installed")


@dataclass
class PostgresServer:
    """A PostgreSQL cluster of its own: ``initdb`` into a temporary directory, served on
    ``port`` of 127.0.0.1 with trust authentication, stopped and started with ``pg_ctl``."""

    port: int
    root: Path
    bindir: Path
    settings: Mapping[str, str] = field(default_factory=dict)
    run_as: str | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{database}"

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        # The server must not inherit the caller's PG* variables (a PGPORT would win over -p).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    def init(self) -> None:
        """Create the cluster: superuser ``postgres``, trust authentication (local and TCP)."""
        result = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
            timeout=120,
        )
        if result.returncode != 0:
            raise ServerUnavailable(f"initdb failed: {result.stderr.strip()[-2000:]}")

    @property
    def running(self) -> bool:
        status = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status", timeout=10)
        # pg_ctl status exits 0 while the server runs, 3 when it does not.
        return status.returncode == 0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until it accepts connections."""
        options = [
            f"-p {self.port}",
            f"-k {self.root}",
            f"-c listen_addresses={HOST}",
            # The data dies with the test: no need to survive an operating system crash.
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            *(f"-c {name}={value}" for name, value in self.settings.items()),
        ]
        result = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-o",
            " ".join(options),
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )
        if result.returncode != 0:
            raise ServerUnavailable(
                f"pg_ctl start failed: {result.stderr.strip()}\n{_tail(self.log_path)}"
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``SELECT 1`` succeeds over TCP."""
        engine = create_engine(self.url(), connect_args={"connect_timeout": 2})
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    with engine.connect() as connection:
                        connection.execute(text("SELECT 1"))
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            engine.dispose()

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (``fast``: roll back open transactions, disconnect everyone) and wait
        until it is gone."""
        result = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            "stop",
            timeout=timeout + 10,
        )
        if result.returncode != 0 and self.running:
            raise RuntimeError(f"pg_ctl stop failed: {result.stderr.strip()}")

    def kill(self) -> None:
        """Make sure no server process is left, whatever state it is in."""
        with contextlib.suppress(Exception):
            self.stop(mode="immediate", timeout=15)
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)

    def create_database(self, name: str) -> str:
        """Create a database; return its URL."""
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)


@contextmanager
def postgres_server(*, settings: Mapping[str, str] | None = None) -> Iterator[PostgresServer]:
    """A started private PostgreSQL cluster; killed and its directory removed on exit.

    ``settings`` are extra server settings (``-c name=value``).
    """
    bindir = postgres_bindir()
    run_as = "postgres" if os.geteuid() == 0 else None
    # Under /tmp, not pytest's tmp_path: that is private to the test user, and the server runs
    # as ``postgres``. The path stays short, as a Unix socket path must.
    root = Path(tempfile.mkdtemp(prefix="appattest-pg-"))
    server = PostgresServer(
        port=free_port(), root=root, bindir=bindir, settings=dict(settings or {}), run_as=run_as
    )
    try:
        if run_as is not None:
            shutil.chown(root, user=run_as, group=run_as)
        server.init()
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


# The producer -------------------------------------------------------------------------------


@contextmanager
def serve_app(app: Any, *, log_level: str = "warning", access_log: bool = False) -> Iterator[str]:
    """Run an ASGI ``app`` in a uvicorn server on a free port of 127.0.0.1 (in a thread of this
    process, so its logs reach pytest's log capture); yield its base URL."""
    config = uvicorn.Config(
        app,
        host=HOST,
        port=0,
        log_level=log_level,
        access_log=access_log,
        log_config=None,
        ws="none",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
