"""Trust roots for certificate chains: Apple's pinned root, or a deliberately chosen other root."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import Store

# SHA-256 of the DER of "Apple App Attestation Root CA" (valid 2020-03-18 to 2045-03-15).
APPLE_APP_ATTEST_ROOT_SHA256: Final = bytes.fromhex(
    "1CB9823BA28BA6AD2D33A006941DE2AE4F513EF1D4E831B9F7E0FA7B6242C932"
)
_APPLE_ROOT_RESOURCE: Final = "apple-app-attestation-root-ca.pem"


class TrustStoreError(ValueError):
    """A trust store could not be built: no root, an unreadable root or a fingerprint mismatch."""


def certificate_fingerprint(cert: x509.Certificate) -> bytes:
    """Return the SHA-256 of a certificate's DER encoding."""
    return cert.fingerprint(hashes.SHA256())


@dataclass(frozen=True)
class TrustStore:
    """The roots an attestation chain must end in.

    Build it with ``TrustStore.apple()`` in production. ``TrustStore.replacing_apple_root`` is
    the explicit opt-in for tests and private deployments; there is no way to get a store that
    trusts both, or nothing.
    """

    roots: tuple[x509.Certificate, ...]
    fingerprints: tuple[bytes, ...]
    is_apple: bool
    store: Store = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.roots:
            raise TrustStoreError("a trust store needs at least one root certificate")
        if len(self.roots) != len(self.fingerprints):
            raise TrustStoreError("every root needs its pinned fingerprint")
        for root, pinned in zip(self.roots, self.fingerprints, strict=True):
            if not hmac.compare_digest(certificate_fingerprint(root), pinned):
                raise TrustStoreError(
                    f"root {root.subject.rfc4514_string()} does not match its pinned fingerprint"
                )
        object.__setattr__(self, "store", Store(list(self.roots)))

    @classmethod
    def apple(cls) -> TrustStore:
        """Apple's App Attestation Root CA, embedded in this package and pinned by fingerprint.

        Raises ``TrustStoreError`` if the embedded file was altered.
        """
        pem = resources.files("worker.core.data").joinpath(_APPLE_ROOT_RESOURCE).read_bytes()
        root = _load_single_pem(pem)
        return cls(roots=(root,), fingerprints=(APPLE_APP_ATTEST_ROOT_SHA256,), is_apple=True)

    @classmethod
    def replacing_apple_root(cls, pem: bytes) -> TrustStore:
        """Trust the root certificate(s) in ``pem`` *instead of* Apple's root.

        This is a deliberate choice for tests and private deployments: attestations from real
        devices will no longer verify. Raises ``TrustStoreError`` for an empty or unreadable PEM.
        """
        roots = _load_pem_roots(pem)
        return cls(
            roots=roots,
            fingerprints=tuple(certificate_fingerprint(r) for r in roots),
            is_apple=False,
        )


def _load_pem_roots(pem: bytes) -> tuple[x509.Certificate, ...]:
    try:
        certs: Sequence[x509.Certificate] = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TrustStoreError(f"no readable PEM certificate: {exc}") from exc
    if not certs:
        raise TrustStoreError("no PEM certificate found")
    return tuple(certs)


def _load_single_pem(pem: bytes) -> x509.Certificate:
    roots = _load_pem_roots(pem)
    if len(roots) != 1:
        raise TrustStoreError("the embedded Apple root must be a single certificate")
    return roots[0]
