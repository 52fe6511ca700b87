"""The verification policy: which apps are accepted, in which environments, under which roots."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType

# Environment is defined with the reason codes, in the client's package (verdicts carry it),
# and re-exported here.
from appattest_client.codes import Environment as Environment
from worker.core.trust import TrustStore

# An App ID is the ten-character Team ID, a dot, and the bundle identifier. Apple's own sample
# bundle identifier contains an underscore, so underscores are allowed too.
_APP_ID = re.compile(r"[A-Z0-9]{10}\.[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")


class PolicyError(ValueError):
    """A policy could not be built from the given configuration."""


@dataclass(frozen=True)
class AppConfig:
    """One accepted app: its App ID (``TEAMID.bundle.id``) and whether development keys pass."""

    app_id: str
    allow_development: bool = False

    def __post_init__(self) -> None:
        if _APP_ID.fullmatch(self.app_id) is None:
            raise PolicyError(f"{self.app_id!r} is not an App ID of the form TEAMID.bundle.id")

    @property
    def rp_id_hash(self) -> bytes:
        """SHA-256 of the App ID, as it appears in authenticator data."""
        return hashlib.sha256(self.app_id.encode("ascii")).digest()

    def allows(self, environment: Environment) -> bool:
        """Whether keys of ``environment`` are accepted for this app."""
        return environment is Environment.PRODUCTION or self.allow_development


@dataclass(frozen=True)
class Policy:
    """An immutable verification policy that fails closed.

    It needs a trust store and at least one app; an App ID listed twice with different
    environment rules is a construction error rather than a silent choice. Distrust lists name
    certificates (SHA-256 of the DER of a credCert or an intermediate) and keys (the 32-byte
    keyId) that must no longer verify, whatever their signatures say.
    """

    trust: TrustStore
    apps: tuple[AppConfig, ...]
    distrusted_certificates: frozenset[bytes] = frozenset()
    distrusted_key_ids: frozenset[bytes] = frozenset()
    _by_rp_id_hash: MappingProxyType[bytes, AppConfig] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.trust, TrustStore):
            raise PolicyError("a policy needs a TrustStore")
        if not self.apps:
            raise PolicyError("a policy needs at least one app")
        for digest in self.distrusted_certificates | self.distrusted_key_ids:
            if len(digest) != 32:
                raise PolicyError("distrusted fingerprints and key ids are 32-byte SHA-256 values")
        by_hash: dict[bytes, AppConfig] = {}
        for app in self.apps:
            previous = by_hash.setdefault(app.rp_id_hash, app)
            if previous != app:
                raise PolicyError(f"{app.app_id} is configured twice with different rules")
        object.__setattr__(self, "_by_rp_id_hash", MappingProxyType(by_hash))

    @classmethod
    def build(
        cls,
        *,
        trust: TrustStore,
        production_apps: Iterable[str] = (),
        development_apps: Iterable[str] = (),
        distrusted_certificates: Iterable[bytes] = (),
        distrusted_key_ids: Iterable[bytes] = (),
    ) -> Policy:
        """Build a policy from App ID lists.

        ``production_apps`` accept production keys only; ``development_apps`` accept development
        and production keys. An App ID in both lists gets the development rule, the wider one
        the operator asked for explicitly.
        """
        dev = list(dict.fromkeys(development_apps))
        prod = [a for a in dict.fromkeys(production_apps) if a not in dev]
        apps = tuple(AppConfig(a) for a in prod) + tuple(AppConfig(a, True) for a in dev)
        return cls(
            trust=trust,
            apps=apps,
            distrusted_certificates=frozenset(distrusted_certificates),
            distrusted_key_ids=frozenset(distrusted_key_ids),
        )

    def app_for_rp_id_hash(self, rp_id_hash: bytes) -> AppConfig | None:
        """The configured app whose App ID hashes to ``rp_id_hash``, if any."""
        return self._by_rp_id_hash.get(rp_id_hash)

    def app(self, app_id: str) -> AppConfig | None:
        """The configured app with this App ID, if any."""
        return self._by_rp_id_hash.get(hashlib.sha256(app_id.encode("utf-8")).digest())
