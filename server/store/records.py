"""What the state DB holds, as the domain sees it: one frozen record per row kind, and
the conversions between rows and records (times as ISO 8601 UTC text)."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass

from keyplane.server.kinds import KeyKind, KeyState


def ts(value: datetime.datetime | None) -> str | None:
    return value.astimezone(datetime.UTC).isoformat() if value is not None else None


def opt_dt(value: object) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(str(value)) if value is not None else None


def dt(value: object) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(value))


def opt_str(value: object) -> str | None:
    return str(value) if value is not None else None


@dataclass(frozen=True)
class KeyRecord:
    """One key of the hierarchy as the state DB knows it."""

    fingerprint: str
    kind: KeyKind
    name: str
    number: int | None
    algorithm: str
    backend: str
    key_uri: str
    state: KeyState
    issuer_fingerprint: str | None
    certificate_pem: str | None
    not_before: datetime.datetime | None
    not_after: datetime.datetime | None
    created_at: datetime.datetime
    revoked_at: datetime.datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None


@dataclass(frozen=True)
class KeyUsage:
    """How much a key has signed, and when it last did (to within a flush interval)."""

    signatures: int
    last_used_at: datetime.datetime | None


@dataclass(frozen=True)
class CertificateRecord:
    """A leaf certificate keyplane (or one of its zone servers) issued."""

    serial: str
    fingerprint: str
    subject: str
    role: str
    issuer_fingerprint: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    certificate_pem: str
    issued_at: datetime.datetime
    revoked_at: datetime.datetime | None = None
    revoke_reason: str | None = None
    token_hash: str | None = None
    renewed_to: str | None = None


@dataclass(frozen=True)
class TrustStateRecord:
    """One published trust-state version: its signed bytes and what it was built from."""

    version: int
    content_digest: str
    root_set: str
    signed: bytes
    created_at: datetime.datetime


@dataclass(frozen=True)
class ZoneRecord:
    """A zone server that enrolled with this server (live, or revoked and kept)."""

    id: int
    name: str
    listen: str
    bootstrap_listen: str
    tls_serial: str | None
    previous_tls_serial: str | None
    registered_at: datetime.datetime
    updated_at: datetime.datetime
    last_seen: datetime.datetime | None
    revoked_at: datetime.datetime | None
    revoked_by: str | None
    revoke_reason: str | None

    @property
    def key_uri(self) -> str:
        """How the zone's intermediates are named in the key inventory."""
        return f"zone:{self.name}#{self.id}"


class Actor(str):
    """Who did something, as the audit log names them: the name (a str, so it goes
    wherever an actor's name goes, e.g. revoked_by) carrying the fingerprint of the
    certificate key the actor called with ('' for none), which the audit records."""

    fingerprint: str

    def __new__(cls, name: str, fingerprint: str = "") -> Actor:
        actor = super().__new__(cls, name)
        actor.fingerprint = fingerprint
        return actor


def fingerprint_of(actor: str) -> str:
    """The certificate fingerprint an actor carries, if it is an Actor."""
    return actor.fingerprint if isinstance(actor, Actor) else ""


@dataclass(frozen=True)
class CrlRecord:
    """The newest CRL of one CA, DER-encoded as served."""

    issuer_fingerprint: str
    crl_number: int
    content_digest: str
    this_update: datetime.datetime
    next_update: datetime.datetime
    der: bytes


@dataclass(frozen=True)
class RevokedEntry:
    """A revoked certificate as a CRL lists it; `serial` is None for a key record
    (its serial is in `certificate_pem`)."""

    serial: str | None
    certificate_pem: str | None
    revoked_at: datetime.datetime
    reason_code: int | None
    not_after: datetime.datetime | None


class AuditOutcome(enum.StrEnum):
    """How the call an audit event records ended: it changed (or revealed) something, or
    it was refused (and changed nothing)."""

    OK = "ok"
    REFUSED = "refused"


@dataclass(frozen=True)
class AuditRecord:
    """One event of the audit log."""

    id: int
    at: datetime.datetime
    actor: str
    action: str
    target: str
    details: dict[str, object]
    actor_fingerprint: str = ""
    before_fingerprint: str = ""
    after_fingerprint: str = ""
    outcome: str = AuditOutcome.OK
    hash: str = ""


@dataclass(frozen=True)
class TokenRecord:
    """An enrollment token as stored: never its secret, only its hash."""

    token_hash: str
    role: str
    uses: int
    uses_left: int
    expires_at: datetime.datetime
    created_at: datetime.datetime
    created_by: str
    revoked_at: datetime.datetime | None = None
    revoked_by: str | None = None

    @property
    def token_id(self) -> str:
        """How tokens are named outside the DB: the first 16 hex digits of the hash."""
        return self.token_hash[:16]

    def state(self, now: datetime.datetime) -> str:
        """ "revoked", "spent", "expired" or "active" (the first that holds)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.uses_left <= 0:
            return "spent"
        if self.expires_at <= now:
            return "expired"
        return "active"


TOKEN_COLUMNS = (
    "token_hash, role, uses, uses_left, expires_at, created_at, created_by, "  # noqa: S105
    "revoked_at, revoked_by"
)


def token_record(row: tuple[object, ...]) -> TokenRecord:
    h, role, uses, left, expires, created, by, revoked, revoked_by = row
    return TokenRecord(
        str(h),
        str(role),
        int(str(uses)),
        int(str(left)),
        dt(expires),
        dt(created),
        str(by),
        opt_dt(revoked),
        opt_str(revoked_by),
    )


KEY_COLUMNS = (
    "fingerprint, kind, name, number, algorithm, backend, key_uri, state, issuer_fingerprint, "
    "certificate_pem, not_before, not_after, created_at, revoked_at, revoked_by, revoke_reason"
)
CERT_COLUMNS = (
    "serial, fingerprint, subject, role, issuer_fingerprint, not_before, not_after, "
    "certificate_pem, issued_at, revoked_at, revoke_reason, token_hash, renewed_to"
)
ZONE_COLUMNS = (
    "id, name, listen, bootstrap_listen, tls_serial, previous_tls_serial, registered_at, "
    "updated_at, last_seen, revoked_at, revoked_by, revoke_reason"
)


def certificate_row(record: CertificateRecord, token_hash: str | None = None) -> tuple[object, ...]:
    """A certificate record as the values of an INSERT INTO certificates (with the
    enrollment token it spent, if `token_hash` is given)."""
    return (
        record.serial,
        record.fingerprint,
        record.subject,
        record.role,
        record.issuer_fingerprint,
        ts(record.not_before),
        ts(record.not_after),
        record.certificate_pem,
        ts(record.issued_at),
        ts(record.revoked_at),
        record.revoke_reason,
        token_hash or record.token_hash,
        record.renewed_to,
    )


def key_record(row: tuple[object, ...]) -> KeyRecord:
    return KeyRecord(
        fingerprint=str(row[0]),
        kind=KeyKind(str(row[1])),
        name=str(row[2]),
        number=int(str(row[3])) if row[3] is not None else None,
        algorithm=str(row[4]),
        backend=str(row[5]),
        key_uri=str(row[6]),
        state=KeyState(str(row[7])),
        issuer_fingerprint=opt_str(row[8]),
        certificate_pem=opt_str(row[9]),
        not_before=opt_dt(row[10]),
        not_after=opt_dt(row[11]),
        created_at=dt(row[12]),
        revoked_at=opt_dt(row[13]),
        revoked_by=opt_str(row[14]),
        revoke_reason=opt_str(row[15]),
    )


def certificate_record(row: tuple[object, ...]) -> CertificateRecord:
    return CertificateRecord(
        serial=str(row[0]),
        fingerprint=str(row[1]),
        subject=str(row[2]),
        role=str(row[3]),
        issuer_fingerprint=str(row[4]),
        not_before=dt(row[5]),
        not_after=dt(row[6]),
        certificate_pem=str(row[7]),
        issued_at=dt(row[8]),
        revoked_at=opt_dt(row[9]),
        revoke_reason=opt_str(row[10]),
        token_hash=opt_str(row[11]),
        renewed_to=opt_str(row[12]),
    )


def zone_record(row: tuple[object, ...]) -> ZoneRecord:
    return ZoneRecord(
        id=int(str(row[0])),
        name=str(row[1]),
        listen=str(row[2]),
        bootstrap_listen=str(row[3]),
        tls_serial=opt_str(row[4]),
        previous_tls_serial=opt_str(row[5]),
        registered_at=dt(row[6]),
        updated_at=dt(row[7]),
        last_seen=opt_dt(row[8]),
        revoked_at=opt_dt(row[9]),
        revoked_by=opt_str(row[10]),
        revoke_reason=opt_str(row[11]),
    )


# meta rows named KEY_INTENT_PREFIX + a key URI: a key being made (see KeyIntent).
KEY_INTENT_PREFIX = "key_intent:"


@dataclass(frozen=True)
class KeyIntent:
    """A key a process set out to make, recorded before the key exists: until a key
    record names its URI, the key (if it was made) belongs to no one."""

    uri: str
    backend: str
    label: str
    at: datetime.datetime
