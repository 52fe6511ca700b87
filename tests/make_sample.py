"""Write a sample JSON Lines file of plugin bodies and the throwaway root that signed them.

Usage: ``python -m tests.make_sample OUT_DIR``. The devices are minted under a test CA created
on the spot, valid from a day ago for two days, so ``appattest verify`` accepts them now when
told ``--root-ca OUT_DIR/root.pem``. Nothing here is trusted by default.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from tests.factory import APP_ID, Device, TestCA


def write_sample(out_dir: Path) -> tuple[Path, Path]:
    """Write ``sample.jsonl`` and ``root.pem`` into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca = TestCA.create()
    alice, bob = Device(ca=ca), Device(ca=ca, environment="development")
    first = alice.assertion_body("GET /profile nonce=1")
    replayed = alice.assertion_body("GET /profile nonce=2")
    bodies = [
        alice.registration_body("challenge-for-alice", now=now),
        first,
        replayed,
        replayed,
        bob.registration_body("challenge-for-bob", now=now),
        {**alice.assertion_body("GET /profile nonce=3"), "platform": "android"},
    ]
    sample = out_dir / "sample.jsonl"
    sample.write_text("".join(json.dumps(body) + "\n" for body in bodies))
    root = out_dir / "root.pem"
    root.write_bytes(ca.root_pem)
    return sample, root


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.make_sample OUT_DIR")
    sample, root = write_sample(Path(sys.argv[1]))
    print(f"wrote {sample} and {root}; App ID {APP_ID}")


if __name__ == "__main__":
    main()
