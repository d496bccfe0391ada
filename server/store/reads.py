"""Reads of the state DB, over whichever connection they are given: a pooled reader for
ordinary reads, or the write connection inside a transaction, so that what a change is
about to commit (a revocation) can be read back before it commits (to publish it)."""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from collections.abc import Callable, Iterator

from keyplane.server.store.peers import PeerReads
from keyplane.server.store.records import (
    CERT_COLUMNS,
    KEY_COLUMNS,
    ZONE_COLUMNS,
    AuditRecord,
    CertificateRecord,
    KeyRecord,
    TrustStateRecord,
    ZoneRecord,
    certificate_record,
    dt,
    key_record,
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

    def certificates(self, role: str | None = None, limit: int = 1000) -> list[CertificateRecord]:
        where, args = ("WHERE role = ?", (role,)) if role else ("", ())
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

    def token(self, token_hash: str) -> tuple[str, int, datetime.datetime] | None:
        """(role, uses left, expiry) of an enrollment token, or None if unknown."""
        with self._connect() as db:
            row = db.execute(
                "SELECT role, uses_left, expires_at FROM enrollment_tokens WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
        return (str(row[0]), int(row[1]), dt(row[2])) if row else None

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

    def settings(self) -> dict[str, tuple[str, datetime.datetime, str]]:
        """Stored settings: name -> (value, updated at, updated by)."""
        with self._connect() as db:
            rows = db.execute("SELECT name, value, updated_at, updated_by FROM settings").fetchall()
        return {str(n): (str(v), dt(at), str(by)) for n, v, at, by in rows}

    def audit_log(self, limit: int = 1000) -> list[AuditRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, at, actor, action, target, details FROM audit ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            AuditRecord(int(i), dt(at), actor, action, target, json.loads(details))
            for i, at, actor, action, target, details in reversed(rows)
        ]

    def revocation_sequence(self) -> int:
        with self._connect() as db:
            row = db.execute("SELECT max(seq) FROM revocations").fetchone()
        return int(row[0] or 0)

    def generation(self) -> int:
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        return int(row[0]) if row else 0
