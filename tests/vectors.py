"""Loading of the real Apple vectors kept in ../shared/vectors (read in place, never copied)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

VECTORS_DIR = Path(
    os.environ.get("APPATTEST_VECTORS", Path(__file__).resolve().parents[2] / "shared" / "vectors")
)


@dataclass(frozen=True)
class Vector:
    id: str
    kind: str
    file: str
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str) -> Any:
        return self.data.get(key)


def load_vectors() -> list[Vector]:
    """Every attestation and assertion vector, or a clear skip (a failure under CI)."""
    if not VECTORS_DIR.is_dir():
        message = f"real Apple vectors not found at {VECTORS_DIR} (set APPATTEST_VECTORS)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
    vectors = []
    for path in sorted(VECTORS_DIR.glob("*.json")):
        if path.name == "INDEX.json":
            continue
        for item in json.loads(path.read_text())["vectors"]:
            vectors.append(Vector(id=item["id"], kind=item["kind"], file=path.name, data=item))
    return vectors


def verify_at(vector: Vector) -> datetime:
    return datetime.fromisoformat(vector["verifyAt"].replace("Z", "+00:00"))


def b64(text: str) -> bytes:
    """Decode the vectors' own binary fields (standard, padded base64)."""
    return base64.b64decode(text, validate=True)


def _peer_b64(text: str) -> bytes:
    # Some sources passed challenges as unpadded base64url; decode them the way their peer did.
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def client_data_hash_by_rule(vector: Vector) -> bytes | None:
    """Derive the clientDataHash the way the vector's source did, or None when unknown."""
    rule: str = vector.get("clientDataHashRule") or "unknown"
    if vector.kind == "assertion":
        if rule != "sha256(clientData)":
            return None
        encoding = vector["clientDataEncoding"]
        raw = b64(vector["clientData"]) if encoding == "base64" else vector["clientData"].encode()
        return hashlib.sha256(raw).digest()
    challenge = vector.get("challenge")
    if rule == "sha256(utf8(challenge))":
        return hashlib.sha256(challenge.encode("utf-8")).digest()
    if rule == "sha256(base64-decoded challenge bytes)":
        return hashlib.sha256(_peer_b64(challenge)).digest()
    if rule == "sha256(16 raw UUID bytes)":
        return hashlib.sha256(uuid.UUID(challenge).bytes).digest()
    if rule.startswith("raw utf8(challenge) used directly as clientDataHash"):
        return challenge.encode("utf-8")
    if rule == "base64-decoded bytes used directly as clientDataHash":
        return _peer_b64(challenge)
    if rule.startswith("unknown"):
        return None
    raise AssertionError(f"vector {vector.id} has a clientDataHashRule this test does not know")
