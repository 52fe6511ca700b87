"""Step 1 of attestation: the credCert chain to a trusted root, with a cache of intermediates."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import (
    ClientVerifier,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from worker.core.reasons import Reason, Rejected
from worker.core.trust import TrustStore, certificate_fingerprint

_CHAIN_LENGTH = 2
_CERTIFICATE_ERRORS = (
    ValueError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    CryptographyDeprecationWarning,
    # cryptography 48 raises KeyError for a name attribute of an unknown ASN.1 string type.
    KeyError,
)  # x5c is [credCert, intermediate]; the root is ours, never the device's.


@dataclass(frozen=True)
class VerifiedChain:
    """A credCert whose chain to a trusted root was verified at a given instant."""

    leaf: x509.Certificate
    intermediate: x509.Certificate
    leaf_fingerprint: bytes
    intermediate_fingerprint: bytes
    from_cache: bool


@dataclass(frozen=True)
class _CacheEntry:
    certificate: x509.Certificate
    # A store holding only the verified intermediate, built once: rebuilding it per call
    # re-parses the intermediate's P-384 key, which costs about a tenth of a verification.
    store: Store
    valid_from: datetime
    valid_until: datetime


class IntermediateCache:
    """A bounded LRU of intermediate certificates already verified against a trust store.

    An entry is keyed by the trust store's root fingerprints and the intermediate's SHA-256, so a
    different trust store never sees it. It is only used while the instant asked about lies in
    the window where both the intermediate and its root are valid, so it never outlives the
    certificate. Only successful verifications are stored. Thread-safe; one instance per
    process.
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[tuple[bytes, ...], bytes], _CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, *, trust: TrustStore, fingerprint: bytes, now: datetime) -> Store | None:
        """Return a trust store of the verified intermediate if it is cached and valid at
        ``now``, else None."""
        key = (trust.fingerprints, fingerprint)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.valid_from <= now <= entry.valid_until:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.store

    def remember(
        self,
        *,
        trust: TrustStore,
        intermediate: x509.Certificate,
        fingerprint: bytes,
        root: x509.Certificate,
    ) -> None:
        """Record an intermediate that was just verified to chain to ``root``."""
        entry = _CacheEntry(
            certificate=intermediate,
            store=Store([intermediate]),
            valid_from=max(intermediate.not_valid_before_utc, root.not_valid_before_utc),
            valid_until=min(intermediate.not_valid_after_utc, root.not_valid_after_utc),
        )
        key = (trust.fingerprints, fingerprint)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def stats(self) -> dict[str, int]:
        """Hit and miss counts and the current size, for metrics."""
        return {"hits": self.hits, "misses": self.misses, "size": len(self._entries)}


def _verifier(store: Store, now: datetime) -> ClientVerifier:
    # The web-PKI end-entity profile rejects every real App Attest leaf (old leaves have no AKI,
    # new ones carry Apple's own EKU), so leaves get the permissive profile, which still refuses
    # unknown critical extensions; CA certificates keep the strict web-PKI CA profile.
    return (
        PolicyBuilder()
        .store(store)
        .time(now)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )


def _load(der: bytes, name: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except _CERTIFICATE_ERRORS as exc:
        raise Rejected(
            Reason.CERTIFICATE_CHAIN_INVALID, f"{name} is not a valid certificate"
        ) from exc


def _touch(cert: x509.Certificate, name: str, *, names: bool = True) -> PublicKeyTypes:
    """Parse the key, validity, extensions and (with ``names``) names of a loaded certificate;
    return its public key.

    pyca/cryptography parses fields lazily, so a corrupt name, key or extension would only
    raise when first touched, deep inside a check; touching them here turns every such
    corruption into one clear rejection. The credCert's names are left to the chain verifier,
    which parses them itself and refuses a corrupt one (building them as Python objects costs
    more than all other fields together), and nothing else reads them. An intermediate found in
    the cache is never read beyond its fingerprint, so it is only touched when it must be
    verified.
    """
    try:
        key = cert.public_key()
        if names:
            _ = (cert.subject, cert.issuer)
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
        _ = cert.extensions
    except _CERTIFICATE_ERRORS as exc:
        raise Rejected(
            Reason.CERTIFICATE_CHAIN_INVALID, f"{name} is not a valid certificate"
        ) from exc
    return key


def parse_credential_chain(
    x5c: Sequence[bytes],
) -> tuple[x509.Certificate, x509.Certificate, bytes]:
    """Parse x5c into (credCert, intermediate, the credCert's uncompressed P-256 point)
    without verifying anything.

    Raises ``Rejected(certificate_chain_invalid)`` when x5c does not hold exactly two
    certificates, one does not parse, or the credCert key is not a P-256 key.
    """
    if len(x5c) != _CHAIN_LENGTH:
        raise Rejected(
            Reason.CERTIFICATE_CHAIN_INVALID,
            f"x5c holds {len(x5c)} certificates, expected credCert and intermediate",
        )
    with warnings.catch_warnings():
        # A deprecated encoding (a negative serial number, say) is refused, not warned of.
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        leaf = _load(x5c[0], "credCert")
        key = _touch(leaf, "credCert", names=False)
        intermediate = _load(x5c[1], "intermediate")
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise Rejected(Reason.CERTIFICATE_CHAIN_INVALID, "credCert key is not a P-256 key")
    return leaf, intermediate, key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def parse_chain(x5c: Sequence[bytes]) -> tuple[x509.Certificate, x509.Certificate]:
    """Parse x5c into (credCert, intermediate), as ``parse_credential_chain`` does."""
    leaf, intermediate, _ = parse_credential_chain(x5c)
    return leaf, intermediate


def _failure_reason(
    leaf: x509.Certificate, intermediate: x509.Certificate, trust: TrustStore, now: datetime
) -> Rejected:
    """Tell an expired or not-yet-valid certificate apart from a chain that does not verify."""
    try:
        named = [("credCert", leaf), ("intermediate", intermediate)]
        named += [("root", root) for root in trust.roots if root.subject == intermediate.issuer]
        for name, cert in named:
            if now < cert.not_valid_before_utc:
                return Rejected(Reason.CERTIFICATE_EXPIRED, f"{name} is not valid before {now}")
            if now > cert.not_valid_after_utc:
                return Rejected(Reason.CERTIFICATE_EXPIRED, f"{name} expired before {now}")
    except _CERTIFICATE_ERRORS:
        pass  # a field that does not even parse: the chain is invalid, not expired
    return Rejected(Reason.CERTIFICATE_CHAIN_INVALID, "credCert does not chain to a trusted root")


def verify_chain(
    *,
    leaf: x509.Certificate,
    intermediate: x509.Certificate,
    trust: TrustStore,
    now: datetime,
    cache: IntermediateCache | None,
    fingerprints: tuple[bytes, bytes] | None = None,
) -> VerifiedChain:
    """Verify credCert -> intermediate -> trusted root at ``now``.

    Returns the verified chain; raises ``Rejected`` with ``certificate_expired`` when a
    certificate is outside its validity at ``now`` and ``certificate_chain_invalid`` for any
    other failure. With a cache, an intermediate verified before is used as the trust anchor, so
    only the credCert signature (and its validity at ``now``) is checked again. ``fingerprints``
    are the SHA-256 of the credCert and intermediate DER when the caller has them already.
    """
    leaf_fp, inter_fp = fingerprints or (
        certificate_fingerprint(leaf),
        certificate_fingerprint(intermediate),
    )
    cached = cache.lookup(trust=trust, fingerprint=inter_fp, now=now) if cache is not None else None
    if cached is None:
        # About to be verified and cached: every field of it must parse.
        _touch(intermediate, "intermediate")
    store = cached if cached is not None else trust.store
    presented = [] if cached is not None else [intermediate]
    try:
        verified = _verifier(store, now).verify(leaf, presented)
    except (VerificationError, ValueError, UnsupportedAlgorithm) as exc:
        raise _failure_reason(leaf, intermediate, trust, now) from exc
    chain: list[x509.Certificate] = verified.chain
    if cached is None:
        # Only a chain that really passed through the presented intermediate may be cached: a
        # leaf signed directly by a root must not make an unverified intermediate trusted.
        if len(chain) != _CHAIN_LENGTH + 1 or chain[1] != intermediate:
            raise Rejected(
                Reason.CERTIFICATE_CHAIN_INVALID, "chain does not pass through the intermediate"
            )
        if cache is not None:
            cache.remember(
                trust=trust, intermediate=intermediate, fingerprint=inter_fp, root=chain[2]
            )
    return VerifiedChain(
        leaf=leaf,
        intermediate=intermediate,
        leaf_fingerprint=leaf_fp,
        intermediate_fingerprint=inter_fp,
        from_cache=cached is not None,
    )
