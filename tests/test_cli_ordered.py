"""``appattest verify`` decides lines in transactions of many lines: the order of the file still
holds (within a transaction, across transactions and on both stores), a pipe still gets each
verdict as soon as its line is in, and a concurrent writer or an error falls back to deciding
line by line with the same verdicts as before."""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import NOW
from tests.factory import APP_ID, Device, TestCA
from worker.cli import commands as cli
from worker.contract import parse_request
from worker.core import Policy, TrustStore
from worker.service import VerificationService
from worker.service import verification as verification_module
from worker.service.verification import ORDERED_CHUNK, ConcurrentChange
from worker.store import bulk
from worker.store.db import create_store_engine, session_factory, upgrade
from worker.store.models import DeviceKey

AT = NOW.isoformat()
real = bulk.get_keys  # the key reads, as stored before a test replaces them


def _write(tmp_path: Path, lines: list[Any]) -> Path:
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return source


def _root(ca: TestCA, tmp_path: Path) -> list[str]:
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    return ["--app-id", APP_ID, "--root-ca", str(root), "--at", AT]


def _counters(store_url: str) -> dict[str, int]:
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(select(DeviceKey.key_id, DeviceKey.counter)).all())
    finally:
        engine.dispose()


def test_order_holds_across_transactions(ca: TestCA, tmp_path: Path, store_url: str) -> None:
    """More lines than one transaction takes: a key registered in the first is known in the
    second, counters carry over, a replay after the boundary is refused."""
    first, second = Device(ca=ca), Device(ca=ca)
    count = ORDERED_CHUNK + 20
    lines: list[Any] = [first.registration_body("c1", now=NOW)]
    lines += [first.assertion_body(f"p{i}") for i in range(count)]
    lines += [
        lines[3],  # a replay of counter 3, now in the second transaction
        second.assertion_body("before its registration"),
        second.registration_body("c2", now=NOW),
        second.assertion_body("after"),
        first.registration_body("again", now=NOW),
    ]
    source = _write(tmp_path, lines)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "worker.cli.commands", "verify", str(source)),
            *("--store", store_url, *_root(ca, tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["line"] for r in out] == list(range(1, len(lines) + 1))
    assert out[0]["ok"] and out[0]["kind"] == "registration"
    assert [r["counter"] for r in out[1 : count + 1]] == list(range(1, count + 1))
    assert all(r["ok"] for r in out[1 : count + 1])
    assert [r["reason"] for r in out[count + 1 :]] == [
        "counter_replay",
        "key_unknown",
        None,
        None,
        "key_already_registered",
    ]
    assert out[-2]["counter"] == 2  # the refused assertion before it used counter 1
    assert _counters(store_url) == {first.key_id_b64: count, second.key_id_b64: 2}


def _lines_of(stream: Any) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_a_pipe_gets_each_verdict_before_the_next_line(ca: TestCA, tmp_path: Path) -> None:
    device = Device(ca=ca)
    command = [sys.executable, "-m", "worker.cli.commands", "verify", "-"]
    command += ["--store", f"sqlite:///{tmp_path / 'keys.db'}", *_root(ca, tmp_path)]
    with subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            answers = _lines_of(proc.stdout)
            for number, body in enumerate(
                [device.registration_body("c", now=NOW), device.assertion_body("p")], start=1
            ):
                proc.stdin.write(json.dumps(body) + "\n")
                proc.stdin.flush()
                # The input stays open: the verdict must come without waiting for more lines.
                result = json.loads(answers.get(timeout=60))
                assert (result["line"], result["ok"]) == (number, True), result
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
            assert answers.empty()
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


def _service(ca: TestCA, sessions: sessionmaker[Session]) -> VerificationService:
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )
    return VerificationService(policy=policy, sessions=sessions)


def test_a_key_registered_meanwhile_writes_nothing(
    ca: TestCA, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(ca, sessions)
    raced, other = Device(ca=ca), Device(ca=ca)
    now = datetime.now(UTC)
    assert service.handle(parse_request(raced.registration_body("c", now=now))).ok
    # The in-order read misses the key another writer just registered.
    real = bulk.get_keys
    monkeypatch.setattr(
        bulk,
        "get_keys",
        lambda session, ids: {k: v for k, v in real(session, ids).items() if k != raced.key_id_b64},
    )
    items = [
        parse_request(other.registration_body("c", now=now)),
        parse_request(raced.registration_body("c2", now=now)),
    ]
    with pytest.raises(ConcurrentChange):
        service.decide_in_order(items)
    with sessions() as session:
        assert set(session.scalars(select(DeviceKey.key_id))) == {raced.key_id_b64}


def test_a_counter_advanced_meanwhile_writes_nothing(
    ca: TestCA, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(ca, sessions)
    raced, other = Device(ca=ca), Device(ca=ca)
    now = datetime.now(UTC)
    for device in (raced, other):
        assert service.handle(parse_request(device.registration_body("c", now=now))).ok
    with sessions() as session:
        stale = bulk.get_keys(session, [raced.key_id_b64])
    first = parse_request(raced.assertion_body("p1"))
    second = parse_request(raced.assertion_body("p2"))
    assert service.handle(second).counter == 2  # another writer took counter 2
    monkeypatch.setattr(bulk, "get_keys", lambda session, ids: {**real(session, ids), **stale})
    items = [parse_request(other.assertion_body("q")), first]
    with pytest.raises(ConcurrentChange):
        service.decide_in_order(items)
    assert _session_counters(sessions) == {
        raced.key_id_b64: 2,
        other.key_id_b64: 0,
    }


def _session_counters(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        return dict(session.execute(select(DeviceKey.key_id, DeviceKey.counter)).all())


def _invoke(args: list[str], lines: list[Any]) -> tuple[int, list[dict[str, Any]]]:
    data = "".join(json.dumps(x) + "\n" for x in lines)
    result = CliRunner().invoke(cli.main, ["verify", "-", *args], input=data)
    out = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, out


def test_a_concurrent_writer_falls_back_to_line_by_line(
    ca: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    args = ["--store", store, *_root(ca, tmp_path)]
    raced, other = Device(ca=ca), Device(ca=ca)
    code, out = _invoke(args, [raced.registration_body("c", now=NOW)])
    assert code == 0 and out[0]["ok"]
    calls = []

    def first_read_is_stale(session: Session, ids: Any) -> dict[str, bulk.StoredKey]:
        calls.append(ids)
        found = real(session, ids)
        return (
            {k: v for k, v in found.items() if k != raced.key_id_b64} if len(calls) == 1 else found
        )

    monkeypatch.setattr(bulk, "get_keys", first_read_is_stale)
    code, out = _invoke(
        args,
        [
            other.registration_body("c", now=NOW),
            raced.registration_body("c2", now=NOW),
            other.assertion_body("p"),
        ],
    )
    assert code == 0
    assert [(r["line"], r["ok"], r["reason"]) for r in out] == [
        (1, True, None),
        (2, False, "key_already_registered"),
        (3, True, None),
    ]
    assert out[2]["counter"] == 1
    assert len(calls) > 1  # the chunk's read, then one per line
    assert _counters(store) == {raced.key_id_b64: 0, other.key_id_b64: 1}


def test_an_unexpected_error_costs_only_its_line(
    ca: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    args = ["--store", store, *_root(ca, tmp_path)]
    device = Device(ca=ca)
    lines = [
        device.registration_body("c", now=NOW),
        device.assertion_body("fine"),
        device.assertion_body("explodes"),
        device.assertion_body("fine again"),
    ]
    real_verify = verification_module.verify_assertion

    def verify_assertion(**kwargs: Any) -> Any:
        from worker.core import client_data_hash

        if kwargs["client_data_hash"] == client_data_hash("explodes"):
            raise RuntimeError("boom")
        return real_verify(**kwargs)

    monkeypatch.setattr(verification_module, "verify_assertion", verify_assertion)
    code, out = _invoke(args, lines)
    assert code == 1  # a line hit an internal error
    assert [(r["ok"], r["reason"], r.get("counter")) for r in out] == [
        (True, None, 0),
        (True, None, 1),
        (False, "internal_error", None),
        (True, None, 3),
    ]
    assert out[2]["detail"] == "unexpected error; see the log"
    assert _counters(store) == {device.key_id_b64: 3}


def test_a_transaction_holds_at_most_500_lines_or_4_mib() -> None:
    short = b"x\n" * (ORDERED_CHUNK + 1)
    assert [len(c) for c in cli._chunks(io.BytesIO(short))] == [ORDERED_CHUNK, 1]
    # Lines of 150 KiB (each refused later as not JSON): 4 MiB of input ends a chunk, after 28.
    big = (b"y" * (150 * 1024) + b"\n") * 60
    chunks = list(cli._chunks(io.BytesIO(big)))
    assert [len(c) for c in chunks] == [28, 28, 4]
    assert [n for c in chunks for n, _ in c] == list(range(1, 61))
