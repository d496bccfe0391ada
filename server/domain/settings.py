"""Settings: the known names, their types and defaults, and validation.

Global settings apply to every server of a deployment, local ones to this server only.
A protected value is never returned unless an admin asks to reveal it (audited).
Key-rotation settings are `PKI<Kind>KeyValidityHours` and
`PKI<Kind>KeyRenewalWindowHours` for Kind in ClientTLS, IntermediateTLS, ServerTLS and
MessageSigning; the ClientTLS renewal window affects clients, the rest the server.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass

from keyplane.plugins.keys import SecretStore
from keyplane.server.domain import crl
from keyplane.server.domain.identity import Identity
from keyplane.server.errors import InvalidArgument, PermissionDenied
from keyplane.server.kinds import Role
from keyplane.server.store import StateStore

MASK = "********"
DATABASE_PASSWORD = "PKIDatabasePassword"  # noqa: S105 - a setting name
MIN_PASSWORD_LENGTH = 12
KINDS = ("ClientTLS", "IntermediateTLS", "ServerTLS", "MessageSigning")
# Key kinds of the state DB behind each settings Kind.
KIND_OF = {
    "IntermediateTLS": "intermediate_tls",
    "ServerTLS": "server_tls",
    "MessageSigning": "message_signing",
}
MAX_HOURS = 24 * 365 * 20


@dataclass(frozen=True)
class SettingDefinition:
    """What a setting is: its type, default, scope and whom it affects."""

    name: str
    value_type: str  # text | numeric | boolean | fraction | protected
    default: str
    affects: str  # server | client
    scope: str  # global | local
    description: str


def _rotation_definitions() -> list[SettingDefinition]:
    defaults = {"ClientTLS": (168, 4)}
    found = []
    for kind in KINDS:
        validity, window = defaults.get(kind, (720, 72))
        window_affects = "client" if kind == "ClientTLS" else "server"
        found.append(
            SettingDefinition(
                f"PKI{kind}KeyValidityHours",
                "numeric",
                str(validity),
                "server",
                "global",
                f"hours a {kind} certificate is valid",
            )
        )
        found.append(
            SettingDefinition(
                f"PKI{kind}KeyRenewalWindowHours",
                "numeric",
                str(window),
                window_affects,
                "global",
                f"renew a {kind} key this many hours before it expires",
            )
        )
    return found


DEFINITIONS: dict[str, SettingDefinition] = {
    d.name: d
    for d in [
        *_rotation_definitions(),
        SettingDefinition(
            "EnableLegacyProtocol",
            "boolean",
            "false",
            "server",
            "global",
            "serve the legacy root's public key file to legacy components",
        ),
        SettingDefinition(
            "OpenEnrollment",
            "boolean",
            "false",
            "server",
            "global",
            "let anyone with the init bundle enroll without a token",
        ),
        SettingDefinition(
            crl.CRL_BASE_URL_SETTING,
            "text",
            "",
            "server",
            "global",
            "http(s) URL under which CRLs are served (<base>/crl/<issuer>.crl): certificates "
            "issued from then on name their issuer's CRL there; empty: none do",
        ),
        SettingDefinition(
            crl.CRL_VALIDITY_SETTING,
            "numeric",
            str(crl.DEFAULT_VALIDITY_HOURS),
            "server",
            "global",
            "hours from a CRL's thisUpdate to its nextUpdate; it is signed anew at half that",
        ),
        SettingDefinition(
            "PKIRootRevocationMinCoverage",
            "fraction",
            "0.99",
            "server",
            "global",
            "revoke a root only once this share of live components has moved off it "
            "(roots coverage); --force revokes at once",
        ),
        SettingDefinition(
            DATABASE_PASSWORD,
            "protected",
            "",
            "server",
            "local",
            "password that seals pki.db; setting it re-seals every key at once",
        ),
    ]
}


@dataclass(frozen=True)
class Setting:
    """A setting's definition and its current value (masked when protected)."""

    definition: SettingDefinition
    value: str
    is_default: bool
    updated_at: datetime.datetime | None
    updated_by: str | None


def _check_value(definition: SettingDefinition, value: str) -> str:
    if definition.value_type == "numeric":
        try:
            number = int(value.strip())
        except ValueError:
            raise InvalidArgument(
                f"{definition.name} takes a whole number, not {value[:80]!r}"
            ) from None
        highest = (
            crl.MAX_VALIDITY_HOURS if definition.name == crl.CRL_VALIDITY_SETTING else MAX_HOURS
        )
        if number <= 0 or number > highest:
            raise InvalidArgument(f"{definition.name} must be between 1 and {highest}")
        return str(number)
    if definition.value_type == "fraction":
        try:
            share = float(value.strip())
        except ValueError:
            share = math.nan
        if not 0.0 <= share <= 1.0:  # NaN fails this too
            raise InvalidArgument(
                f"{definition.name} takes a fraction from 0 to 1 (0.99 is 99 %), not {value[:80]!r}"
            )
        return repr(share)
    if definition.value_type == "boolean":
        lowered = value.strip().lower()
        if lowered not in ("true", "false"):
            raise InvalidArgument(f"{definition.name} takes true or false, not {value[:80]!r}")
        return lowered
    if len(value) > 4096:
        raise InvalidArgument(f"{definition.name} is longer than 4096 characters")
    if definition.name == crl.CRL_BASE_URL_SETTING:
        try:
            return crl.check_base_url(value)
        except ValueError as exc:
            raise InvalidArgument(f"{definition.name} {exc}") from None
    if definition.name == DATABASE_PASSWORD and len(value) < MIN_PASSWORD_LENGTH:
        raise InvalidArgument(
            f"{DATABASE_PASSWORD} must be at least {MIN_PASSWORD_LENGTH} characters"
        )
    return value


def may_reveal(who: Identity) -> bool:
    """Whether `who` may see a protected value (the reveal is audited): admins only."""
    return Role.ADMIN in who.roles


class Settings:
    """Reads and validated writes of settings, over the state DB."""

    def __init__(
        self,
        store: StateStore,
        secrets: SecretStore,
        checkpoint: Callable[[str], None] = lambda point: None,
    ) -> None:
        self.store = store
        self.secrets = secrets
        # Called at each step of a database password change (crash tests kill there).
        self._checkpoint = checkpoint

    def definition(self, name: str) -> SettingDefinition:
        try:
            return DEFINITIONS[name]
        except KeyError:
            raise InvalidArgument(
                f"unknown setting {name[:80]!r}; 'keyplane settings list' shows every setting"
            ) from None

    def values(self) -> dict[str, str]:
        return dict(self._values())

    def _values(self) -> dict[str, str]:
        def compute() -> dict[str, str]:
            stored = self.store.settings()
            return {n: stored[n][0] if n in stored else d.default for n, d in DEFINITIONS.items()}

        return self.store.memo(("settings.values",), compute)

    def value(self, name: str) -> str:
        return self._values()[self.definition(name).name]

    def hours(self, name: str) -> datetime.timedelta:
        return datetime.timedelta(hours=int(self.value(name)))

    def flag(self, name: str) -> bool:
        return self.value(name) == "true"

    def fraction(self, name: str) -> float:
        return float(self.value(name))

    def rotation(self, kind: str) -> tuple[datetime.timedelta, datetime.timedelta]:
        """(validity, renewal window) for a settings Kind such as "ServerTLS"."""
        return self.store.memo(
            ("settings.rotation", kind),
            lambda: (
                self.hours(f"PKI{kind}KeyValidityHours"),
                self.hours(f"PKI{kind}KeyRenewalWindowHours"),
            ),
        )

    def client_values(self) -> dict[str, str]:
        """The settings that affect clients (published in the trust state)."""
        values = self.values()
        return {n: values[n] for n, d in DEFINITIONS.items() if d.affects == "client"}

    def _may_reveal(self, who: Identity | None) -> str:
        if who is None or not may_reveal(who):
            raise PermissionDenied("revealing a protected value needs the admin role")
        return who.actor

    def list(self, reveal: bool = False, who: Identity | None = None) -> list[Setting]:
        actor = self._may_reveal(who) if reveal else ""
        stored = self.store.settings()
        protected = [
            n for n, d in DEFINITIONS.items() if d.value_type == "protected" and n in stored
        ]
        if reveal and protected:
            # Audited before anything is shown: no record, no reveal.
            with self.store.transaction(datetime.datetime.now(datetime.UTC)) as tx:
                for name in protected:
                    tx.audit(actor, "setting.reveal", name)
        found = []
        for name, definition in DEFINITIONS.items():
            value, at, by = stored.get(name, (definition.default, None, None))
            if definition.value_type == "protected" and name in stored:
                secret = self.secrets.load_secret(name) if reveal else None
                value = secret.decode() if secret is not None else MASK
            found.append(Setting(definition, value, name not in stored, at, by))
        return found

    def get(self, name: str, reveal: bool = False, who: Identity | None = None) -> Setting:
        definition = self.definition(name)
        actor = self._may_reveal(who) if reveal else ""
        values = self.list(False)
        setting = next(s for s in values if s.definition.name == definition.name)
        if reveal and definition.value_type == "protected" and not setting.is_default:
            with self.store.transaction(datetime.datetime.now(datetime.UTC)) as tx:
                tx.audit(actor, "setting.reveal", name)
            secret = self.secrets.load_secret(name)
            value = secret.decode() if secret is not None else MASK
            return Setting(definition, value, False, setting.updated_at, setting.updated_by)
        return setting

    def check(self, name: str, value: str) -> tuple[SettingDefinition, str, dict[str, str]]:
        """A value checked as `set` checks it, saving nothing: its definition, the value
        as it would be stored, and every setting's value with it."""
        definition = self.definition(name)
        clean = _check_value(definition, value)
        values = self.values()
        values[name] = clean
        for kind in KINDS:
            validity = int(values[f"PKI{kind}KeyValidityHours"])
            window = int(values[f"PKI{kind}KeyRenewalWindowHours"])
            if window >= validity:
                raise InvalidArgument(
                    f"PKI{kind}KeyRenewalWindowHours ({window}) must be shorter than "
                    f"PKI{kind}KeyValidityHours ({validity})"
                )
        return definition, clean, values

    def trial(self, name: str, value: str) -> tuple[Setting, dict[str, str]]:
        """The setting as `set` would make it, and every value with it; nothing saved."""
        definition, clean, values = self.check(name, value)
        shown = MASK if definition.value_type == "protected" else clean
        return Setting(definition, shown, False, None, None), values

    def set(self, name: str, value: str, actor: str, now: datetime.datetime) -> Setting:
        definition, clean, _ = self.check(name, value)
        stored = clean
        if name == DATABASE_PASSWORD:
            # The new password reaches password_file before pki.db is re-sealed (the value
            # sealed with it, in one transaction); with nowhere to write it, refused and
            # nothing changes (FAILED_PRECONDITION, saying how to configure one).
            self.secrets.change_password(clean.encode(), name, self._checkpoint)
        elif definition.value_type == "protected":
            self.secrets.store_secret(name, clean.encode())
        if definition.value_type == "protected":
            stored = MASK  # the value itself lives sealed in pki.db, never in keyplane.db
        with self.store.transaction(now) as tx:
            tx.set_setting(name, stored, definition.scope, actor)
            shown = MASK if definition.value_type == "protected" else clean
            tx.audit(actor, "setting.update", name, value=shown)
        return self.get(name)
