"""Reads of the state DB, over whichever connection they are given: a pooled reader for
ordinary reads, or the write connection inside a transaction, so that what a change is
about to commit (a revocation) can be read back before it commits (to publish it)."""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from collections.abc import Callable, Iterator

from keyplane.server.store import console
from keyplane.server.store.audit_chain import AUDIT_COLUMNS, HEAD, ChainedEvent, parse_head
from keyplane.server.store.coverage import CoverageReads
from keyplane.server.store.peers import PeerReads
from keyplane.server.store.records import (
    CERT_COLUMNS,
    KEY_COLUMNS,
    KEY_INTENT_PREFIX,
    TOKEN_COLUMNS,
    ZONE_COLUMNS,
    AuditRecord,
    CertificateRecord,
    CrlRecord,
    KeyIntent,
    KeyRecord,
    KeyUsage,
    RevokedEntry,
    TokenRecord,
    TrustStateRecord,
    ZoneRecord,
    certificate_record,
    dt,
    key_record,
    opt_dt,
    opt_str,
    token_record,
    ts,
    zone_record,
)

Connect = Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]


@contextlib.contextmanager
def on(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A Connect for one connection that is already open."""
    yield db


class Reads:
    """Every read the domain needs, uncached."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self.peers = PeerReads(connect)
        self.coverage = CoverageReads(connect)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Reads]:
        """Reads that all see the DB as it was at the first of them (one read
        transaction), e.g. to walk the whole audit chain while changes go on."""
        with self._connect() as db:
            db.execute("BEGIN")
            try:
                yield Reads(lambda: on(db))
            finally:
                db.execute("ROLLBACK")

    def keys_where(self, where: str, args: tuple[object, ...]) -> list[KeyRecord]:
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {KEY_COLUMNS} FROM keys WHERE {where} "  # noqa: S608
                "ORDER BY created_at, number",
                args,
            ).fetchall()
        return [key_record(r) for r in rows]

    def keys(self, kind: str, states: tuple[str, ...] | None = None) -> list[KeyRecord]:
        if states is None:
            return self.keys_where("kind = ?", (kind,))
        marks = ", ".join("?" * len(states))
        return self.keys_where(f"kind = ? AND state IN ({marks})", (kind, *states))

    def key_with_uri(self, uri: str) -> KeyRecord | None:
        found = self.keys_where("key_uri = ?", (uri,))
        return found[0] if found else None

    def key_intents(self) -> list[KeyIntent]:
        """Keys set out to be made whose record has not committed (oldest first)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT name, value FROM meta WHERE substr(name, 1, ?) = ?",
                (len(KEY_INTENT_PREFIX), KEY_INTENT_PREFIX),
            ).fetchall()
        intents = []
        for name, value in rows:
            fields = json.loads(value)
            intents.append(
                KeyIntent(
                    str(name)[len(KEY_INTENT_PREFIX) :],
                    str(fields["backend"]),
                    str(fields["label"]),
                    dt(fields["at"]),
                )
            )
        return sorted(intents, key=lambda i: i.at)

    def key_destroyed(self, fingerprint: str) -> bool:
        with self._connect() as db:
            row = db.execute(
                "SELECT destroyed_at FROM keys WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
        return bool(row and row[0])

    def certificate(self, serial: str) -> CertificateRecord | None:
        with self._connect() as db:
            row = db.execute(
                f"SELECT {CERT_COLUMNS} FROM certificates WHERE serial = ?",  # noqa: S608
                (serial,),
            ).fetchone()
        return certificate_record(row) if row else None

    def certificates(
        self, role: str | None = None, limit: int = 1000, search: str = ""
    ) -> list[CertificateRecord]:
        """Newest first; with `search`, those whose serial starts with it or whose
        subject contains it (any case)."""
        conditions: list[str] = []
        args: tuple[object, ...] = ()
        if role:
            conditions.append("role = ?")
            args += (role,)
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conditions.append("(serial LIKE ? ESCAPE '\\' OR subject LIKE ? ESCAPE '\\')")
            args += (escaped.lower() + "%", "%" + escaped + "%")
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {CERT_COLUMNS} FROM certificates {where} "  # noqa: S608
                "ORDER BY issued_at DESC, serial DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [certificate_record(r) for r in rows]

    def certificates_for_key(self, fingerprint: str) -> list[CertificateRecord]:
        """Every certificate recorded for the key with this fingerprint, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {CERT_COLUMNS} FROM certificates WHERE fingerprint = ? "  # noqa: S608
                "ORDER BY issued_at",
                (fingerprint,),
            ).fetchall()
        return [certificate_record(r) for r in rows]

    def certificates_of_token(self, token_hash: str) -> int:
        """How many certificates were issued for uses of this enrollment token."""
        with self._connect() as db:
            row = db.execute(
                "SELECT count(*) FROM certificates WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return int(row[0])

    def issued_by_count(self, issuer_fingerprint: str) -> int:
        """How many certificates the key with this fingerprint issued."""
        with self._connect() as db:
            row = db.execute(
                "SELECT count(*) FROM certificates WHERE issuer_fingerprint = ?",
                (issuer_fingerprint,),
            ).fetchone()
        return int(row[0])

    def token(self, token_hash: str) -> TokenRecord | None:
        """An enrollment token by its hash, or None if unknown."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE token_hash = ?",  # noqa: S608
                (token_hash,),
            ).fetchone()
        return token_record(row) if row else None

    def tokens_with_id(self, token_id: str) -> list[TokenRecord]:
        """The tokens whose hash starts with `token_id` (lowercase hex), from the index."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {TOKEN_COLUMNS} FROM enrollment_tokens "  # noqa: S608
                "WHERE token_hash >= ? AND token_hash < ? || 'g'",
                (token_id, token_id),
            ).fetchall()
        return [token_record(r) for r in rows]

    def tokens(
        self, usable_at: datetime.datetime | None = None, limit: int = 1000
    ) -> list[TokenRecord]:
        """Enrollment tokens, newest first; with `usable_at`, only those usable then."""
        where, args = (
            ("WHERE revoked_at IS NULL AND uses_left > 0 AND expires_at > ?", (ts(usable_at),))
            if usable_at is not None
            else ("", ())
        )
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {TOKEN_COLUMNS} FROM enrollment_tokens {where} "  # noqa: S608
                "ORDER BY created_at DESC, token_hash LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [token_record(r) for r in rows]

    def console_link(self, link_id: str) -> console.ConsoleLinkRecord | None:
        with self._connect() as db:
            return console.read_link(db, link_id)

    def console_session(self, session_id: str) -> console.ConsoleSessionRecord | None:
        with self._connect() as db:
            return console.read_session(db, session_id)

    def zones(self, include_revoked: bool = False) -> list[ZoneRecord]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {ZONE_COLUMNS} FROM zones {where} ORDER BY name, id"  # noqa: S608
            ).fetchall()
        return [zone_record(r) for r in rows]

    def zone_of_certificate(self, serial: str) -> ZoneRecord | None:
        """The live zone whose current or previous TLS certificate has this serial."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT {ZONE_COLUMNS} FROM zones WHERE revoked_at IS NULL "  # noqa: S608
                "AND (tls_serial = ? OR previous_tls_serial = ?)",
                (serial, serial),
            ).fetchone()
        return zone_record(row) if row else None

    def trust_states(self, where: str, args: tuple[object, ...]) -> list[TrustStateRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT version, content_digest, root_set, signed, created_at "  # noqa: S608
                f"FROM trust_states {where}",
                args,
            ).fetchall()
        return [TrustStateRecord(int(v), str(d), str(r), bytes(s), dt(c)) for v, d, r, s, c in rows]

    def revoked_certificates(self) -> list[tuple[str, str, datetime.datetime]]:
        """(serial, key fingerprint, not after) of every revoked certificate."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT serial, fingerprint, not_after FROM certificates "
                "WHERE revoked_at IS NOT NULL ORDER BY serial"
            ).fetchall()
        return [(str(s), str(f), dt(na)) for s, f, na in rows]

    def revoked_under(self, issuer_fingerprint: str) -> list[RevokedEntry]:
        """Every revoked certificate and subordinate key the issuer certified, for its
        CRL."""
        with self._connect() as db:
            certificates = db.execute(
                "SELECT serial, revoked_at, revoke_reason_code, not_after FROM certificates "
                "WHERE issuer_fingerprint = ? AND revoked_at IS NOT NULL",
                (issuer_fingerprint,),
            ).fetchall()
            keys = db.execute(
                "SELECT certificate_pem, revoked_at, revoke_reason_code, not_after FROM keys "
                "WHERE issuer_fingerprint = ? AND state = 'revoked' AND revoked_at IS NOT NULL",
                (issuer_fingerprint,),
            ).fetchall()
        found = [
            RevokedEntry(str(s), None, dt(at), None if c is None else int(c), dt(na))
            for s, at, c, na in certificates
        ]
        found.extend(
            RevokedEntry(None, opt_str(pem), dt(at), None if c is None else int(c), opt_dt(na))
            for pem, at, c, na in keys
        )
        return found

    def crls(self) -> list[CrlRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT issuer_fingerprint, crl_number, content_digest, this_update, "
                "next_update, der FROM crls"
            ).fetchall()
        return [
            CrlRecord(str(f), int(n), str(d), dt(t), dt(u), bytes(b)) for f, n, d, t, u, b in rows
        ]

    def settings(self) -> dict[str, tuple[str, datetime.datetime, str]]:
        """Stored settings: name -> (value, updated at, updated by)."""
        with self._connect() as db:
            rows = db.execute("SELECT name, value, updated_at, updated_by FROM settings").fetchall()
        return {str(n): (str(v), dt(at), str(by)) for n, v, at, by in rows}

    def audit_log(self, limit: int = 1000) -> list[AuditRecord]:
        """The newest `limit` events, oldest first."""
        return list(reversed(self.audit_events(limit=limit)))

    def audit_events(
        self,
        limit: int,
        before_id: int | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        actor: str = "",
        action: str = "",
    ) -> list[AuditRecord]:
        """Up to `limit` events, newest first: older than event `before_id`, at or after
        `since`, before `until`, by `actor` (its fingerprint, its full name or the name
        before " (serial ..."), with `action`."""
        conditions: list[str] = []
        args: list[object] = []
        if before_id is not None:
            conditions.append("id < ?")
            args.append(before_id)
        if since is not None:
            conditions.append("at >= ?")
            args.append(ts(since))
        if until is not None:
            conditions.append("at < ?")
            args.append(ts(until))
        if actor:
            prefix = actor + " (serial "
            conditions.append("(actor_fingerprint = ? OR actor = ? OR substr(actor, 1, ?) = ?)")
            args.extend([actor.lower(), actor, len(prefix), prefix])
        if action:
            conditions.append("action = ?")
            args.append(action)
        clause = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {AUDIT_COLUMNS} FROM audit {clause} "  # noqa: S608
                "ORDER BY id DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_audit_record(ChainedEvent(*r)) for r in rows]

    def audit_chain(self, after_id: int, limit: int) -> list[ChainedEvent]:
        """Up to `limit` events as stored, from the one after `after_id` on, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {AUDIT_COLUMNS} FROM audit WHERE id > ? "  # noqa: S608
                "ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [ChainedEvent(*r) for r in rows]

    def audit_head(self) -> tuple[int, str]:
        """(id, hash) of the newest event as meta records it."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE name = ?", (HEAD,)).fetchone()
        return parse_head(row[0] if row else None)

    def revocation_sequence(self) -> int:
        with self._connect() as db:
            row = db.execute("SELECT max(seq) FROM revocations").fetchone()
        return int(row[0] or 0)

    def trust_version_floor(self) -> int:
        """A version the next trust state must be above (set by a restore: components
        may hold versions the replaced server published after the backup)."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'trust_version_floor'").fetchone()
        return int(row[0]) if row else 0

    def generation(self) -> int:
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def key_usage(self) -> dict[str, KeyUsage]:
        """Signatures made and when last used, by key fingerprint (keys used at least once)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT fingerprint, signatures, last_used_at FROM keys WHERE signatures > 0"
            ).fetchall()
        return {str(r[0]): KeyUsage(int(r[1]), opt_dt(r[2])) for r in rows}

    def meta_value(self, name: str) -> str | None:
        """A value the server keeps in meta (e.g. 'last_backup'), or None."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else None


def _audit_record(event: ChainedEvent) -> AuditRecord:
    return AuditRecord(
        event.id,
        dt(event.at),
        event.actor,
        event.action,
        event.target,
        json.loads(event.details),
        event.actor_fingerprint,
        event.before_fingerprint,
        event.after_fingerprint,
        event.outcome,
        event.hash,
    )
