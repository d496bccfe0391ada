"""The state DB's migrations: a keyplane.db made by the schema-1 statements (as the
first keyplane wrote them) comes up at the current schema with everything it held, and
its audit events chained."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest

from keyplane.server.domain.audit import AuditLog
from keyplane.server.kinds import Role
from keyplane.server.store import SCHEMA_VERSION, StateStore
from keyplane.server.store.audit_chain import GENESIS, recomputed

# The schema-1 statements, verbatim from the keyplane that wrote schema 1 (server/store.py
# before schema 2): what a DB from then holds.
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
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
    destroyed_at TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_root_number ON keys (number) WHERE kind = 'root';
CREATE INDEX IF NOT EXISTS keys_kind_state ON keys (kind, state);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    subject TEXT NOT NULL,
    role TEXT NOT NULL,
    issuer_fingerprint TEXT NOT NULL REFERENCES keys (fingerprint),
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    certificate_pem TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    revoked_at TEXT,
    revoke_reason TEXT
);
CREATE INDEX IF NOT EXISTS certificates_issuer ON certificates (issuer_fingerprint);
-- Newest first, by role or not, straight from an index: ListCertificates reads a page
-- without sorting the table. (The earlier indexes lacked the serial tie-break.)
DROP INDEX IF EXISTS certificates_issued;
DROP INDEX IF EXISTS certificates_role_issued;
CREATE INDEX IF NOT EXISTS certificates_newest ON certificates (issued_at, serial);
CREATE INDEX IF NOT EXISTS certificates_role_newest ON certificates (role, issued_at, serial);
-- The revoked few, without a scan of every certificate.
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates (serial)
    WHERE revoked_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    target_kind TEXT NOT NULL,
    target TEXT NOT NULL,
    revoked_at TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('global', 'local')),
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trust_states (
    version INTEGER PRIMARY KEY,
    content_digest TEXT NOT NULL,
    root_set TEXT NOT NULL,
    signed BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_hash TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('agent', 'zone-server')),
    uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
    uses INTEGER NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS zone_servers (
    name TEXT PRIMARY KEY,
    listen TEXT NOT NULL,
    bootstrap_listen TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    details TEXT NOT NULL
);

INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', '1');
INSERT OR IGNORE INTO meta (name, value) VALUES ('generation', '0');
"""

OLD_EVENTS = [
    ("2026-01-01T00:00:00+00:00", "keyplane-server", "root.create", "aa" * 32, {"name": "R 0"}),
    ("2026-01-01T00:00:01+00:00", "admin@pki.test (serial 01)", "token.create", "ab" * 8, {}),
    ("2026-01-01T00:00:02+00:00", "admin@pki.test (serial 01)", "setting.update", "X", {"v": 1}),
    ("2026-01-01T00:00:03+00:00", "zone server z1", "zone_server.enroll", "z1", {"zone": "z1"}),
]


def schema_1_db(path: Path, gap: bool = False) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA_1)
    for n, (at, actor, action, target, details) in enumerate(OLD_EVENTS, start=1):
        event_id = n + 10 if gap and n > 2 else n  # ids with a hole, as no keyplane wrote
        db.execute(
            "INSERT INTO audit (id, at, actor, action, target, details) VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, at, actor, action, target, json.dumps(details)),
        )
    db.execute(
        "INSERT INTO enrollment_tokens VALUES (?, 'agent', 2, 2, '2999-01-01T00:00:00+00:00', "
        "'2026-01-01T00:00:00+00:00', 'admin')",
        ("cd" * 32,),
    )
    db.execute(
        "INSERT INTO zone_servers VALUES ('z1', 'z1:7443', 'z1:7444', "
        "'2026-01-01T00:00:03+00:00', '2026-01-01T00:00:03+00:00')"
    )
    db.close()


@pytest.mark.parametrize("gap", [False, True], ids=["contiguous", "with-a-hole"])
def test_schema_1_migrates_to_the_current_schema_keeping_and_chaining_every_event(
    tmp_path: Path, gap: bool
) -> None:
    path = tmp_path / "keyplane.db"
    schema_1_db(path, gap)
    store = StateStore(path)
    try:
        with sqlite3.connect(path) as db:
            version = db.execute("SELECT value FROM meta WHERE name = 'schema_version'")
            assert version.fetchone()[0] == str(SCHEMA_VERSION) == "9"
            # Schema 6: the CRLs, and the reason code of every revocation.
            assert db.execute("SELECT count(*) FROM crls").fetchone() == (0,)
            db.execute("SELECT revoke_reason_code FROM certificates")
            db.execute("SELECT revoke_reason_code FROM keys")
            # Schema 7: each key's signature count and when it was last used.
            db.execute("SELECT signatures, last_used_at FROM keys")
            # Schema 8: the console's sign-in links and sessions.
            assert db.execute("SELECT count(*) FROM console_links").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM console_sessions").fetchone() == (0,)
            # Schema 9: when the holders of certificates were last seen.
            assert db.execute("SELECT count(*) FROM certificate_sightings").fetchone() == (0,)
        events = store.audit_log()
        assert [(e.at.isoformat(), e.actor, e.action, e.target, e.details) for e in events] == [
            (at, actor, action, target, details)
            for at, actor, action, target, details in OLD_EVENTS
        ]
        assert [e.id for e in events] == [1, 2, 3, 4]
        chain = store.reads.audit_chain(0, 100)
        assert chain[0].prev_hash == GENESIS
        for before, event in itertools.pairwise(chain):
            assert event.prev_hash == before.hash
        assert all(recomputed(e) == e.hash for e in chain)
        report = AuditLog(store).verify()
        assert report.problem is None and report.checked == 4 and report.head_id == 4
        # What else it held came through: the zone, and the token, still usable.
        assert [z.name for z in store.zones()] == ["z1"]
        token = store.token("cd" * 32)
        assert token is not None and token.uses_left == 2 and token.revoked_at is None
        with store.transaction(store.reads.audit_log()[0].at) as tx:
            assert tx.consume_token("cd" * 32, Role.AGENT)
            tx.audit("admin@pki.test (serial 01)", "token.redeem", "cd" * 8)
        # New events go on from the old chain, and the log is append-only now.
        report = AuditLog(store).verify()
        assert report.problem is None and report.checked == 5
        with sqlite3.connect(path) as db, pytest.raises(sqlite3.IntegrityError, match="append"):
            db.execute("DELETE FROM audit WHERE id = 1")
    finally:
        store.close()
    again = StateStore(path)  # a second open migrates nothing
    try:
        assert len(again.audit_log()) == 5
    finally:
        again.close()
