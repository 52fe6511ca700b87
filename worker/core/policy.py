"""The verification policy: which apps are accepted, in which environments, under which roots."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

# Environment is defined with the reason codes, in the client's package (verdicts carry it),
# and re-exported here.
from appattest_client.codes import Environment as Environment
from worker.core.authdata import AuthDataExtensions
from worker.core.reasons import Reason, Rejected
from worker.core.trust import TrustStore

# An App ID is the ten-character Team ID, a dot, and the bundle identifier. Apple's own sample
# bundle identifier contains an underscore, so underscores are allowed too.
_APP_ID = re.compile(r"[A-Z0-9]{10}\.[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")


class PolicyError(ValueError):
    """A policy could not be built from the given configuration."""


# A bundle version (CFBundleVersion) is one to three period-separated non-negative integers.
# Each component is bounded so that a device's text can never make a huge integer.
_BUNDLE_VERSION: Final = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,20}){0,2}", re.ASCII)
_MAX_VALIDATION_CATEGORY: Final = 2**32 - 1


def parse_bundle_version(text: str) -> tuple[int, int, int] | None:
    """The bundle version as three integers (missing components are zero), or None when
    ``text`` is not one to three period-separated non-negative integers."""
    if _BUNDLE_VERSION.fullmatch(text) is None:
        return None
    parts = [int(part) for part in text.split(".")] + [0, 0]
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class ExtensionRules:
    """What an app requires of the iOS 27 authenticator-data extensions (Apple's build signals).

    ``allowed_validation_categories`` None allows every category; ``min_bundle_version`` None
    sets no minimum; ``require_extensions`` refuses devices that send no extensions map (every
    device before iOS 27). Without ``require_extensions`` a device that sends no map passes
    the other two rules, so older devices keep working; a device that sends a map must carry
    the entries a rule needs.
    """

    allowed_validation_categories: frozenset[int] | None = None
    min_bundle_version: str | None = None
    require_extensions: bool = False
    _minimum: tuple[int, int, int] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for category in self.allowed_validation_categories or ():
            if type(category) is not int or not 0 <= category <= _MAX_VALIDATION_CATEGORY:
                raise PolicyError(f"validation category {category!r} is not a 32-bit unsigned int")
        minimum = None
        if self.min_bundle_version is not None:
            minimum = parse_bundle_version(self.min_bundle_version)
            if minimum is None:
                raise PolicyError(
                    f"minimum bundle version {self.min_bundle_version!r} is not one to three "
                    "period-separated non-negative integers"
                )
        object.__setattr__(self, "_minimum", minimum)

    def check(self, extensions: AuthDataExtensions | None) -> None:
        """Raise ``Rejected`` when ``extensions`` (None: the device sent no map) break a rule:
        ``extensions_missing``, ``validation_category_not_allowed`` or
        ``bundle_version_too_old`` (also for a bundle version that is not of the form)."""
        if extensions is None:
            if self.require_extensions:
                raise Rejected(
                    Reason.EXTENSIONS_MISSING, "the device sent no authenticator data extensions"
                )
            return
        self._check_category(extensions.validation_category)
        self._check_bundle_version(extensions.bundle_version)

    def _check_category(self, category: int | None) -> None:
        allowed = self.allowed_validation_categories
        if allowed is None:
            return
        if category is None:
            raise Rejected(Reason.EXTENSIONS_MISSING, "the extensions carry no validation category")
        if category not in allowed:
            raise Rejected(
                Reason.VALIDATION_CATEGORY_NOT_ALLOWED,
                f"validation category {category} is not one of {sorted(allowed)}",
            )

    def _check_bundle_version(self, text: str | None) -> None:
        if self._minimum is None:
            return
        if text is None:
            raise Rejected(Reason.EXTENSIONS_MISSING, "the extensions carry no bundle version")
        version = parse_bundle_version(text)
        if version is None:
            # Fail closed: a version that cannot be compared cannot be shown to be new enough.
            raise Rejected(
                Reason.BUNDLE_VERSION_TOO_OLD, f"bundle version {text[:40]!r} is not a version"
            )
        if version < self._minimum:
            raise Rejected(
                Reason.BUNDLE_VERSION_TOO_OLD,
                f"bundle version {text} is below the minimum {self.min_bundle_version}",
            )


ALLOW_ALL_EXTENSIONS: Final = ExtensionRules()


@dataclass(frozen=True)
class AppConfig:
    """One accepted app: its App ID (``TEAMID.bundle.id``), whether development keys pass, and
    what it requires of the iOS 27 extensions."""

    app_id: str
    allow_development: bool = False
    extensions: ExtensionRules = ALLOW_ALL_EXTENSIONS

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
        extensions: ExtensionRules = ALLOW_ALL_EXTENSIONS,
        app_extensions: Mapping[str, ExtensionRules] | None = None,
    ) -> Policy:
        """Build a policy from App ID lists.

        ``production_apps`` accept production keys only; ``development_apps`` accept development
        and production keys. An App ID in both lists gets the development rule, the wider one
        the operator asked for explicitly. ``extensions`` are the rules of every app but those
        ``app_extensions`` names, whose rules replace them. Raises ``PolicyError`` when
        ``app_extensions`` names an App ID that is in neither list.
        """
        dev = list(dict.fromkeys(development_apps))
        prod = [a for a in dict.fromkeys(production_apps) if a not in dev]
        per_app = dict(app_extensions or {})
        unknown = sorted(set(per_app) - set(dev) - set(prod))
        if unknown:
            raise PolicyError(f"per-app rules name App IDs that are not accepted: {unknown}")
        apps = tuple(AppConfig(a, False, per_app.get(a, extensions)) for a in prod) + tuple(
            AppConfig(a, True, per_app.get(a, extensions)) for a in dev
        )
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
