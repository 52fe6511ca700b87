"""A throwaway test CA kept in a directory, so that a service and a simulator can share it.

``create_ca_dir`` writes ``root.pem`` (the public root, which a service is told to trust with
``--root-ca``), ``intermediate.pem`` and the two private keys (mode 0600). ``load_ca`` reads
them back for ``appattest simulate --ca DIR``. ``sample_bodies`` mints a small JSON Lines
sample for ``appattest verify``.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from worker.simulator.devices import Device, TestCA

ROOT_FILE: Final = "root.pem"
ROOT_KEY_FILE: Final = "root-key.pem"
INTERMEDIATE_FILE: Final = "intermediate.pem"
INTERMEDIATE_KEY_FILE: Final = "intermediate-key.pem"
CA_FILES: Final = (ROOT_FILE, ROOT_KEY_FILE, INTERMEDIATE_FILE, INTERMEDIATE_KEY_FILE)

# Long enough for a smoke test that runs for weeks, short enough that a forgotten CA lapses.
CA_LIFETIME: Final = timedelta(days=365)


class CAFilesError(Exception):
    """A CA directory could not be written or read: existing files, missing or bad PEM."""


def create_ca_dir(directory: Path, *, now: datetime) -> TestCA:
    """Create a throwaway CA valid from a day before ``now`` for ``CA_LIFETIME`` and write it.

    Returns the CA. Raises ``CAFilesError`` when ``directory`` already holds one of the CA
    files (nothing is overwritten) or cannot be written.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CAFilesError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    present = [name for name in CA_FILES if (directory / name).exists()]
    if present:
        raise CAFilesError(
            f"{directory} already holds {', '.join(present)}; choose an empty directory"
        )
    ca = TestCA.create(not_before=now - timedelta(days=1), not_after=now + CA_LIFETIME)
    certificates = {ROOT_FILE: ca.root_cert, INTERMEDIATE_FILE: ca.intermediate_cert}
    keys = {ROOT_KEY_FILE: ca.root_key, INTERMEDIATE_KEY_FILE: ca.intermediate_key}
    for name, cert in certificates.items():
        _write_new(directory / name, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    for name, key in keys.items():
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_new(directory / name, pem, mode=0o600)
    return ca


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    # O_EXCL: never replace a file that appeared since the check; the mode is set at creation,
    # so a private key is never readable by others, not even for a moment.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise CAFilesError(f"cannot write {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def load_ca(directory: Path) -> TestCA:
    """Read a CA written by ``create_ca_dir``.

    Raises ``CAFilesError`` when a file is missing or unreadable, a key does not belong to its
    certificate, or the intermediate was not issued by the root.
    """
    root = _read_certificate(directory / ROOT_FILE)
    intermediate = _read_certificate(directory / INTERMEDIATE_FILE)
    root_key = _read_key(directory / ROOT_KEY_FILE, root)
    intermediate_key = _read_key(directory / INTERMEDIATE_KEY_FILE, intermediate)
    try:
        intermediate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CAFilesError(
            f"{directory / INTERMEDIATE_FILE} was not issued by {directory / ROOT_FILE}"
        ) from exc
    return TestCA(
        root_cert=root,
        root_key=root_key,
        intermediate_cert=intermediate,
        intermediate_key=intermediate_key,
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        hint = " (create one with appattest simulate --make-ca DIR)" if not path.exists() else ""
        raise CAFilesError(f"cannot read {path}: {exc.strerror or exc}{hint}") from exc


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise CAFilesError(f"{path} is not a PEM certificate") from exc


def _read_key(path: Path, cert: x509.Certificate) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise CAFilesError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CAFilesError(f"{path} is not the private key of its certificate")
    return key


def sample_bodies(ca: TestCA, *, app_id: str, now: datetime) -> list[dict[str, str]]:
    """Plugin bodies for ``appattest verify``, made as of ``now``: a production device that
    registers and asserts twice (the second assertion sent twice: a replay), a development
    device's registration, and an Android body."""
    alice = Device(ca=ca, app_id=app_id)
    bob = Device(ca=ca, app_id=app_id, environment="development")
    first = alice.assertion_body("GET /profile nonce=1")
    replayed = alice.assertion_body("GET /profile nonce=2")
    return [
        alice.registration_body("challenge-for-alice", now=now),
        first,
        replayed,
        replayed,
        bob.registration_body("challenge-for-bob", now=now),
        {**alice.assertion_body("GET /profile nonce=3"), "platform": "android"},
    ]
