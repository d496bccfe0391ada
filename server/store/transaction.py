"""Writes to the state DB, inside one BEGIN IMMEDIATE ... COMMIT. Every change audits
itself in the same transaction; `reads` sees what the transaction has written so far.

The audit log is only ever appended to, each event chained to the one before it
(audit_chain.py). A transaction reads the chain's head once, at its first event, and
keeps it: however many events a group commit writes, chaining costs no query per event.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from keyplane.server.kinds import KeyKind, KeyState
from keyplane.server.logs import current_rpc, log_changes
from keyplane.server.store import console
from keyplane.server.store.audit_chain import (
    AUDIT_COLUMNS,
    HEAD,
    event_hash,
    format_head,
    parse_head,
)
from keyplane.server.store.peers import PeerWrites
from keyplane.server.store.reads import Reads, on
from keyplane.server.store.records import (
    CERT_COLUMNS,
    KEY_COLUMNS,
    KEY_INTENT_PREFIX,
    AuditOutcome,
    CertificateRecord,
    CrlRecord,
    KeyRecord,
    TrustStateRecord,
    certificate_row,
    fingerprint_of,
    ts,
)


class AuditEntry(NamedTuple):
    """One event for audit_many: (actor, action, target, details as JSON) and, if known,
    the actor's certificate fingerprint (else the one an Actor carries), the fingerprints
    before and after the change, and the outcome."""

    actor: str
    action: str
    target: str
    details: str
    actor_fingerprint: str = ""
    before_fingerprint: str = ""
    after_fingerprint: str = ""
    outcome: str = AuditOutcome.OK


class Transaction:
    """One write transaction of the state DB."""

    def __init__(self, db: sqlite3.Connection, now: datetime.datetime) -> None:
        self._db = db
        self.now = now
        self.reads = Reads(lambda: on(db))
        # Set by writes that change what cached reads return (keys, settings,
        # revocations, trust states, zones); the commit then bumps the generation.
        self.changes_hierarchy = False
        self.after_commit: list[Callable[[], None]] = []
        # (id, hash) of the newest audit event, once this transaction has read it.
        self.audit_head: tuple[int, str] | None = None
        self._head_read: tuple[int, str] | None = None
        self.peers = PeerWrites(db, self)

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` once this transaction has committed (never if it rolls back)."""
        self.after_commit.append(callback)

    def audit(
        self,
        actor: str,
        action: str,
        target: str,
        *,
        actor_fingerprint: str = "",
        before_fingerprint: str = "",
        after_fingerprint: str = "",
        outcome: AuditOutcome = AuditOutcome.OK,
        **details: object,
    ) -> None:
        """Append one event at this transaction's time. `details` must hold no secret."""
        self.audit_many(
            [
                AuditEntry(
                    actor,
                    action,
                    target,
                    json.dumps(details, sort_keys=True),
                    actor_fingerprint,
                    before_fingerprint,
                    after_fingerprint,
                    outcome,
                )
            ]
        )

    def audit_many(self, entries: Sequence[tuple[str, ...]]) -> None:
        """Append events (AuditEntry fields, the first four at least: actor, action,
        target, details as JSON) at this transaction's time, chained in order."""
        if self.audit_head is None:
            row = self._db.execute("SELECT value FROM meta WHERE name = ?", (HEAD,)).fetchone()
            self.audit_head = self._head_read = parse_head(row[0] if row else None)
        head_id, head = self.audit_head
        at = ts(self.now) or ""
        rows = []
        for raw in entries:
            entry = AuditEntry(*raw)
            head_id += 1
            fields = (
                head_id,
                at,
                entry.actor,
                entry.actor_fingerprint or fingerprint_of(entry.actor),
                entry.action,
                entry.target,
                entry.details,
                entry.before_fingerprint,
                entry.after_fingerprint,
                str(entry.outcome),
            )
            digest = event_hash(*fields, head)
            rows.append((*fields, head, digest))
            head = digest
        self._db.executemany(
            f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({', '.join('?' * 12)})",  # noqa: S608
            rows,
        )
        self.audit_head = (head_id, head)
        # Logged once committed, with the RPC it came from (the committer thread runs in
        # the submitting call's context: see StateStore.group_commit_pending).
        # (actor, action, target, details, actor's fingerprint, before, after, outcome)
        logged = [(r[2], r[4], r[5], r[6], r[3], r[7], r[8], r[9]) for r in rows]
        rpc = current_rpc.get()
        self.after_commit.append(lambda: log_changes(logged, rpc))

    def write_audit_head(self) -> None:
        """Record the chain's new head in meta (once, at commit) if events were added."""
        if self.audit_head is not None and self.audit_head != self._head_read:
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (HEAD, format_head(*self.audit_head)),
            )

    # -- keys ----------------------------------------------------------------------------

    def next_root_number(self) -> int:
        row = self._db.execute(
            "SELECT value FROM meta WHERE name = 'highest_root_number'"
        ).fetchone()
        return int(row[0]) + 1 if row else 0

    def record_key_intent(self, uri: str, backend: str, label: str) -> None:
        """Note, before it is made, a key that `uri` will name: committed first, so that
        after a crash between making the key and recording it the key can be found."""
        self._db.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?)",
            (
                KEY_INTENT_PREFIX + uri,
                json.dumps({"backend": backend, "label": label, "at": ts(self.now)}),
            ),
        )

    def drop_key_intent(self, uri: str) -> None:
        self._db.execute("DELETE FROM meta WHERE name = ?", (KEY_INTENT_PREFIX + uri,))

    def insert_key(self, record: KeyRecord) -> None:
        """Record a key; the intent to make it, if one was noted, goes in the same commit."""
        self.changes_hierarchy = True
        self.drop_key_intent(record.key_uri)
        self._db.execute(
            f"INSERT INTO keys ({KEY_COLUMNS}) VALUES ({', '.join('?' * 16)})",  # noqa: S608
            (
                record.fingerprint,
                record.kind,
                record.name,
                record.number,
                record.algorithm,
                record.backend,
                record.key_uri,
                record.state,
                record.issuer_fingerprint,
                record.certificate_pem,
                ts(record.not_before),
                ts(record.not_after),
                ts(record.created_at),
                ts(record.revoked_at),
                record.revoked_by,
                record.revoke_reason,
            ),
        )
        if record.kind == KeyKind.ROOT and record.number is not None:
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES ('highest_root_number', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = max(CAST(value AS INTEGER), "
                "excluded.value)",
                (str(record.number),),
            )

    def add_key_usage(self, signatures: Mapping[str, int]) -> None:
        """Add signatures made (by key URI) to each key's count, used at this transaction's
        time. Not a change of the hierarchy: cached reads stay valid."""
        self._db.executemany(
            "UPDATE keys SET signatures = signatures + ?, last_used_at = ? WHERE key_uri = ?",
            [(count, ts(self.now), uri) for uri, count in signatures.items()],
        )

    def set_meta(self, name: str, value: str) -> None:
        """Keep a value the server needs later (e.g. what the last backup was)."""
        self._db.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def set_key_state(self, fingerprint: str, state: KeyState) -> None:
        self.changes_hierarchy = True
        self._db.execute("UPDATE keys SET state = ? WHERE fingerprint = ?", (state, fingerprint))

    def mark_key_destroyed(self, fingerprint: str) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "UPDATE keys SET destroyed_at = ? WHERE fingerprint = ?", (ts(self.now), fingerprint)
        )

    def revoke_key(
        self, fingerprint: str, kind: str, by: str, reason: str, reason_code: int = 0
    ) -> None:
        """Revoke a key; `reason_code` is its RFC 5280 CRLReason (0: unspecified)."""
        self.changes_hierarchy = True
        self._db.execute(
            "UPDATE keys SET state = 'revoked', revoked_at = ?, revoked_by = ?, "
            "revoke_reason = ?, revoke_reason_code = ? WHERE fingerprint = ?",
            (ts(self.now), by, reason, reason_code or None, fingerprint),
        )
        self._record_revocation(kind, fingerprint, by, reason)

    def _record_revocation(self, kind: str, target: str, by: str, reason: str) -> None:
        self._db.execute(
            "INSERT INTO revocations (target_kind, target, revoked_at, revoked_by, reason) "
            "VALUES (?, ?, ?, ?, ?)",
            (kind, target, ts(self.now), by, reason),
        )

    # -- certificates --------------------------------------------------------------------

    def insert_certificate(self, record: CertificateRecord) -> None:
        self.insert_certificates([certificate_row(record)])

    def insert_certificates(self, rows: list[tuple[object, ...]]) -> None:
        """Insert certificate_row()s: many rows, one statement."""
        self._db.executemany(
            f"INSERT INTO certificates ({CERT_COLUMNS}) VALUES ({', '.join('?' * 13)})",  # noqa: S608
            rows,
        )

    def insert_certificates_if_new(self, rows: list[tuple[object, ...]]) -> int:
        """Insert the certificate_row()s whose serial is not recorded yet; how many were."""
        before = self._db.total_changes
        self._db.executemany(
            f"INSERT OR IGNORE INTO certificates ({CERT_COLUMNS}) "  # noqa: S608
            f"VALUES ({', '.join('?' * 13)})",
            rows,
        )
        return self._db.total_changes - before

    def mark_renewed(self, serial: str, successor: str) -> bool:
        """Record that `serial` was renewed to `successor`; False if it had been already
        (a certificate renews once)."""
        return (
            self._db.execute(
                "UPDATE certificates SET renewed_to = ? WHERE serial = ? AND renewed_to IS NULL",
                (successor, serial),
            ).rowcount
            == 1
        )

    def mark_renewed_within(self, serial: str, successor: str, issuers: Sequence[str]) -> bool:
        """Record that `serial` was renewed to `successor`, only if one of `issuers`
        issued it and it was not renewed before (a zone marks only its own)."""
        if not issuers:
            return False
        marks = ", ".join("?" * len(issuers))
        return (
            self._db.execute(
                "UPDATE certificates SET renewed_to = ? WHERE serial = ? "  # noqa: S608
                f"AND renewed_to IS NULL AND issuer_fingerprint IN ({marks})",
                (successor, serial, *issuers),
            ).rowcount
            == 1
        )

    def record_sightings(
        self, seen: Sequence[tuple[str, datetime.datetime]], issuers: Sequence[str] | None = None
    ) -> None:
        """Keep when the holders of certificates were last seen: for each (serial, time),
        the later of the time kept and this one; only for recorded certificates, and
        with `issuers`, only those one of them issued."""
        where = ""
        if issuers is not None:
            if not issuers:
                return
            where = f" AND issuer_fingerprint IN ({', '.join('?' * len(issuers))})"
        self._db.executemany(
            "INSERT INTO certificate_sightings (serial, last_seen) "  # noqa: S608
            f"SELECT serial, ? FROM certificates WHERE serial = ?{where} "
            "ON CONFLICT (serial) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
            [(ts(at), serial, *(issuers or ())) for serial, at in seen],
        )

    def revoke_certificate(self, serial: str, by: str, reason: str, reason_code: int = 0) -> bool:
        """Revoke one certificate; False if it was revoked already. `reason_code` is its
        RFC 5280 CRLReason (0: unspecified)."""
        self.changes_hierarchy = True
        changed = self._db.execute(
            "UPDATE certificates SET revoked_at = ?, revoke_reason = ?, revoke_reason_code = ? "
            "WHERE serial = ? AND revoked_at IS NULL",
            (ts(self.now), reason, reason_code or None, serial),
        ).rowcount
        if changed:
            self._record_revocation("certificate", serial, by, reason)
        return changed == 1

    def revoke_certificates_issued_by(
        self, issuer_fingerprint: str, by: str, reason: str, reason_code: int = 0
    ) -> int:
        serials = [
            r[0]
            for r in self._db.execute(
                "SELECT serial FROM certificates WHERE issuer_fingerprint = ? "
                "AND revoked_at IS NULL",
                (issuer_fingerprint,),
            )
        ]
        for serial in serials:
            self.revoke_certificate(serial, by, reason, reason_code)
        return len(serials)

    # -- tokens --------------------------------------------------------------------------

    def insert_token(
        self, token_hash: str, role: str, uses: int, expires_at: datetime.datetime, by: str
    ) -> None:
        self._db.execute(
            "INSERT INTO enrollment_tokens (token_hash, role, uses_left, uses, expires_at, "
            "created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (token_hash, role, uses, uses, ts(expires_at), ts(self.now), by),
        )

    def consume_token(self, token_hash: str, role: str, uses: int = 1) -> bool:
        """Use the token `uses` times if it exists, has the role, is unexpired, unrevoked
        and has that many uses left; otherwise change nothing."""
        return (
            self._db.execute(
                "UPDATE enrollment_tokens SET uses_left = uses_left - ? WHERE token_hash = ? "
                "AND role = ? AND uses_left >= ? AND expires_at > ? AND revoked_at IS NULL",
                (uses, token_hash, role, max(uses, 1), ts(self.now)),
            ).rowcount
            == 1
        )

    def revoke_token(self, token_hash: str, by: str) -> bool:
        """Make the token unusable from now on; False if it was revoked already."""
        return (
            self._db.execute(
                "UPDATE enrollment_tokens SET revoked_at = ?, revoked_by = ? "
                "WHERE token_hash = ? AND revoked_at IS NULL",
                (ts(self.now), by, token_hash),
            ).rowcount
            == 1
        )

    # -- zones ---------------------------------------------------------------------------

    def insert_zone(self, name: str, listen: str, bootstrap_listen: str) -> int:
        """A new live zone; its id. The name must not be taken by a live zone."""
        self.changes_hierarchy = True
        cursor = self._db.execute(
            "INSERT INTO zones (name, listen, bootstrap_listen, registered_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, listen, bootstrap_listen, ts(self.now), ts(self.now)),
        )
        return int(cursor.lastrowid or 0)

    def set_zone_certificate(self, zone_id: int, serial: str) -> None:
        """The zone's TLS certificate is now `serial`; the one before stays usable (for
        calls already in flight) until it expires, but cannot renew."""
        self.changes_hierarchy = True
        self._db.execute(
            "UPDATE zones SET previous_tls_serial = tls_serial, tls_serial = ?, updated_at = ? "
            "WHERE id = ?",
            (serial, ts(self.now), zone_id),
        )

    def zone_seen(self, zone_id: int) -> None:
        self._db.execute("UPDATE zones SET last_seen = ? WHERE id = ?", (ts(self.now), zone_id))

    def revoke_zone(self, zone_id: int, by: str, reason: str) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "UPDATE zones SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ?",
            (ts(self.now), by, reason, zone_id),
        )
        self._record_revocation("zone", str(zone_id), by, reason)

    # -- settings and the trust state ----------------------------------------------------

    def set_setting(self, name: str, value: str, scope: str, by: str) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "INSERT INTO settings (name, value, scope, updated_at, updated_by) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
            (name, value, scope, ts(self.now), by),
        )

    def put_crl(self, record: CrlRecord) -> bool:
        """Keep `record` as its issuer's newest CRL. Its number must be above the one
        it replaces (a CRL number is never reused): otherwise nothing changes and this
        returns False."""
        self.changes_hierarchy = True
        return (
            self._db.execute(
                "INSERT INTO crls (issuer_fingerprint, crl_number, content_digest, "
                "this_update, next_update, der) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (issuer_fingerprint) DO UPDATE SET "
                "crl_number = excluded.crl_number, content_digest = excluded.content_digest, "
                "this_update = excluded.this_update, next_update = excluded.next_update, "
                "der = excluded.der WHERE excluded.crl_number > crls.crl_number",
                (
                    record.issuer_fingerprint,
                    record.crl_number,
                    record.content_digest,
                    ts(record.this_update),
                    ts(record.next_update),
                    record.der,
                ),
            ).rowcount
            == 1
        )

    def insert_trust_state(self, record: TrustStateRecord) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "INSERT INTO trust_states (version, content_digest, root_set, signed, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                record.version,
                record.content_digest,
                record.root_set,
                record.signed,
                ts(record.created_at),
            ),
        )

    # -- the console's sign-in links and sessions (store/console.py) ---------------------

    def insert_console_link(self, record: console.ConsoleLinkRecord) -> None:
        console.insert_link(self._db, record)

    def use_console_link(self, link_id: str) -> bool:
        return console.use_link(self._db, link_id, self.now)

    def insert_console_session(self, record: console.ConsoleSessionRecord) -> None:
        console.insert_session(self._db, record)

    def touch_console_session(self, session_id: str) -> None:
        console.touch_session(self._db, session_id, self.now)

    def end_console_session(self, session_id: str, reason: str) -> bool:
        return console.end_session(self._db, session_id, self.now, reason)

    def prune_console(self, before: datetime.datetime) -> None:
        console.prune(self._db, before)
