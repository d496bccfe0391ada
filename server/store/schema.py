"""The state DB's schema: the current one for a new `keyplane.db`, and the steps that
bring an older one up to date (each in its own transaction, so a crash mid-way leaves
the DB at one version or the next, never between)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from keyplane.server.store.audit_chain import (
    AUDIT_COLUMNS,
    GENESIS,
    HEAD,
    ChainedEvent,
    event_hash,
    format_head,
)

SCHEMA_VERSION = 9

# When the holders of certificates were last seen (written in batches), and an index
# of the live certificates (unrevoked, not renewed) by role and issuer: coverage and
# the renewal forecast read them with one aggregate query each.
SIGHTINGS = """
CREATE TABLE IF NOT EXISTS certificate_sightings (
    serial TEXT PRIMARY KEY,
    last_seen TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS certificates_live
    ON certificates (role, issuer_fingerprint, issued_at, not_after)
    WHERE revoked_at IS NULL AND renewed_to IS NULL;
"""

# The admin console's one-time sign-in links and sessions (store/console.py): each
# secret only as its SHA-256, looked up by the public id beside it.
CONSOLE = """
CREATE TABLE console_links (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    serial TEXT NOT NULL REFERENCES certificates (serial),
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    used_at TEXT
);
CREATE TABLE console_sessions (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    serial TEXT NOT NULL REFERENCES certificates (serial),
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    ended_at TEXT,
    end_reason TEXT
);
"""

# The audit log is append-only: no statement may change or remove an event (keyplane's
# store has no such write either). Someone with the file can drop these; the hash chain
# (audit_chain.py) is what shows that they did.
AUDIT_TRIGGERS = """
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: an event cannot be changed');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: an event cannot be deleted');
END;
"""

# The current schema, for a new DB.
SCHEMA = (
    """
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE keys (
    fingerprint TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('root', 'legacy_root', 'server_tls',
        'intermediate_tls', 'message_signing', 'zone_intermediate')),
    name TEXT NOT NULL,
    number INTEGER,
    algorithm TEXT NOT NULL,
    backend TEXT NOT NULL,
    key_uri TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('prepared', 'active', 'retired', 'revoked')),
    issuer_fingerprint TEXT REFERENCES keys (fingerprint),
    certificate_pem TEXT,
    not_before TEXT,
    not_after TEXT,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    revoked_by TEXT,
    revoke_reason TEXT,
    destroyed_at TEXT,
    -- RFC 5280 CRLReason of the revocation (NULL: unspecified).
    revoke_reason_code INTEGER,
    -- Signatures the key has made, and when it was last used, added up in batches.
    signatures INTEGER NOT NULL DEFAULT 0,
    last_used_at TEXT
);
CREATE UNIQUE INDEX keys_root_number ON keys (number) WHERE kind = 'root';
CREATE INDEX keys_kind_state ON keys (kind, state);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    -- SHA-256 of the certificate's key: a key is certified once, and never again once
    -- a certificate for it was revoked.
    fingerprint TEXT NOT NULL,
    subject TEXT NOT NULL,
    role TEXT NOT NULL,
    issuer_fingerprint TEXT NOT NULL REFERENCES keys (fingerprint),
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    certificate_pem TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    revoked_at TEXT,
    revoke_reason TEXT,
    -- The enrollment token a use of which this certificate spent.
    token_hash TEXT,
    -- The certificate this one was renewed to: a certificate renews once.
    renewed_to TEXT,
    -- RFC 5280 CRLReason of the revocation (NULL: unspecified).
    revoke_reason_code INTEGER
);
CREATE INDEX certificates_issuer ON certificates (issuer_fingerprint);
-- Newest first, by role or not, straight from an index: ListCertificates reads a page
-- without sorting the table.
CREATE INDEX certificates_newest ON certificates (issued_at, serial);
CREATE INDEX certificates_role_newest ON certificates (role, issued_at, serial);
-- The revoked few, without a scan of every certificate.
CREATE INDEX certificates_revoked ON certificates (serial) WHERE revoked_at IS NOT NULL;
CREATE INDEX certificates_key ON certificates (fingerprint);
-- A CA's CRL lists what it issued that was revoked.
CREATE INDEX certificates_revoked_by_issuer ON certificates (issuer_fingerprint)
    WHERE revoked_at IS NOT NULL;
CREATE TABLE revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    target_kind TEXT NOT NULL,
    target TEXT NOT NULL,
    revoked_at TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    reason TEXT NOT NULL
);
-- The newest CRL of each CA: those this server signs (its roots and intermediates) and
-- those its zones sign and send it. A CRL number only grows (see domain/crl.py).
CREATE TABLE crls (
    issuer_fingerprint TEXT PRIMARY KEY REFERENCES keys (fingerprint),
    crl_number INTEGER NOT NULL,
    content_digest TEXT NOT NULL,
    this_update TEXT NOT NULL,
    next_update TEXT NOT NULL,
    der BLOB NOT NULL
);
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('global', 'local')),
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE trust_states (
    version INTEGER PRIMARY KEY,
    content_digest TEXT NOT NULL,
    root_set TEXT NOT NULL,
    signed BLOB NOT NULL,
    created_at TEXT NOT NULL
);
-- Trust with peer servers (active/active): one row per request, whichever side made
-- it; a live one (under way or trusted) per peer fqdn. The peer's last accepted trust
-- state is kept with it: what this server admits of the peer, and publishes.
CREATE TABLE trust_peers (
    id TEXT PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('outgoing', 'incoming')),
    state TEXT NOT NULL CHECK (state IN ('awaiting-nonce', 'pending', 'trusted', 'rejected',
        'revoked', 'superseded')),
    fqdn TEXT NOT NULL,
    listen TEXT NOT NULL,
    bootstrap_listen TEXT NOT NULL,
    peer_roots_pem TEXT NOT NULL,
    own_fingerprints TEXT NOT NULL,
    commitment BLOB,
    own_nonce BLOB,
    peer_nonce BLOB,
    offer BLOB,
    comparison_code TEXT,
    peer_state BLOB,
    peer_version INTEGER NOT NULL DEFAULT 0,
    peer_updated_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    trusted_at TEXT,
    -- An END (revocation or withdrawal) the peer has not heard yet.
    end_unsent INTEGER NOT NULL DEFAULT 0,
    end_reason TEXT
);
CREATE UNIQUE INDEX trust_peers_live ON trust_peers (fqdn)
    WHERE state IN ('awaiting-nonce', 'pending', 'trusted');
-- Every step of trust with peers (requested, received, approved, rejected, revoked,
-- superseded, refused updates): who, when, which fingerprints.
CREATE TABLE trust_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fqdn TEXT NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    fingerprints TEXT NOT NULL,
    detail TEXT NOT NULL
);
-- Certificates a trusted peer issued that this server renewed: each renews once here.
CREATE TABLE peer_renewals (
    serial TEXT PRIMARY KEY,
    successor TEXT NOT NULL REFERENCES certificates (serial),
    fqdn TEXT NOT NULL,
    renewed_at TEXT NOT NULL
);
CREATE TABLE enrollment_tokens (
    token_hash TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('agent', 'zone-server')),
    uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
    uses INTEGER NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    -- A revoked token is unusable at once, whatever uses it has left.
    revoked_at TEXT,
    revoked_by TEXT
);
-- Zone servers. Identified by their enrolled certificates, not their names: a name is
-- taken while its zone is live, and free again once that zone is revoked (the revoked
-- row stays, as history).
CREATE TABLE zones (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    listen TEXT NOT NULL,
    bootstrap_listen TEXT NOT NULL,
    tls_serial TEXT,
    previous_tls_serial TEXT,
    registered_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_seen TEXT,
    revoked_at TEXT,
    revoked_by TEXT,
    revoke_reason TEXT
);
CREATE UNIQUE INDEX zones_live_name ON zones (name) WHERE revoked_at IS NULL;
-- The audit log: append-only (AUDIT_TRIGGERS) and hash-chained (audit_chain.py). Ids
-- are given by the writer and run 1, 2, 3 ... without gaps.
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    -- JSON object; never a secret.
    details TEXT NOT NULL,
    -- SHA-256 of the key of the certificate the actor called with ('' for the server
    -- itself, a token holder, or events from before schema 4).
    actor_fingerprint TEXT NOT NULL DEFAULT '',
    -- Fingerprints of the key the change replaced or removed, and of the one it made.
    before_fingerprint TEXT NOT NULL DEFAULT '',
    after_fingerprint TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT 'ok' CHECK (outcome IN ('ok', 'refused')),
    prev_hash TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_at ON audit (at, id);
CREATE INDEX audit_action ON audit (action, id);
"""
    + AUDIT_TRIGGERS
    + CONSOLE
    + SIGHTINGS
)

# schema version -> the statements that turn the version before it into it.
MIGRATIONS: dict[int, str] = {
    2: """
DROP INDEX IF EXISTS certificates_issued;
DROP INDEX IF EXISTS certificates_role_issued;
CREATE INDEX IF NOT EXISTS certificates_newest ON certificates (issued_at, serial);
CREATE INDEX IF NOT EXISTS certificates_role_newest ON certificates (role, issued_at, serial);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates (serial)
    WHERE revoked_at IS NOT NULL;
ALTER TABLE certificates ADD COLUMN token_hash TEXT;
""",
    3: """
ALTER TABLE certificates ADD COLUMN renewed_to TEXT;
CREATE INDEX certificates_key ON certificates (fingerprint);
CREATE TABLE zones (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    listen TEXT NOT NULL,
    bootstrap_listen TEXT NOT NULL,
    tls_serial TEXT,
    previous_tls_serial TEXT,
    registered_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_seen TEXT,
    revoked_at TEXT,
    revoked_by TEXT,
    revoke_reason TEXT
);
CREATE UNIQUE INDEX zones_live_name ON zones (name) WHERE revoked_at IS NULL;
INSERT INTO zones (name, listen, bootstrap_listen, registered_at, updated_at)
    SELECT name, listen, bootstrap_listen, registered_at, updated_at FROM zone_servers;
UPDATE keys SET key_uri = (
    SELECT 'zone:' || z.name || '#' || z.id FROM zones z WHERE 'zone:' || z.name = keys.key_uri
) WHERE kind = 'zone_intermediate' AND key_uri IN (SELECT 'zone:' || name FROM zones);
DROP TABLE zone_servers;
""",
    # The audit hash chain and token revocation; _chain_audit then chains the events
    # already there and makes the log append-only.
    4: """
ALTER TABLE audit ADD COLUMN actor_fingerprint TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN before_fingerprint TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN after_fingerprint TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN outcome TEXT NOT NULL DEFAULT 'ok'
    CHECK (outcome IN ('ok', 'refused'));
ALTER TABLE audit ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN hash TEXT NOT NULL DEFAULT '';
CREATE INDEX audit_at ON audit (at, id);
CREATE INDEX audit_action ON audit (action, id);
ALTER TABLE enrollment_tokens ADD COLUMN revoked_at TEXT;
ALTER TABLE enrollment_tokens ADD COLUMN revoked_by TEXT;
""",
    # Active/active: trust with peer servers, its history, renewals of peers' certificates.
    5: """
-- Trust with peer servers (active/active): one row per request, whichever side made
-- it; a live one (under way or trusted) per peer fqdn. The peer's last accepted trust
-- state is kept with it: what this server admits of the peer, and publishes.
CREATE TABLE trust_peers (
    id TEXT PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('outgoing', 'incoming')),
    state TEXT NOT NULL CHECK (state IN ('awaiting-nonce', 'pending', 'trusted', 'rejected',
        'revoked', 'superseded')),
    fqdn TEXT NOT NULL,
    listen TEXT NOT NULL,
    bootstrap_listen TEXT NOT NULL,
    peer_roots_pem TEXT NOT NULL,
    own_fingerprints TEXT NOT NULL,
    commitment BLOB,
    own_nonce BLOB,
    peer_nonce BLOB,
    offer BLOB,
    comparison_code TEXT,
    peer_state BLOB,
    peer_version INTEGER NOT NULL DEFAULT 0,
    peer_updated_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    trusted_at TEXT,
    -- An END (revocation or withdrawal) the peer has not heard yet.
    end_unsent INTEGER NOT NULL DEFAULT 0,
    end_reason TEXT
);
CREATE UNIQUE INDEX trust_peers_live ON trust_peers (fqdn)
    WHERE state IN ('awaiting-nonce', 'pending', 'trusted');
-- Every step of trust with peers (requested, received, approved, rejected, revoked,
-- superseded, refused updates): who, when, which fingerprints.
CREATE TABLE trust_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fqdn TEXT NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    fingerprints TEXT NOT NULL,
    detail TEXT NOT NULL
);
-- Certificates a trusted peer issued that this server renewed: each renews once here.
CREATE TABLE peer_renewals (
    serial TEXT PRIMARY KEY,
    successor TEXT NOT NULL REFERENCES certificates (serial),
    fqdn TEXT NOT NULL,
    renewed_at TEXT NOT NULL
);
""",
    # CRLs: the newest one of each CA, and the reason code of every revocation.
    6: """
ALTER TABLE keys ADD COLUMN revoke_reason_code INTEGER;
ALTER TABLE certificates ADD COLUMN revoke_reason_code INTEGER;
CREATE INDEX certificates_revoked_by_issuer ON certificates (issuer_fingerprint)
    WHERE revoked_at IS NOT NULL;
-- The newest CRL of each CA: those this server signs (its roots and intermediates) and
-- those its zones sign and send it. A CRL number only grows (see domain/crl.py).
CREATE TABLE crls (
    issuer_fingerprint TEXT PRIMARY KEY REFERENCES keys (fingerprint),
    crl_number INTEGER NOT NULL,
    content_digest TEXT NOT NULL,
    this_update TEXT NOT NULL,
    next_update TEXT NOT NULL,
    der BLOB NOT NULL
);
""",
    # Per-key usage counters.
    7: """
ALTER TABLE keys ADD COLUMN signatures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN last_used_at TEXT;
""",
    # The admin console's one-time sign-in links and its sessions.
    8: CONSOLE,
    # Root rotation an operator can watch: sightings and the live-certificate index.
    9: SIGHTINGS,
}


def _chain_audit(db: sqlite3.Connection) -> None:
    """Chain the events an older keyplane wrote, oldest first, then make the log
    append-only. Their ids are closed up first if any are missing (keyplane never
    deleted an event, so none should be), since the chain takes ids to run without gaps."""
    ids = [int(r[0]) for r in db.execute("SELECT id FROM audit ORDER BY id")]
    for rank, old in enumerate(ids, start=1):
        if rank != old:  # every id below `old` has moved to its rank already: free
            db.execute("UPDATE audit SET id = ? WHERE id = ?", (rank, old))
    head_id, head = 0, GENESIS
    chained: list[tuple[str, str, int]] = []
    for row in db.execute(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY id"):  # noqa: S608
        event = ChainedEvent(*row)
        digest = event_hash(*event[:-2], head)
        chained.append((head, digest, event.id))
        head_id, head = event.id, digest
    db.executemany("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", chained)
    db.execute(
        "INSERT INTO meta (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (HEAD, format_head(head_id, head)),
    )
    for statement in _statements(AUDIT_TRIGGERS):
        db.execute(statement)


# Steps in Python, run after the statements of the same version (in its transaction).
AFTER_MIGRATION: dict[int, Callable[[sqlite3.Connection], None]] = {4: _chain_audit}


class SchemaError(Exception):
    """The state DB's schema cannot be used by this keyplane."""


def initialise(db: sqlite3.Connection, name: str) -> None:
    """Create the schema in a new DB, or migrate an older one; each step commits alone."""
    db.execute("BEGIN IMMEDIATE")
    try:
        fresh = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None
        if fresh:
            for statement in _statements(SCHEMA):
                db.execute(statement)
            db.execute(
                "INSERT INTO meta (name, value) VALUES ('schema_version', ?), "
                "('generation', '0'), (?, ?)",
                (str(SCHEMA_VERSION), HEAD, format_head(0, GENESIS)),
            )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    version = int(row[0]) if row else 1
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{name} has schema version {version}, newer than this keyplane knows "
            f"({SCHEMA_VERSION}); run the keyplane version that wrote it"
        )
    for step in sorted(s for s in MIGRATIONS if version < s <= SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[step]):
                db.execute(statement)
            if step in AFTER_MIGRATION:
                AFTER_MIGRATION[step](db)
            db.execute(
                "INSERT INTO meta (name, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (str(step),),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _statements(script: str) -> list[str]:
    """The statements of a script, one by one (a trigger's body has ';'s inside it)."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    statements: list[str] = []
    pending = ""
    for piece in "\n".join(lines).split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        statements.append(pending.strip())
    return statements
