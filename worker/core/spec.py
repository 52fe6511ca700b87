"""The one place a verification ``Policy`` is built from configuration.

Settings (``APPATTEST_*`` variables, with command-line options as overrides:
``worker.settings.Settings.policy_spec``) describe a policy as a ``PolicySpec``: plain values
that survive JSON, so that a re-verification run stores the spec it was started with and a
resumed run rebuilds the very same policy. ``PolicySpec.build`` turns a spec into the
immutable ``Policy``; no other code outside tests builds one. It lives in the core, below the
settings and the service layer that both use it; it reads no file and no variable.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.core.policy import ExtensionRules, Policy, PolicyError
from worker.core.trust import TrustStore

# The rules an app may set for itself in the per-app form; a rule it leaves out is the global
# one. ``None`` for the first two means "every category" and "no minimum".
APP_RULE_FIELDS: Final = frozenset(
    {"allowed_validation_categories", "min_bundle_version", "require_extensions"}
)


@dataclass(frozen=True)
class PolicySpec:
    """A verification policy as configuration: App IDs, trust root, distrust lists, and the
    rules for the iOS 27 extensions, globally and per App ID.

    ``app_rules`` maps an App ID to the rules it sets for itself (keys of ``APP_RULE_FIELDS``);
    each rule it names replaces the global one for that app. Collections are kept sorted and
    without repeats by ``normalized``, so that the same policy given in another order compares
    equal.
    """

    app_ids: tuple[str, ...] = ()
    dev_app_ids: tuple[str, ...] = ()
    root_pem: str | None = None
    distrusted_certificates: tuple[str, ...] = ()  # SHA-256 hex of credCert or intermediate
    distrusted_key_ids: tuple[str, ...] = ()  # standard base64 keyIds
    allowed_validation_categories: tuple[int, ...] | None = None
    min_bundle_version: str | None = None
    require_extensions: bool = False
    app_rules: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def normalized(self) -> PolicySpec:
        """The same spec with sorted, deduplicated collections."""
        categories = self.allowed_validation_categories
        return PolicySpec(
            app_ids=tuple(sorted(set(self.app_ids))),
            dev_app_ids=tuple(sorted(set(self.dev_app_ids))),
            root_pem=self.root_pem,
            distrusted_certificates=tuple(
                sorted({h.lower() for h in self.distrusted_certificates})
            ),
            distrusted_key_ids=tuple(sorted(set(self.distrusted_key_ids))),
            allowed_validation_categories=(
                None if categories is None else tuple(sorted(set(categories)))
            ),
            min_bundle_version=self.min_bundle_version,
            require_extensions=self.require_extensions,
            app_rules={
                app_id: _normalized_rules(rules) for app_id, rules in sorted(self.app_rules.items())
            },
        )

    def _extension_rules(self, overrides: Mapping[str, Any] | None = None) -> ExtensionRules:
        given = dict(overrides or {})
        unknown = sorted(set(given) - APP_RULE_FIELDS)
        if unknown:
            raise PolicyError(f"unknown per-app rules {unknown}; known: {sorted(APP_RULE_FIELDS)}")
        categories = given.get("allowed_validation_categories", self.allowed_validation_categories)
        require = given.get("require_extensions", self.require_extensions)
        if type(require) is not bool:
            raise PolicyError("require_extensions must be true or false")
        minimum = given.get("min_bundle_version", self.min_bundle_version)
        if minimum is not None and not isinstance(minimum, str):
            raise PolicyError('min_bundle_version must be text such as "2.0"')
        if categories is not None and not isinstance(categories, list | tuple):
            raise PolicyError("allowed_validation_categories must be a list of integers")
        return ExtensionRules(
            allowed_validation_categories=None if categories is None else frozenset(categories),
            min_bundle_version=minimum,
            require_extensions=require,
        )

    def build(self) -> Policy:
        """The verification policy. Raises ``ValueError`` subclasses (``PolicyError``,
        ``TrustStoreError``, a bad fingerprint or keyId) when the spec is incomplete or wrong."""
        trust = (
            TrustStore.replacing_apple_root(self.root_pem.encode())
            if self.root_pem
            else TrustStore.apple()
        )
        try:
            certificates = [bytes.fromhex(h) for h in self.distrusted_certificates]
            key_ids = [base64.b64decode(k, validate=True) for k in self.distrusted_key_ids]
        except (ValueError, binascii.Error) as exc:
            raise PolicyError(f"a distrusted certificate or keyId is malformed: {exc}") from exc
        return Policy.build(
            trust=trust,
            production_apps=self.app_ids,
            development_apps=self.dev_app_ids,
            distrusted_certificates=certificates,
            distrusted_key_ids=key_ids,
            extensions=self._extension_rules(),
            app_extensions={
                app_id: self._extension_rules(rules) for app_id, rules in self.app_rules.items()
            },
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON object of the spec (``from_json`` reads it back)."""
        categories = self.allowed_validation_categories
        return {
            "app_ids": list(self.app_ids),
            "dev_app_ids": list(self.dev_app_ids),
            "root_pem": self.root_pem,
            "distrusted_certificates": list(self.distrusted_certificates),
            "distrusted_key_ids": list(self.distrusted_key_ids),
            "allowed_validation_categories": None if categories is None else list(categories),
            "min_bundle_version": self.min_bundle_version,
            "require_extensions": self.require_extensions,
            "app_rules": {app_id: dict(rules) for app_id, rules in self.app_rules.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PolicySpec:
        """The spec of a JSON object; fields it lacks (a run stored by an older release) take
        their defaults, which are the rules that release applied."""
        categories = data.get("allowed_validation_categories")
        return cls(
            app_ids=tuple(data.get("app_ids", ())),
            dev_app_ids=tuple(data.get("dev_app_ids", ())),
            root_pem=data.get("root_pem"),
            distrusted_certificates=tuple(data.get("distrusted_certificates", ())),
            distrusted_key_ids=tuple(data.get("distrusted_key_ids", ())),
            allowed_validation_categories=None if categories is None else tuple(categories),
            min_bundle_version=data.get("min_bundle_version"),
            require_extensions=bool(data.get("require_extensions", False)),
            app_rules={k: dict(v) for k, v in (data.get("app_rules") or {}).items()},
        )


def _normalized_rules(rules: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(sorted(rules.items()))
    categories = out.get("allowed_validation_categories")
    if isinstance(categories, list | tuple):
        out["allowed_validation_categories"] = sorted(set(categories))
    return out
