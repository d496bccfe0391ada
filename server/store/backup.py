"""What backups read of a state DB, live or a copy: every key, rows per table, the
newest trust-state version, the revocations after a sequence number and what they
revoked, and SQLite's own checks of a file."""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from keyplane.server.store.reads import Connect, Reads, on
from keyplane.server.store.records import KeyRecord, dt

# Kept by SQLite itself (AUTOINCREMENT), or the console's sign-ins of the moment (left
# out of every backup: see StateStore.copy_at_one_point): not keyplane's inventory.
_INTERNAL_TABLES = ("sqlite_sequence", "console_links", "console_sessions")


@dataclass(frozen=True)
class Revocation:
    """One row of the revocations table."""

    seq: int
    target_kind: str
    target: str
    revoked_at: datetime.datetime
    reason: str


@dataclass(frozen=True)
class Unrevoked:
    """Something a revocation revoked that a DB holds as not revoked."""

    what: str  # "key", "certificate" or "zone"
    target: str  # fingerprint, serial or zone id
    description: str
    revocation: Revocation


class BackupReads:
    """The reads a backup, its verification and a restore need, over one connection."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._reads = Reads(connect)

    @classmethod
    def of(cls, db: sqlite3.Connection) -> BackupReads:
        return cls(lambda: on(db))

    def keys(self) -> list[KeyRecord]:
        """Every key, of every kind and state, oldest first."""
        return self._reads.keys_where("1 = 1", ())

    def destroyed_keys(self) -> frozenset[str]:
        """Fingerprints of the keys whose private key was destroyed."""
        with self._connect() as db:
            rows = db.execute("SELECT fingerprint FROM keys WHERE destroyed_at IS NOT NULL")
            return frozenset(str(r[0]) for r in rows)

    def row_counts(self) -> dict[str, int]:
        """Rows per table, for every table the DB has."""
        with self._connect() as db:
            tables = [
                str(r[0])
                for r in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
                if str(r[0]) not in _INTERNAL_TABLES
            ]
            return {
                t: int(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])  # noqa: S608
                for t in tables
            }

    def schema_version(self) -> int:
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        return int(row[0]) if row else 1

    def trust_state_version(self) -> int:
        with self._connect() as db:
            row = db.execute("SELECT max(version) FROM trust_states").fetchone()
        return int(row[0] or 0)

    def revocation_sequence(self) -> int:
        return self._reads.revocation_sequence()

    def raise_trust_version_floor(self, floor: int) -> None:
        """Make the next trust-state version this DB publishes be above `floor`."""
        with self._connect() as db:
            db.execute(
                "INSERT INTO meta (name, value) VALUES ('trust_version_floor', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = "
                "max(CAST(value AS INTEGER), excluded.value)",
                (str(floor),),
            )

    def revocations_after(self, seq: int) -> list[Revocation]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT seq, target_kind, target, revoked_at, reason FROM revocations "
                "WHERE seq > ? ORDER BY seq",
                (seq,),
            ).fetchall()
        return [Revocation(int(s), str(k), str(t), dt(at), str(r)) for s, k, t, at, r in rows]

    def unrevoked(self, revocations: list[Revocation]) -> list[Unrevoked]:
        """What of `revocations` (made elsewhere) this DB holds as not revoked: what it
        would bring back if it replaced the DB they were made in."""
        found: list[Unrevoked] = []
        with self._connect() as db:
            for rev in revocations:
                if rev.target_kind == "certificate":
                    row = db.execute(
                        "SELECT subject FROM certificates WHERE serial = ? AND revoked_at IS NULL",
                        (rev.target,),
                    ).fetchone()
                    what = "certificate"
                elif rev.target_kind == "zone":
                    row = db.execute(
                        "SELECT 'zone ' || name FROM zones WHERE id = ? AND revoked_at IS NULL",
                        (int(rev.target) if rev.target.isdigit() else -1,),
                    ).fetchone()
                    what = "zone"
                else:
                    row = db.execute(
                        "SELECT name || ' (' || kind || ')' FROM keys "
                        "WHERE fingerprint = ? AND state != 'revoked'",
                        (rev.target,),
                    ).fetchone()
                    what = "key"
                if row is not None:
                    found.append(Unrevoked(what, rev.target, str(row[0]), rev))
        return found


def check_file(path: Path) -> list[str]:
    """SQLite's integrity and foreign-key checks of a DB file, read-only: what is wrong,
    or nothing."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        ) as db:
            problems = [str(r[0]) for r in db.execute("PRAGMA integrity_check")]
            if problems == ["ok"]:
                problems = []
            problems += [
                f"foreign key: {r[0]} row {r[1]} names a missing {r[2]} row"
                for r in db.execute("PRAGMA foreign_key_check")
            ]
            return problems
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
