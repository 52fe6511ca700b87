"""Keep a worker running: ``appattest worker`` runs the Celery worker as a child process and
starts it again when it dies, so that a bare deployment recovers on its own as one under a
container restart policy does.

A Celery worker can exit on an error it does not recover from (kombu's Redis transport has
been seen to end one with ``Unrecoverable error: AttributeError`` while restoring
unacknowledged messages after Redis died), and it can be killed. Nothing it held is lost: its
messages are unacknowledged and come back to the queue (``task_acks_late``), and a job id is
decided once. What was missing is a process that starts it again.

The rules:

- A child that exits non-zero or is killed by a signal is started again after a delay that
  doubles with each failure in a row, up to a cap; a child that ran long enough to count as
  healthy resets the delay. Each restart is logged with the reason: the exit status or the
  signal, and the child's last ``CRITICAL`` log line when it wrote one.
- A child that exits with status 0 stopped on purpose (someone sent it SIGTERM): the
  supervisor exits too.
- SIGTERM, SIGINT and SIGQUIT sent to the supervisor are forwarded to the child once, and the
  supervisor exits when the child did; it never restarts it then. The child runs in a process
  group of its own, so that Ctrl+C at a terminal reaches it once (through the supervisor) and
  not twice (which would make Celery's shutdown a cold one).
- No orphan: when the supervisor is done, or before it restarts a child, it kills what is left
  of the child's process group (pool processes of a worker that was killed). The child is
  started with ``--parent-pid`` and stops when the supervisor is gone (``stop_with_parent``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Final

log = logging.getLogger("appattest.supervise")

FORWARDED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# prctl(2): ask the kernel for a signal when the thread that started this process exits.
_PR_SET_PDEATHSIG: Final = 1


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts: ``first`` seconds after the first failure, doubling after each
    further failure in a row, never more than ``cap``; a child that ran ``healthy_after``
    seconds or more resets the count."""

    first: float = 1.0
    cap: float = 60.0
    healthy_after: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap or self.healthy_after < 0:
            raise ValueError("restart delays need 0 < first <= cap and healthy_after >= 0")

    def delay(self, failures: int) -> float:
        """The delay before the restart that follows ``failures`` failures in a row (>= 1)."""
        # The exponent is bounded so that a long outage cannot overflow the float.
        return min(self.cap, self.first * float(2 ** min(max(failures - 1, 0), 64)))


def describe_exit(returncode: int) -> str:
    """``exited with status N`` or ``was killed by SIGNAME``, for a Popen return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class Supervisor:
    """Runs ``command`` as a child process and restarts it when it fails (see the module)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        backoff: Backoff,
        env: dict[str, str] | None = None,
        stop_timeout: float = 30.0,
    ) -> None:
        self.command = list(command)
        self.backoff = backoff
        self.env = env
        self.stop_timeout = stop_timeout
        self._child: subprocess.Popen[bytes] | None = None
        self._relay_thread: threading.Thread | None = None
        self._stop_signal: int | None = None
        self._signalled: int | None = None  # the pid the stop signal was forwarded to
        self._last_critical: str | None = None

    def run(self) -> int:
        """Supervise until the child stops on purpose or the supervisor is told to stop; return
        the exit status for the supervisor: the child's (128 + signal number when it was
        killed by one)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._reap()

    def _loop(self) -> int:
        failures = 0
        while True:
            started = time.monotonic()
            child = self._start()
            returncode = self._wait(child)
            ran = time.monotonic() - started
            self._kill_group(child)
            if self._stop_signal is not None:
                log.info("worker process %d %s after the stop signal", child.pid, _exit(child))
                return _status(returncode)
            if returncode == 0:
                log.warning("worker process %d stopped (status 0); not restarting", child.pid)
                return 0
            failures = 1 if ran >= self.backoff.healthy_after else failures + 1
            delay = self.backoff.delay(failures)
            log.warning(
                "worker process %d %s after %.1f s; restarting it in %.1f s "
                "(failure %d in a row)%s",
                child.pid,
                describe_exit(returncode),
                ran,
                delay,
                failures,
                f"; its last critical log line: {self._last_critical}"
                if self._last_critical
                else "",
            )
            if self._sleep(delay):
                log.info("stop signal during the restart delay; not restarting")
                return _status(returncode)

    def _start(self) -> subprocess.Popen[bytes]:
        self._last_critical = None
        # A process group of its own: the child's pool processes can be killed with it, and a
        # signal a terminal sends to the supervisor's group does not reach the child directly.
        child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.command, env=self.env, stderr=subprocess.PIPE, process_group=0
        )
        self._child = child
        assert child.stderr is not None
        self._relay_thread = threading.Thread(
            target=self._relay, args=(child.stderr,), name="relay-stderr", daemon=True
        )
        self._relay_thread.start()
        log.info("worker process %d started", child.pid)
        return child

    def _relay(self, stream: IO[bytes]) -> None:
        """Copy the child's standard error to ours line by line, remembering its last
        CRITICAL line (Celery's "Unrecoverable error: ..." before it exits)."""
        out = sys.stderr.buffer
        with stream:
            for line in iter(stream.readline, b""):
                if b" CRITICAL " in line:
                    self._last_critical = line.decode(errors="replace").strip()[-300:]
                with contextlib.suppress(OSError, ValueError):
                    out.write(line)
                    out.flush()

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        """Wait for the child; once a stop signal was forwarded, wait ``stop_timeout`` at
        most, then kill its group."""
        while True:
            if self._stop_signal is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return child.wait(timeout=0.5)
                continue
            log.info("%s received: stopping the worker", signal.Signals(self._stop_signal).name)
            # A signal that came while the child was being started has not reached it yet.
            self._forward()
            try:
                return child.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker process %d did not stop within %.0f s; killing it",
                    child.pid,
                    self.stop_timeout,
                )
                self._kill_group(child)
                return child.wait()  # already reaped: returns its status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # No logging here: the handler may interrupt the main thread inside a log call.
        self._stop_signal = signum
        self._signalled = None  # a second signal is forwarded too (Celery: a cold shutdown)
        self._forward()

    def _forward(self) -> None:
        """Send the stop signal to the running child, once per signal received."""
        child = self._child
        if self._stop_signal is None or child is None or self._signalled == child.pid:
            return
        self._signalled = child.pid
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, self._stop_signal)

    def _sleep(self, seconds: float) -> bool:
        """Sleep, unless a stop signal comes; return whether one came."""
        deadline = time.monotonic() + seconds
        while self._stop_signal is None and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self._stop_signal is not None

    def _kill_group(self, child: subprocess.Popen[bytes]) -> None:
        """SIGKILL whatever is left of the child's process group (a pool process that
        outlived its worker) and reap it, then let the relay of its output finish."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        # The child itself first, through Popen, which must see its status.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
        # Pool processes of a worker that was killed are re-parented to init, or to this
        # process when it is init (PID 1 in a container) or a subreaper: reap those, which
        # would otherwise stay zombies. For anyone else this returns at once.
        deadline = time.monotonic() + 5
        with contextlib.suppress(ChildProcessError):
            while time.monotonic() < deadline:
                if os.waitpid(-child.pid, os.WNOHANG)[0] == 0:
                    time.sleep(0.05)
        if self._relay_thread is not None:
            self._relay_thread.join(timeout=5)

    def _reap(self) -> None:
        child = self._child
        if child is None:
            return
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=self.stop_timeout)
        self._kill_group(child)


def _exit(child: subprocess.Popen[bytes]) -> str:
    return describe_exit(child.returncode) if child.returncode is not None else "is running"


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def stop_with_parent(parent_pid: int, *, poll: float = 0.5, grace: float = 30.0) -> None:
    """Make this process stop when ``parent_pid`` is no longer its parent (the parent died).

    It receives SIGTERM, so that it shuts down as it would when told to, and SIGKILL if it is
    still running ``grace`` seconds later. On Linux the kernel sends the SIGTERM at the
    parent's death (``PR_SET_PDEATHSIG``); elsewhere a daemon thread that polls
    ``os.getppid()`` every ``poll`` seconds does. A parent that died before this was called
    is noticed too.
    """
    kernel_signals = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            kernel_signals = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    me = os.getpid()
    # The parent may have died before prctl took effect: then no signal comes.
    orphaned_already = os.getppid() != parent_pid

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll)
        log.warning("parent process %d is gone; stopping", parent_pid)
        if orphaned_already or not kernel_signals:
            os.kill(me, signal.SIGTERM)
        time.sleep(grace)
        os.kill(me, signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
