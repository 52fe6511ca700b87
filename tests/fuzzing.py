"""A seeded mutation fuzzer for the verification core.

Seeds are valid objects: real Apple vectors and freshly generated ones. Each case applies one to
three random mutations (bit flips, truncations, insertions, CBOR type swaps, oversized fields,
deep nesting, chain surgery) and runs the verifier. The property: a mutated object is rejected
with a ``Reason``; it is never accepted and never raises anything else. ``fuzz/run.py`` runs the
same engine for a million cases; the test suite runs a few thousand.
"""

from __future__ import annotations

import base64
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import cbor2
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from tests.factory import APP_ID, IOS27_EXTENSIONS, Device, TestCA, client_data_hash
from worker.contract import parse_request
from worker.core import (
    IntermediateCache,
    Policy,
    Reason,
    Rejected,
    TrustStore,
    verify_assertion,
    verify_attestation,
)
from worker.service.plugin import decode_plugin_fields

Mutator = Callable[[random.Random, bytes], bytes]


@dataclass(frozen=True)
class Seed:
    """A valid object and the call that verifies it."""

    name: str
    kind: str
    data: bytes
    verify: Callable[[bytes], object]


# Byte-level mutations ------------------------------------------------------------------------


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_byte(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    out[rng.randrange(len(out))] = rng.choice(
        [0x00, 0xFF, 0x7F, 0x80, 0x9F, 0xBF, rng.randrange(256)]
    )
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def append_bytes(rng: random.Random, data: bytes) -> bytes:
    return data + rng.randbytes(rng.randint(1, 64))


def insert_bytes(rng: random.Random, data: bytes) -> bytes:
    position = rng.randrange(len(data) + 1)
    return data[:position] + rng.randbytes(rng.randint(1, 16)) + data[position:]


def delete_range(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 64) :]


def duplicate_range(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 128))
    return data[:end] + data[start:end] + data[end:]


# CBOR-level mutations ------------------------------------------------------------------------


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*path, index))
    return found


def _replace(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy: Any = dict(node) if isinstance(node, dict) else list(node)
    copy[path[0]] = _replace(node[path[0]], path[1:], value)
    return copy


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        node = node[step]
    return node


def _swap_type(rng: random.Random, value: Any) -> Any:
    choices: list[Any] = [
        None,
        True,
        0,
        -1,
        2**64 - 1,
        -(2**63),
        1.5,
        "",
        "apple-appattest",
        b"",
        [],
        {},
        [value],
        {"x": value},
    ]
    if isinstance(value, bytes):
        choices += [value.hex(), list(value[:8]), int.from_bytes(value[:8] or b"\x00", "big")]
    if isinstance(value, str):
        choices += [value.encode(), value + "\x00", value.upper()]
    if isinstance(value, int) and not isinstance(value, bool):
        choices += [
            value + 1,
            -value - 1,
            str(value),
            value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True),
        ]
    return rng.choice(choices)


def _structural(rng: random.Random, obj: Any) -> Any:
    path = rng.choice(_paths(obj))
    target = _get(obj, path)
    action = rng.randrange(7)
    if action == 0:
        return _replace(obj, path, _swap_type(rng, target))
    if action == 1 and isinstance(target, dict) and target:
        key = rng.choice(list(target))
        return _replace(obj, path, {k: v for k, v in target.items() if k != key})
    if action == 2 and isinstance(target, dict):
        extra = rng.choice(["fmt", "attStmt", "authData", "x5c", "receipt", "extra", 1, -2])
        return _replace(obj, path, {**target, extra: _swap_type(rng, target)})
    if action == 3:
        size = rng.choice([1024, 40_000, 70_000])
        return _replace(obj, path, rng.choice([b"\x00" * size, "a" * size, [0] * (size // 8)]))
    if action == 4:
        for _ in range(rng.choice([5, 50, 500])):
            target = [target]
        return _replace(obj, path, target)
    if action == 5 and isinstance(target, bytes) and target:
        return _replace(obj, path, flip_bits(rng, target))
    if action == 6 and isinstance(target, list) and target:
        items = list(target)
        operation = rng.randrange(3)
        if operation == 0:
            rng.shuffle(items)
        elif operation == 1:
            items.pop(rng.randrange(len(items)))
        else:
            items.append(rng.choice(items))
        return _replace(obj, path, items)
    return _replace(obj, path, _swap_type(rng, target))


def cbor_structure(rng: random.Random, data: bytes) -> bytes:
    try:
        obj = cbor2.loads(data)
    except Exception:
        return flip_bits(rng, data)
    mutated = _structural(rng, obj)
    try:
        return cbor2.dumps(mutated, canonical=rng.random() < 0.8)
    except Exception:
        return flip_bits(rng, data)


def inner_bytes(rng: random.Random, data: bytes) -> bytes:
    """Mutate the bytes inside one byte-string field (authData, a certificate, the receipt, the
    signature) and re-encode, so the framing stays valid and the payload is what changes."""
    try:
        obj = cbor2.loads(data)
    except Exception:
        return flip_bits(rng, data)
    byte_paths = [p for p in _paths(obj) if isinstance(_get(obj, p), bytes) and _get(obj, p)]
    if not byte_paths:
        return flip_bits(rng, data)
    path = rng.choice(byte_paths)
    mutator = rng.choice([flip_bits, set_byte, truncate, append_bytes, insert_bytes, delete_range])
    return cbor2.dumps(_replace(obj, path, mutator(rng, _get(obj, path))), canonical=True)


MUTATORS: dict[str, Mutator] = {
    "flip_bits": flip_bits,
    "set_byte": set_byte,
    "truncate": truncate,
    "append_bytes": append_bytes,
    "insert_bytes": insert_bytes,
    "delete_range": delete_range,
    "duplicate_range": duplicate_range,
    "cbor_structure": cbor_structure,
    "inner_bytes": inner_bytes,
}


# Seeds ---------------------------------------------------------------------------------------


def generated_seeds(ca: TestCA, now: datetime) -> list[Seed]:
    """A production and a development attestation (one with iOS 27 extensions) and two
    assertions, under the throwaway CA."""
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), development_apps=[APP_ID]
    )
    cache = IntermediateCache()
    seeds = []
    for index, (environment, extensions) in enumerate(
        [("production", True), ("development", False)]
    ):
        device = Device(ca=ca, environment=environment)  # type: ignore[arg-type]
        cdh = client_data_hash(f"challenge-{index}")
        data = device.attestation_object(cdh, now=now, ios27_extensions=extensions)

        def attest(raw: bytes, key_id: bytes = device.key_id, cdh: bytes = cdh) -> object:
            return verify_attestation(
                attestation_object=raw,
                key_id=key_id,
                client_data_hash=cdh,
                policy=policy,
                now=now,
                cache=cache,
            )

        seeds.append(Seed(f"generated-attestation-{environment}", "attestation", data, attest))
        payload = client_data_hash(f"payload-{index}")
        assertion = device.assertion_object(
            payload, counter=7, extensions=dict(IOS27_EXTENSIONS) if extensions else None
        )

        def check(raw: bytes, point: bytes = device.public_point, cdh: bytes = payload) -> object:
            return verify_assertion(
                assertion_object=raw,
                client_data_hash=cdh,
                public_key=point,
                app_id=APP_ID,
                previous_counter=6,
            )

        seeds.append(Seed(f"generated-assertion-{environment}", "assertion", assertion, check))
    return seeds


def vector_seeds(limit: int = 6) -> list[Seed]:
    """Real Apple attestations and assertions whose client data hash is known."""
    from tests.vectors import b64, client_data_hash_by_rule, load_vectors, verify_at

    vectors = load_vectors()
    by_id = {v.id: v for v in vectors}
    apple = TrustStore.apple()
    cache = IntermediateCache()
    seeds: list[Seed] = []
    for vector in vectors:
        cdh = client_data_hash_by_rule(vector)
        if cdh is None or vector.kind not in ("attestation", "assertion"):
            continue
        if vector.kind == "attestation":
            policy = Policy.build(trust=apple, development_apps=[vector["appId"]])
            key_id, now = b64(vector["keyId"]), verify_at(vector)

            def attest(
                raw: bytes, k: bytes = key_id, c: bytes = cdh, p: Policy = policy, n: datetime = now
            ) -> object:
                return verify_attestation(
                    attestation_object=raw,
                    key_id=k,
                    client_data_hash=c,
                    policy=p,
                    now=n,
                    cache=cache,
                )

            seeds.append(Seed(vector.id, "attestation", b64(vector["attestation"]), attest))
        else:
            signer = (
                vector if vector.get("publicKeyPEM") else by_id[vector["publicKeyFromAttestation"]]
            )
            if not signer.get("publicKeyPEM"):
                continue
            point = load_pem_public_key(signer["publicKeyPEM"].encode()).public_bytes(
                Encoding.X962, PublicFormat.UncompressedPoint
            )

            def check(
                raw: bytes,
                pt: bytes = point,
                c: bytes = cdh,
                app: str = vector["appId"],
                prev: int = vector["previousCounter"],
            ) -> object:
                return verify_assertion(
                    assertion_object=raw,
                    client_data_hash=c,
                    public_key=pt,
                    app_id=app,
                    previous_counter=prev,
                )

            seeds.append(Seed(vector.id, "assertion", b64(vector["assertion"]), check))
    attestations = [s for s in seeds if s.kind == "attestation"][:limit]
    assertions = [s for s in seeds if s.kind == "assertion"][:limit]
    return attestations + assertions


# Running -------------------------------------------------------------------------------------


@dataclass
class Report:
    """What a fuzz run saw."""

    cases: int = 0
    unchanged: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    accepted: list[tuple[str, str, str]] = field(default_factory=list)
    # Accepted mutations that changed nothing but attStmt.receipt: no device signature covers
    # the receipt, and the verdict does not depend on it (see worker/core/attestation.py).
    receipt_only: int = 0
    # Mutated plugin bodies that are still the contract (a different challenge text, say).
    plugin_still_valid: int = 0
    crashes: list[tuple[str, str, str]] = field(default_factory=list)
    slowest_seconds: float = 0.0
    by_mutator: Counter[str] = field(default_factory=Counter)


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Apply one to three random mutations; return the result and their names."""
    names = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        name = rng.choice(list(MUTATORS))
        if data:
            data = MUTATORS[name](rng, data)
        names.append(name)
    return data, "+".join(names)


def _only_receipt_differs(original: bytes, mutated: bytes) -> bool:
    try:
        before, after = cbor2.loads(original), cbor2.loads(mutated)
        return bool(
            before["fmt"] == after["fmt"]
            and before["authData"] == after["authData"]
            and before["attStmt"]["x5c"] == after["attStmt"]["x5c"]
            and set(before) == set(after)
            and set(before["attStmt"]) == set(after["attStmt"])
        )
    except Exception:
        return False


def run_case(seed: Seed, mutated: bytes, label: str, report: Report) -> None:
    """Verify one mutated object and record the outcome."""
    report.cases += 1
    report.by_mutator[label.split("+")[0]] += 1
    if mutated == seed.data:
        report.unchanged += 1
        return
    started = time.perf_counter()
    try:
        seed.verify(mutated)
    except Rejected as exc:
        report.reasons[Reason(exc.reason).value] += 1
    except Exception as exc:
        report.crashes.append((seed.name, label, f"{type(exc).__name__}: {exc}"[:300]))
    else:
        if _only_receipt_differs(seed.data, mutated):
            report.receipt_only += 1
        else:
            report.accepted.append((seed.name, label, base64.b64encode(mutated).decode()[:120]))
    report.slowest_seconds = max(report.slowest_seconds, time.perf_counter() - started)


def run_plugin_case(rng: random.Random, body: dict[str, str], report: Report) -> None:
    """Mutate the plugin's JSON text fields and run the contract and plugin decoding."""
    field_name = rng.choice(list(body))
    text = body[field_name]
    mutated = dict(body)
    choice = rng.randrange(5)
    if choice == 0 and text:
        position = rng.randrange(len(text))
        mutated[field_name] = (
            text[:position] + rng.choice("-_ \n=+/\x00é\ud800") + text[position + 1 :]
        )
    elif choice == 1:
        mutated[field_name] = text[: rng.randrange(len(text) + 1)]
    elif choice == 2:
        mutated[field_name] = text * rng.choice([2, 100, 2000])
    elif choice == 3:
        mutated[field_name] = rng.choice([None, 0, [], {}, True])  # type: ignore[assignment]
    else:
        mutated.pop(field_name)
    report.cases += 1
    if mutated == body:
        report.unchanged += 1
        return
    try:
        decode_plugin_fields(parse_request(mutated))
    except Rejected as exc:
        report.reasons[Reason(exc.reason).value] += 1
    except Exception as exc:
        report.crashes.append(("plugin", field_name, f"{type(exc).__name__}: {exc}"[:300]))
    else:
        report.plugin_still_valid += 1


def fuzz(seeds: list[Seed], bodies: list[dict[str, str]], *, cases: int, seed: int) -> Report:
    """Run ``cases`` mutated objects (and a tenth as many plugin bodies) from one RNG seed."""
    rng = random.Random(seed)
    report = Report()
    for _ in range(cases):
        chosen = rng.choice(seeds)
        mutated, label = mutate(rng, chosen.data)
        run_case(chosen, mutated, label, report)
    for _ in range(max(1, cases // 10)):
        run_plugin_case(rng, rng.choice(bodies), report)
    return report
