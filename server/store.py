"""The state DB (`keyplane.db`): the one module that speaks SQL.

SQLite in WAL mode with synchronous=FULL and foreign keys on. It holds the key
inventory and states, certificates issued, revocations, and the audit log; never a
private key. Every change and its audit record commit in one transaction.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from keyplane.server.groupcommit import GroupCommitter, Outcome

T = TypeVar("T")


class StoreError(Exception):
    """The state DB cannot be used as it is; the message says why."""


SCHEMA_VERSION = 2

_SCHEMA = """
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
    revoke_reason TEXT,
    -- The enrollment token a use of which this certificate spent (schema 2).
    token_hash TEXT
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
"""


# Run once per open. A new DB gets the current schema and version; an older one keeps
# its version, and _MIGRATIONS bring it up to date.
_INIT_SCRIPT = (
    "BEGIN IMMEDIATE;"  # noqa: S608 - constant text, nothing interpolated
    + _SCHEMA
    + "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', '2');"
    + "INSERT OR IGNORE INTO meta (name, value) VALUES ('generation', '0'); COMMIT;"
)
# schema version -> what turns the one before it into it.
_MIGRATIONS = {
    2: "ALTER TABLE certificates ADD COLUMN token_hash TEXT;",
}


def _ts(value: datetime.datetime | None) -> str | None:
    return value.astimezone(datetime.UTC).isoformat() if value is not None else None


def _opt_dt(value: object) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(str(value)) if value is not None else None


def _dt(value: object) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(value))


def _opt_str(value: object) -> str | None:
    return str(value) if value is not None else None


@dataclass(frozen=True)
class KeyRecord:
    """One key of the hierarchy as the state DB knows it."""

    fingerprint: str
    kind: str
    name: str
    number: int | None
    algorithm: str
    backend: str
    key_uri: str
    state: str
    issuer_fingerprint: str | None
    certificate_pem: str | None
    not_before: datetime.datetime | None
    not_after: datetime.datetime | None
    created_at: datetime.datetime
    revoked_at: datetime.datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None


@dataclass(frozen=True)
class CertificateRecord:
    """A leaf certificate keyplane issued (admin credentials, later client certificates)."""

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


@dataclass(frozen=True)
class TrustStateRecord:
    """One published trust-state version: its signed bytes and what it was built from."""

    version: int
    content_digest: str
    root_set: str
    signed: bytes
    created_at: datetime.datetime


@dataclass(frozen=True)
class ZoneServerRecord:
    """A zone server that enrolled with this server."""

    name: str
    listen: str
    bootstrap_listen: str
    registered_at: datetime.datetime


@dataclass(frozen=True)
class AuditRecord:
    """One line of the audit log."""

    id: int
    at: datetime.datetime
    actor: str
    action: str
    target: str
    details: dict[str, object]


_KEY_COLUMNS = (
    "fingerprint, kind, name, number, algorithm, backend, key_uri, state, issuer_fingerprint, "
    "certificate_pem, not_before, not_after, created_at, revoked_at, revoked_by, revoke_reason"
)
_CERT_COLUMNS = (
    "serial, fingerprint, subject, role, issuer_fingerprint, not_before, not_after, "
    "certificate_pem, issued_at, revoked_at, revoke_reason, token_hash"
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
        _ts(record.not_before),
        _ts(record.not_after),
        record.certificate_pem,
        _ts(record.issued_at),
        _ts(record.revoked_at),
        record.revoke_reason,
        token_hash or record.token_hash,
    )


def _key(row: tuple[object, ...]) -> KeyRecord:
    return KeyRecord(
        fingerprint=str(row[0]),
        kind=str(row[1]),
        name=str(row[2]),
        number=int(str(row[3])) if row[3] is not None else None,
        algorithm=str(row[4]),
        backend=str(row[5]),
        key_uri=str(row[6]),
        state=str(row[7]),
        issuer_fingerprint=_opt_str(row[8]),
        certificate_pem=_opt_str(row[9]),
        not_before=_opt_dt(row[10]),
        not_after=_opt_dt(row[11]),
        created_at=_dt(row[12]),
        revoked_at=_opt_dt(row[13]),
        revoked_by=_opt_str(row[14]),
        revoke_reason=_opt_str(row[15]),
    )


def _cert(row: tuple[object, ...]) -> CertificateRecord:
    return CertificateRecord(
        serial=str(row[0]),
        fingerprint=str(row[1]),
        subject=str(row[2]),
        role=str(row[3]),
        issuer_fingerprint=str(row[4]),
        not_before=_dt(row[5]),
        not_after=_dt(row[6]),
        certificate_pem=str(row[7]),
        issued_at=_dt(row[8]),
        revoked_at=_opt_dt(row[9]),
        revoke_reason=_opt_str(row[10]),
        token_hash=_opt_str(row[11]),
    )


class Transaction:
    """Writes inside one BEGIN IMMEDIATE ... COMMIT; every change audits itself here."""

    def __init__(self, db: sqlite3.Connection, now: datetime.datetime) -> None:
        self._db = db
        self.now = now
        # Set by writes that change what cached reads return (keys, settings,
        # revocations, trust states); the commit then bumps the generation.
        self.changes_hierarchy = False

    def audit(self, actor: str, action: str, target: str, **details: object) -> None:
        self._db.execute(
            "INSERT INTO audit (at, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
            (_ts(self.now), actor, action, target, json.dumps(details, sort_keys=True)),
        )

    def next_root_number(self) -> int:
        row = self._db.execute(
            "SELECT value FROM meta WHERE name = 'highest_root_number'"
        ).fetchone()
        return int(row[0]) + 1 if row else 0

    def insert_key(self, record: KeyRecord) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES ({', '.join('?' * 16)})",  # noqa: S608
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
                _ts(record.not_before),
                _ts(record.not_after),
                _ts(record.created_at),
                _ts(record.revoked_at),
                record.revoked_by,
                record.revoke_reason,
            ),
        )
        if record.kind == "root" and record.number is not None:
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES ('highest_root_number', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = max(CAST(value AS INTEGER), "
                "excluded.value)",
                (str(record.number),),
            )

    def insert_token(
        self, token_hash: str, role: str, uses: int, expires_at: datetime.datetime, by: str
    ) -> None:
        self._db.execute(
            "INSERT INTO enrollment_tokens (token_hash, role, uses_left, uses, expires_at, "
            "created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (token_hash, role, uses, uses, _ts(expires_at), _ts(self.now), by),
        )

    def consume_token(self, token_hash: str, role: str, uses: int = 1) -> bool:
        """Use the token `uses` times if it exists, has the role, is unexpired and has
        that many uses left; otherwise change nothing."""
        return (
            self._db.execute(
                "UPDATE enrollment_tokens SET uses_left = uses_left - ? WHERE token_hash = ? "
                "AND role = ? AND uses_left >= ? AND expires_at > ?",
                (uses, token_hash, role, max(uses, 1), _ts(self.now)),
            ).rowcount
            == 1
        )

    def upsert_zone_server(self, name: str, listen: str, bootstrap_listen: str) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "INSERT INTO zone_servers (name, listen, bootstrap_listen, registered_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "listen = excluded.listen, bootstrap_listen = excluded.bootstrap_listen, "
            "updated_at = excluded.updated_at",
            (name, listen, bootstrap_listen, _ts(self.now), _ts(self.now)),
        )

    def revoke_certificate(self, serial: str, by: str, reason: str) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "UPDATE certificates SET revoked_at = ?, revoke_reason = ? WHERE serial = ?",
            (_ts(self.now), reason, serial),
        )
        self._db.execute(
            "INSERT INTO revocations (target_kind, target, revoked_at, revoked_by, reason) "
            "VALUES ('certificate', ?, ?, ?, ?)",
            (serial, _ts(self.now), by, reason),
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
                _ts(record.created_at),
            ),
        )

    def set_setting(self, name: str, value: str, scope: str, by: str) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "INSERT INTO settings (name, value, scope, updated_at, updated_by) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
            (name, value, scope, _ts(self.now), by),
        )

    def mark_key_destroyed(self, fingerprint: str) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "UPDATE keys SET destroyed_at = ? WHERE fingerprint = ?", (_ts(self.now), fingerprint)
        )

    def set_key_state(self, fingerprint: str, state: str) -> None:
        self.changes_hierarchy = True
        self._db.execute("UPDATE keys SET state = ? WHERE fingerprint = ?", (state, fingerprint))

    def revoke_key(self, fingerprint: str, kind: str, by: str, reason: str) -> None:
        self.changes_hierarchy = True
        self._db.execute(
            "UPDATE keys SET state = 'revoked', revoked_at = ?, revoked_by = ?, "
            "revoke_reason = ? WHERE fingerprint = ?",
            (_ts(self.now), by, reason, fingerprint),
        )
        self._db.execute(
            "INSERT INTO revocations (target_kind, target, revoked_at, revoked_by, reason) "
            "VALUES (?, ?, ?, ?, ?)",
            (kind, fingerprint, _ts(self.now), by, reason),
        )

    def insert_certificate(self, record: CertificateRecord) -> None:
        self.insert_certificates([certificate_row(record)])

    def insert_certificates(self, rows: list[tuple[object, ...]]) -> None:
        """Insert certificate_row()s: many rows, one statement."""
        self._db.executemany(
            f"INSERT INTO certificates ({_CERT_COLUMNS}) VALUES ({', '.join('?' * 12)})",  # noqa: S608
            rows,
        )

    def insert_certificates_if_new(self, rows: list[tuple[object, ...]]) -> int:
        """Insert the certificate_row()s whose serial is not recorded yet; how many were."""
        before = self._db.total_changes
        self._db.executemany(
            f"INSERT OR IGNORE INTO certificates ({_CERT_COLUMNS}) "  # noqa: S608
            f"VALUES ({', '.join('?' * 12)})",
            rows,
        )
        return self._db.total_changes - before

    def audit_many(self, entries: list[tuple[str, str, str, str]]) -> None:
        """Audit lines (actor, action, target, details as JSON) at this transaction's time."""
        at = _ts(self.now)
        self._db.executemany(
            "INSERT INTO audit (at, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
            [(at, *entry) for entry in entries],
        )

    def revoke_certificates_issued_by(self, issuer_fingerprint: str, by: str, reason: str) -> int:
        self.changes_hierarchy = True
        serials = [
            r[0]
            for r in self._db.execute(
                "SELECT serial FROM certificates WHERE issuer_fingerprint = ? "
                "AND revoked_at IS NULL",
                (issuer_fingerprint,),
            )
        ]
        for serial in serials:
            self._db.execute(
                "UPDATE certificates SET revoked_at = ?, revoke_reason = ? WHERE serial = ?",
                (_ts(self.now), reason, serial),
            )
            self._db.execute(
                "INSERT INTO revocations (target_kind, target, revoked_at, revoked_by, reason) "
                "VALUES ('certificate', ?, ?, ?, ?)",
                (serial, _ts(self.now), by, reason),
            )
        return len(serials)


# A caller's work for the group commit: its time, and what to write.
_Work = tuple[datetime.datetime, Callable[[Transaction], object]]


class StateStore:
    """The repository over keyplane.db. One connection, serialised by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._cache: dict[tuple[object, ...], tuple[int, object]] = {}
        # Reads use pooled connections (WAL lets them run beside a commit); writes use
        # the one write connection, serialised by the lock.
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._idle_readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._lock_file = os.open(
            path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            # One transaction: a crash mid-way leaves no half-made schema.
            self._db.executescript(_INIT_SCRIPT)
            self._migrate()
        self._committer = GroupCommitter("group-commit", self._commit_batch)

    def _migrate(self) -> None:
        """Bring an older keyplane.db up to SCHEMA_VERSION, one step per transaction."""
        row = self._db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path.name} has schema version {version}, newer than this keyplane "
                f"knows ({SCHEMA_VERSION}); run the keyplane version that wrote it"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(_MIGRATIONS[step])
                self._db.execute(
                    "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(step),)
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _commit_batch(self, works: Sequence[_Work]) -> list[Outcome]:
        """One transaction for a batch of callers' work, each inside its own savepoint:
        if one raises, only its writes are rolled back and it alone gets the error."""
        outcomes: list[Outcome] = []
        with self.transaction(works[0][0]) as tx:
            db = tx._db
            for now, work in works:
                tx.now = now
                db.execute("SAVEPOINT item")
                try:
                    value = work(tx)
                except Exception as exc:
                    db.execute("ROLLBACK TO item")
                    db.execute("RELEASE item")
                    outcomes.append((None, exc))
                else:
                    db.execute("RELEASE item")
                    outcomes.append((value, None))
        return outcomes

    @property
    def committer(self) -> GroupCommitter[_Work]:
        """The group-commit thread (its health is watched by the server process)."""
        return self._committer

    def group_commit(self, now: datetime.datetime, work: Callable[[Transaction], T]) -> T:
        """Run `work` in a transaction shared with other callers' work, committed (and
        fsynced) once for all of them; returns after the commit, so nothing is lost.

        Each caller's work runs inside its own savepoint: if it raises, only its writes
        are rolled back and the exception is raised to that caller alone.
        """
        return self._committer.submit((now, work)).result()  # type: ignore[return-value]

    def group_commit_pending(
        self, now: datetime.datetime, work: Callable[[Transaction], object]
    ) -> Future[object]:
        """Like group_commit, without waiting: the future completes after the fsync. If
        the future is cancelled before its batch begins, the work never runs."""
        return self._committer.submit((now, work))

    def close(self) -> None:
        self._committer.stop()
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._db.close()
            os.close(self._lock_file)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read connection from the pool (made when none is free, returned after use):
        as many as reads run at once, however many threads come and go."""
        try:
            reader = self._idle_readers.get_nowait()
        except queue.Empty:
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            reader.execute("PRAGMA busy_timeout=10000")
            with self._lock:
                self._readers.append(reader)
        try:
            yield reader
        finally:
            self._idle_readers.put(reader)

    @contextlib.contextmanager
    def transaction(self, now: datetime.datetime) -> Iterator[Transaction]:
        """A write transaction; it commits only if the block (audit included) succeeds."""
        with self._lock, self._write_lock():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                tx = Transaction(self._db, now)
                yield tx
                if tx.changes_hierarchy:
                    self._db.execute(
                        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                        "WHERE name = 'generation'"
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Writers of all processes queue on a file lock, which wakes the next one at once,
        instead of on SQLite's busy handler, which sleeps and retries."""
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Within the block, cached reads on this thread use one generation read at its
        start: one query per request instead of one per cached read."""
        self._local.generation = self._read_generation()
        try:
            yield
        finally:
            self._local.generation = None

    def generation(self) -> int:
        """Grows with every committed change to keys, settings, revocations or the trust
        state, by any process sharing this DB: what cached reads are keyed on."""
        pinned = getattr(self._local, "generation", None)
        if pinned is not None:
            return int(pinned)
        return self._read_generation()

    def _read_generation(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def memo(self, key: tuple[object, ...], compute: Callable[[], T]) -> T:
        """`compute()`, remembered until the next committed change to keys, settings,
        revocations or the trust state (by any process): for values derived from them
        on every request. The value is shared; callers must not change it."""
        return self._cached(("memo", *key), compute)

    def _cached(self, key: tuple[object, ...], read: Callable[[], T]) -> T:
        generation = self.generation()
        hit = self._cache.get(key)  # dict reads and writes are atomic; no lock needed
        if hit is not None and hit[0] == generation:
            return hit[1]  # type: ignore[return-value]
        value = read()
        self._cache[key] = (generation, value)
        return value

    # -- reads --------------------------------------------------------------------------

    def _keys(self, where: str, args: tuple[object, ...]) -> list[KeyRecord]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_KEY_COLUMNS} FROM keys WHERE {where} "  # noqa: S608
                "ORDER BY created_at, number",
                args,
            ).fetchall()
        return [_key(r) for r in rows]

    def key(self, fingerprint: str) -> KeyRecord | None:
        found = self._cached(
            ("key", fingerprint), lambda: self._keys("fingerprint = ?", (fingerprint,))
        )
        return found[0] if found else None

    def key_destroyed(self, fingerprint: str) -> bool:
        with self._read() as db:
            row = db.execute(
                "SELECT destroyed_at FROM keys WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
        return bool(row and row[0])

    def keys(self, kind: str, states: tuple[str, ...] | None = None) -> list[KeyRecord]:
        if states is None:
            return self._cached(("keys", kind), lambda: self._keys("kind = ?", (kind,)))
        marks = ", ".join("?" * len(states))
        return self._cached(
            ("keys", kind, states),
            lambda: self._keys(f"kind = ? AND state IN ({marks})", (kind, *states)),
        )

    def certificate(self, serial: str) -> CertificateRecord | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?",  # noqa: S608
                (serial,),
            ).fetchone()
        return _cert(row) if row else None

    def certificates(self, role: str | None = None, limit: int = 1000) -> list[CertificateRecord]:
        where, args = ("WHERE role = ?", (role,)) if role else ("", ())
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_CERT_COLUMNS} FROM certificates {where} "  # noqa: S608
                "ORDER BY issued_at DESC, serial DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_cert(r) for r in rows]

    def zone_servers(self) -> list[ZoneServerRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT name, listen, bootstrap_listen, registered_at FROM zone_servers "
                "ORDER BY name"
            ).fetchall()
        return [ZoneServerRecord(str(n), str(li), str(b), _dt(r)) for n, li, b, r in rows]

    def certificates_of_token(self, token_hash: str) -> int:
        """How many certificates were issued for uses of this enrollment token."""
        with self._read() as db:
            row = db.execute(
                "SELECT count(*) FROM certificates WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return int(row[0])

    def token_uses_left(self, token_hash: str) -> int | None:
        with self._read() as db:
            row = db.execute(
                "SELECT uses_left FROM enrollment_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return int(row[0]) if row else None

    def _trust_states(self, where: str, args: tuple[object, ...]) -> list[TrustStateRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT version, content_digest, root_set, signed, created_at "  # noqa: S608
                f"FROM trust_states {where}",
                args,
            ).fetchall()
        return [
            TrustStateRecord(int(v), str(d), str(r), bytes(s), _dt(c)) for v, d, r, s, c in rows
        ]

    def latest_trust_state(self) -> TrustStateRecord | None:
        found = self._cached(
            ("latest_trust",), lambda: self._trust_states("ORDER BY version DESC LIMIT 1", ())
        )
        return found[0] if found else None

    def trust_state(self, version: int) -> TrustStateRecord | None:
        found = self._trust_states("WHERE version = ?", (version,))
        return found[0] if found else None

    def trust_states_after(self, version: int) -> list[TrustStateRecord]:
        return self._trust_states("WHERE version > ? ORDER BY version", (version,))

    def revoked_serials(self, now: datetime.datetime) -> list[str]:
        """Serials of revoked certificates that have not expired yet."""

        def read() -> list[tuple[str, datetime.datetime]]:
            with self._read() as db:
                rows = db.execute(
                    "SELECT serial, not_after FROM certificates WHERE revoked_at IS NOT NULL "
                    "ORDER BY serial"
                ).fetchall()
            return [(str(s), _dt(na)) for s, na in rows]

        return [s for s, not_after in self._cached(("revoked",), read) if not_after > now]

    def settings(self) -> dict[str, tuple[str, datetime.datetime, str]]:
        """Stored settings: name -> (value, updated at, updated by)."""

        def read() -> dict[str, tuple[str, datetime.datetime, str]]:
            with self._read() as db:
                rows = db.execute(
                    "SELECT name, value, updated_at, updated_by FROM settings"
                ).fetchall()
            return {str(n): (str(v), _dt(at), str(by)) for n, v, at, by in rows}

        return dict(self._cached(("settings",), read))

    def audit_log(self, limit: int = 1000) -> list[AuditRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT id, at, actor, action, target, details FROM audit ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            AuditRecord(
                int(i),
                datetime.datetime.fromisoformat(at),
                actor,
                action,
                target,
                json.loads(details),
            )
            for i, at, actor, action, target, details in reversed(rows)
        ]

    def revocation_sequence(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT max(seq) FROM revocations").fetchone()
        return int(row[0] or 0)
