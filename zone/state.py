"""The zone server's own small database (`zone.db`): its enrollment, its intermediates,
the trust-state versions it relays, the certificates it renewed (each renews once), the
certificates it issued but has not reported yet, and the newest CRL of its intermediate."""

from __future__ import annotations

import datetime
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from keyplane.server.errors import PermissionDenied
from keyplane.server.groupcommit import GroupCommitter, Outcome

# A queued report: serial, DER, component, and the serial it renews (if a renewal).
_Report = tuple[str, bytes, str, str | None]


@dataclass(frozen=True)
class ZoneCrlRecord:
    """The newest CRL of one of the zone's intermediates."""

    issuer_fingerprint: str
    crl_number: int
    content_digest: str
    this_update: datetime.datetime
    next_update: datetime.datetime
    der: bytes
    entries: str  # JSON: [[serial, revoked at (ISO 8601), reason code], ...]
    published: bool = False


_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trust_versions (
    version INTEGER PRIMARY KEY,
    root_set TEXT NOT NULL,
    signed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_reports (
    serial TEXT PRIMARY KEY,
    der BLOB NOT NULL,
    component TEXT NOT NULL,
    -- For a renewal: the serial it renews (the server then marks that one renewed).
    renews TEXT
);
-- Every intermediate this zone has held: it renews only what they issued.
CREATE TABLE IF NOT EXISTS intermediates (
    fingerprint TEXT PRIMARY KEY,
    certificate_pem TEXT NOT NULL
);
-- A certificate renews once: its serial, and what it was renewed to.
CREATE TABLE IF NOT EXISTS renewals (
    serial TEXT PRIMARY KEY,
    successor TEXT NOT NULL,
    -- The certificate it was renewed to, DER: the answer again, if the first was lost.
    successor_der BLOB
);
-- The newest CRL each intermediate signed, the entries it lists (to sign it anew while
-- the server is out of reach), and whether the server has kept it.
CREATE TABLE IF NOT EXISTS crls (
    issuer_fingerprint TEXT PRIMARY KEY,
    crl_number INTEGER NOT NULL,
    content_digest TEXT NOT NULL,
    this_update TEXT NOT NULL,
    next_update TEXT NOT NULL,
    der BLOB NOT NULL,
    entries TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
COMMIT;
"""


def stored_addresses(path: Path) -> tuple[str, str] | None:
    """The listeners a zone enrolled with (kept across restarts), read without opening
    the store: a start claims them before it opens anything else."""
    if not path.exists():
        return None
    db = sqlite3.connect(path, timeout=10.0)
    try:
        rows = dict(
            db.execute(
                "SELECT name, value FROM meta WHERE name IN ('listen', 'bootstrap_listen')"
            ).fetchall()
        )
    except sqlite3.OperationalError:
        return None  # no meta table yet: a first start stopped before it made one
    finally:
        db.close()
    if "listen" not in rows or "bootstrap_listen" not in rows:
        return None
    return str(rows["listen"]), str(rows["bootstrap_listen"])


class ZoneStore:
    """zone.db: WAL, synchronous=FULL, one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        # Zone workers (--workers) share the file: a writer waits for another's commit.
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._add_column("pending_reports", "renews", "TEXT")
        # Reads of single values (issuing asks for the intermediate on every call) use a
        # connection of their own: WAL lets them run while a report commit holds the
        # writer for its fsync.
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._reports = GroupCommitter("zone-report-writer", self._write_reports, max_batch=512)

    def _add_column(self, table: str, column: str, declaration: str) -> None:
        """Bring a zone.db from an older keyplane up to date (once, whichever worker
        gets there first)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            columns = {str(r[1]) for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._reports.stop()
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()

    def get(self, name: str) -> str | None:
        with self._read_lock:
            row = self._reader.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else None

    def put(self, values: dict[str, str]) -> None:
        """Write several values in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for name, value in values.items():
                    self._db.execute(
                        "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) "
                        "DO UPDATE SET value = excluded.value",
                        (name, value),
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add_trust_version(self, version: int, root_set: str, signed: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO trust_versions (version, root_set, signed) VALUES (?, ?, ?)",
                (version, root_set, signed),
            )

    def trust_versions_after(self, version: int) -> list[tuple[int, str, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT version, root_set, signed FROM trust_versions WHERE version > ? "
                "ORDER BY version",
                (version,),
            ).fetchall()
        return [(int(v), str(r), bytes(s)) for v, r, s in rows]

    def trust_version(self, version: int) -> tuple[int, str, bytes] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, root_set, signed FROM trust_versions WHERE version = ?",
                (version,),
            ).fetchone()
        return (int(row[0]), str(row[1]), bytes(row[2])) if row else None

    def latest_trust_version(self) -> tuple[int, str, bytes] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, root_set, signed FROM trust_versions ORDER BY version DESC LIMIT 1"
            ).fetchone()
        return (int(row[0]), str(row[1]), bytes(row[2])) if row else None

    def queue_report(self, serial: str, der: bytes, component: str) -> None:
        """Record an issued certificate for reporting; returns once it is durable."""
        self.queue_report_pending(serial, der, component).result()

    def queue_report_pending(
        self, serial: str, der: bytes, component: str, renews: str | None = None
    ) -> Future[object]:
        """Record an issued certificate for reporting; the future completes once it is
        durable. `renews` is the serial it renews: claimed in the same transaction, so a
        certificate renews once (PERMISSION_DENIED for a second renewal, and nothing is
        recorded). Concurrent callers share one transaction and one fsync. If the future
        is cancelled before its batch begins (the client hung up), nothing is written."""
        return self._reports.submit((serial, der, component, renews))

    @property
    def report_writer(self) -> GroupCommitter[_Report]:
        """The thread that writes queued reports (its health is watched)."""
        return self._reports

    def _write_reports(self, reports: Sequence[_Report]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for serial, der, component, renews in reports:
                    self._db.execute("SAVEPOINT item")
                    try:
                        if renews is not None:
                            self._db.execute(
                                "INSERT INTO renewals (serial, successor, successor_der) "
                                "VALUES (?, ?, ?)",
                                (renews, serial, der),
                            )
                        self._db.execute(
                            "INSERT OR IGNORE INTO pending_reports (serial, der, component, "
                            "renews) VALUES (?, ?, ?, ?)",
                            (serial, der, component, renews),
                        )
                    except sqlite3.IntegrityError:
                        self._db.execute("ROLLBACK TO item")
                        self._db.execute("RELEASE item")
                        outcomes.append(
                            (
                                None,
                                PermissionDenied(
                                    f"certificate {renews} was renewed already; a certificate "
                                    "renews once (renew from the newest one)"
                                ),
                            )
                        )
                        continue
                    self._db.execute("RELEASE item")
                    outcomes.append((None, None))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return outcomes

    def renewal_of(self, serial: str) -> bytes | None:
        """The certificate (DER) that the one with this serial was renewed to, if any."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT successor_der FROM renewals WHERE serial = ?", (serial,)
            ).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def renewed(self, serial: str) -> bool:
        """Whether this zone renewed the certificate with this serial already."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT 1 FROM renewals WHERE serial = ?", (serial,)
            ).fetchone()
        return row is not None

    def crl(self, issuer_fingerprint: str) -> ZoneCrlRecord | None:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT issuer_fingerprint, crl_number, content_digest, this_update, "
                "next_update, der, entries, published FROM crls WHERE issuer_fingerprint = ?",
                (issuer_fingerprint,),
            ).fetchone()
        if row is None:
            return None
        fp, number, digest, this_update, next_update, der, entries, published = row
        return ZoneCrlRecord(
            str(fp),
            int(number),
            str(digest),
            datetime.datetime.fromisoformat(str(this_update)),
            datetime.datetime.fromisoformat(str(next_update)),
            bytes(der),
            str(entries),
            bool(published),
        )

    def put_crl(self, record: ZoneCrlRecord) -> bool:
        """Keep a newly signed CRL; False (nothing changed) unless its number is above
        the one kept: a CRL number is never reused."""
        with self._lock:
            return (
                self._db.execute(
                    "INSERT INTO crls (issuer_fingerprint, crl_number, content_digest, "
                    "this_update, next_update, der, entries, published) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (issuer_fingerprint) DO UPDATE "
                    "SET crl_number = excluded.crl_number, "
                    "content_digest = excluded.content_digest, "
                    "this_update = excluded.this_update, next_update = excluded.next_update, "
                    "der = excluded.der, entries = excluded.entries, published = 0 "
                    "WHERE excluded.crl_number > crls.crl_number",
                    (
                        record.issuer_fingerprint,
                        record.crl_number,
                        record.content_digest,
                        record.this_update.isoformat(),
                        record.next_update.isoformat(),
                        record.der,
                        record.entries,
                    ),
                ).rowcount
                == 1
            )

    def crl_published(self, issuer_fingerprint: str, crl_number: int) -> None:
        """The server has kept this CRL."""
        with self._lock:
            self._db.execute(
                "UPDATE crls SET published = 1 WHERE issuer_fingerprint = ? AND crl_number = ?",
                (issuer_fingerprint, crl_number),
            )

    def add_intermediate(self, fingerprint: str, certificate_pem: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO intermediates (fingerprint, certificate_pem) VALUES (?, ?)",
                (fingerprint, certificate_pem),
            )

    def intermediate_certificates(self) -> list[str]:
        """The PEM certificates of every intermediate this zone has held."""
        with self._read_lock:
            rows = self._reader.execute("SELECT certificate_pem FROM intermediates").fetchall()
        return [str(r[0]) for r in rows]

    def intermediates(self) -> set[str]:
        """Fingerprints of every intermediate this zone has held."""
        with self._read_lock:
            rows = self._reader.execute("SELECT fingerprint FROM intermediates").fetchall()
        return {str(r[0]) for r in rows}

    def pending_reports(self, limit: int = 500) -> list[tuple[str, bytes, str, str | None]]:
        """(serial, DER, component, the serial it renews) of unreported certificates,
        oldest first (a renewal goes after the certificate it renews)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT serial, der, component, renews FROM pending_reports ORDER BY rowid LIMIT ?",
                (limit,),
            ).fetchall()
        return [(str(s), bytes(d), str(c), str(r) if r else None) for s, d, c, r in rows]

    def reported(self, serials: list[str]) -> None:
        with self._lock:
            self._db.executemany(
                "DELETE FROM pending_reports WHERE serial = ?", [(s,) for s in serials]
            )
