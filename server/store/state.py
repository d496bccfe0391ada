"""The state DB (`keyplane.db`): SQLite in WAL mode with synchronous=FULL and foreign
keys on. The key inventory and states, certificates issued, revocations, settings,
zones, tokens, trust states and the audit log; never a private key. Every change and
its audit record commit in one transaction."""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from keyplane.server.errors import DamagedDatabase
from keyplane.server.groupcommit import GroupCommitter, Outcome
from keyplane.server.store.backup import BackupReads
from keyplane.server.store.reads import Reads
from keyplane.server.store.records import (
    KEY_INTENT_PREFIX,
    AuditRecord,
    CertificateRecord,
    KeyIntent,
    KeyRecord,
    KeyUsage,
    TokenRecord,
    TrustStateRecord,
    ZoneRecord,
)
from keyplane.server.store.schema import initialise
from keyplane.server.store.transaction import Transaction

T = TypeVar("T")

# A caller's work for the group commit: its time, and what to write.
_Work = tuple[datetime.datetime, Callable[[Transaction], object]]


def _damaged(path: Path, detail: str) -> str:
    return (
        f"{path.name} in {path.parent} is damaged ({detail[:200]}); nothing was changed: "
        "restore the data dir from a backup (keyplane backup restore), or move it aside "
        "to start afresh"
    )


def _check_sound(db: sqlite3.Connection, path: Path) -> None:
    """SQLite's quick check of every page, so that a damaged file refuses the start
    instead of failing the request that meets the damage."""
    problems = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise DamagedDatabase(_damaged(path, "; ".join(problems[:2])))


class StateStore:
    """The repository over keyplane.db. Reads use pooled connections (WAL lets them run
    beside a commit); writes use one connection, serialised by a lock and, across the
    processes of --workers, by a file lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._cache: dict[tuple[object, ...], tuple[int, object]] = {}
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._idle_readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._lock_file = os.open(
            path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._db.execute("PRAGMA busy_timeout=10000")
                with self._lock, self._write_lock():
                    initialise(self._db, path.name)
                    _check_sound(self._db, path)
            except BaseException:
                self._db.close()
                raise
        except sqlite3.DatabaseError as exc:
            os.close(self._lock_file)
            raise DamagedDatabase(_damaged(path, str(exc))) from None
        except BaseException:
            os.close(self._lock_file)
            raise
        self.reads = Reads(self._read)
        self._committer = GroupCommitter("group-commit", self._commit_batch)

    # -- writes --------------------------------------------------------------------------

    def _commit_batch(self, works: Sequence[_Work]) -> list[Outcome]:
        """One transaction for a batch of callers' work, each inside its own savepoint:
        if one raises, only its writes are rolled back and it alone gets the error."""
        outcomes: list[Outcome] = []
        with self.transaction(works[0][0]) as tx:
            db = tx._db
            for now, work in works:
                tx.now = now
                callbacks = len(tx.after_commit)
                head = tx.audit_head
                db.execute("SAVEPOINT item")
                try:
                    value = work(tx)
                except Exception as exc:
                    db.execute("ROLLBACK TO item")
                    db.execute("RELEASE item")
                    del tx.after_commit[callbacks:]  # its writes are gone: so are these
                    tx.audit_head = head  # and its audit events: the chain goes on from here
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
        return self._submit(now, work).result()  # type: ignore[return-value]

    def group_commit_pending(
        self, now: datetime.datetime, work: Callable[[Transaction], object]
    ) -> Future[object]:
        """Like group_commit, without waiting: the future completes after the fsync. If
        the future is cancelled before its batch begins, the work never runs."""
        return self._submit(now, work)

    def _submit(
        self, now: datetime.datetime, work: Callable[[Transaction], object]
    ) -> Future[object]:
        # The work runs on the committer thread in its caller's context, so that what it
        # logs names the caller's RPC.
        context = contextvars.copy_context()
        return self._committer.submit((now, lambda tx: context.run(work, tx)))

    @contextlib.contextmanager
    def transaction(self, now: datetime.datetime) -> Iterator[Transaction]:
        """A write transaction; it commits only if the block (audit included) succeeds."""
        with self._lock, self._write_lock():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                tx = Transaction(self._db, now)
                yield tx
                tx.write_audit_head()
                if tx.changes_hierarchy:
                    self._db.execute(
                        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                        "WHERE name = 'generation'"
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                # A full or read-only disk fails the commit itself: nothing of it stays
                # (SQLite may have rolled back already), and the next transaction begins.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        for callback in tx.after_commit:
            callback()

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Writers of all processes queue on a file lock, which wakes the next one at once,
        instead of on SQLite's busy handler, which sleeps and retries."""
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def copy_at_one_point(self, target: Path, alongside: Callable[[BackupReads], T]) -> T:
        """Copy keyplane.db into `target` (SQLite's online backup, from a reader) while
        holding the write lock of every process, then run `alongside` on the copy under
        the same lock: nothing commits between the copy and what `alongside` copies."""
        with self._lock, self._write_lock():
            self._db.execute("BEGIN IMMEDIATE")  # writers that bypass the file lock wait too
            try:
                with (
                    self._read() as source,
                    contextlib.closing(sqlite3.connect(target, isolation_level=None)) as copy,
                ):
                    source.backup(copy)
                    # Console sign-ins are credentials of the moment: a restore must not
                    # bring back a session that was signed out since.
                    copy.execute("DELETE FROM console_links")
                    copy.execute("DELETE FROM console_sessions")
                    # A key being made is in neither copy (its key store leaves it out),
                    # so its intent stays out too: a restore has nothing to clean up.
                    copy.execute(
                        "DELETE FROM meta WHERE substr(name, 1, ?) = ?",
                        (len(KEY_INTENT_PREFIX), KEY_INTENT_PREFIX),
                    )
                    copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                    return alongside(BackupReads.of(copy))
            finally:
                self._db.execute("ROLLBACK")

    @property
    def backup_reads(self) -> BackupReads:
        """Reads for comparing a backup with this DB."""
        return BackupReads(self._read)

    def close(self) -> None:
        self._committer.stop()
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._db.close()
            os.close(self._lock_file)

    # -- cached reads --------------------------------------------------------------------

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
    def snapshot(self) -> Iterator[None]:
        """Within the block, cached reads on this thread use one generation read at its
        start: one query per request instead of one per cached read."""
        self._local.generation = self.reads.generation()
        try:
            yield
        finally:
            self._local.generation = None

    def generation(self) -> int:
        """Grows with every committed change to keys, settings, revocations, zones or the
        trust state, by any process sharing this DB: what cached reads are keyed on."""
        pinned = getattr(self._local, "generation", None)
        if pinned is not None:
            return int(pinned)
        return self.reads.generation()

    def memo(self, key: tuple[object, ...], compute: Callable[[], T]) -> T:
        """`compute()`, remembered until the next committed change to keys, settings,
        revocations, zones or the trust state (by any process): for values derived from
        them on every request. The value is shared; callers must not change it."""
        return self._cached(("memo", *key), compute)

    def _cached(self, key: tuple[object, ...], read: Callable[[], T]) -> T:
        generation = self.generation()
        hit = self._cache.get(key)  # dict reads and writes are atomic; no lock needed
        if hit is not None and hit[0] == generation:
            return hit[1]  # type: ignore[return-value]
        value = read()
        self._cache[key] = (generation, value)
        return value

    def key(self, fingerprint: str) -> KeyRecord | None:
        found = self._cached(
            ("key", fingerprint), lambda: self.reads.keys_where("fingerprint = ?", (fingerprint,))
        )
        return found[0] if found else None

    def keys(self, kind: str, states: tuple[str, ...] | None = None) -> list[KeyRecord]:
        return self._cached(("keys", kind, states), lambda: self.reads.keys(kind, states))

    def key_destroyed(self, fingerprint: str) -> bool:
        return self.reads.key_destroyed(fingerprint)

    def key_with_uri(self, uri: str) -> KeyRecord | None:
        return self.reads.key_with_uri(uri)

    def key_intents(self) -> list[KeyIntent]:
        return self.reads.key_intents()

    def certificate(self, serial: str) -> CertificateRecord | None:
        return self.reads.certificate(serial)

    def certificates(
        self, role: str | None = None, limit: int = 1000, search: str = ""
    ) -> list[CertificateRecord]:
        return self.reads.certificates(role, limit, search)

    def certificates_for_key(self, fingerprint: str) -> list[CertificateRecord]:
        return self.reads.certificates_for_key(fingerprint)

    def certificates_of_token(self, token_hash: str) -> int:
        return self.reads.certificates_of_token(token_hash)

    def token(self, token_hash: str) -> TokenRecord | None:
        return self.reads.token(token_hash)

    def token_uses_left(self, token_hash: str) -> int | None:
        found = self.reads.token(token_hash)
        return found.uses_left if found else None

    def zones(self, include_revoked: bool = False) -> list[ZoneRecord]:
        return self._cached(("zones", include_revoked), lambda: self.reads.zones(include_revoked))

    def zone_of_certificate(self, serial: str) -> ZoneRecord | None:
        return self._cached(("zone_of", serial), lambda: self.reads.zone_of_certificate(serial))

    def latest_trust_state(self) -> TrustStateRecord | None:
        found = self._cached(
            ("latest_trust",),
            lambda: self.reads.trust_states("ORDER BY version DESC LIMIT 1", ()),
        )
        return found[0] if found else None

    def trust_state(self, version: int) -> TrustStateRecord | None:
        found = self.reads.trust_states("WHERE version = ?", (version,))
        return found[0] if found else None

    def trust_states_after(self, version: int) -> list[TrustStateRecord]:
        return self.reads.trust_states("WHERE version > ? ORDER BY version", (version,))

    def _revoked(self) -> list[tuple[str, str, datetime.datetime]]:
        return self._cached(("revoked",), self.reads.revoked_certificates)

    def revoked_serials(self, now: datetime.datetime) -> list[str]:
        """Serials of revoked certificates that have not expired yet."""
        return [s for s, _, not_after in self._revoked() if not_after > now]

    def revoked_certificate_keys(self) -> frozenset[str]:
        """Fingerprints of every key a revoked certificate certified: never again."""
        return self.memo(("revoked_keys",), lambda: frozenset(f for _, f, _ in self._revoked()))

    def settings(self) -> dict[str, tuple[str, datetime.datetime, str]]:
        """Stored settings: name -> (value, updated at, updated by)."""
        return dict(self._cached(("settings",), self.reads.settings))

    def audit_log(self, limit: int = 1000) -> list[AuditRecord]:
        return self.reads.audit_log(limit)

    def revocation_sequence(self) -> int:
        return self.reads.revocation_sequence()

    def key_usage(self) -> dict[str, KeyUsage]:
        """Signatures and last use by key fingerprint (uncached: counts change often)."""
        return self.reads.key_usage()

    def meta_value(self, name: str) -> str | None:
        return self.reads.meta_value(name)
