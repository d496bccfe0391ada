"""Backups while the server serves: both databases copied at one point into one archive
with a manifest, and a manifest compared with the live inventory.

One point: the state DB's write lock (every process's) is held while keyplane.db is
copied and then pki.db, so no change commits between the two copies. A key is
generated in pki.db before its record commits in keyplane.db, so pki.db can hold a key
that no record names yet (being generated in another worker, or left by a crash):
that key is left out of the copy, so each key is in both copies or in neither.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from contextlib import closing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from keyplane.plugins.errors import BackendError
from keyplane.plugins.keys import BackedUpStore
from keyplane.server.domain.backup_archive import (
    STATE_DB,
    ArchiveError,
    KeyStore,
    Manifest,
    ManifestKey,
    member_of,
    read_archive,
    write_archive,
)
from keyplane.server.errors import InvalidArgument
from keyplane.server.kinds import KeyKind, KeyState
from keyplane.server.store import BackupReads, KeyRecord, check_file

if TYPE_CHECKING:
    from keyplane.server.domain.hierarchy import Hierarchy

log = logging.getLogger(__name__)

ARCHIVE_NAME = "keyplane-backup.tar"
# The meta entry that says what the last backup was.
LAST_BACKUP = "last_backup"
WORKDIR_PREFIX = ".backup-"
LOCK_FILE = "backups.lock"


def clean_up_workdirs(data_dir: Path) -> list[str]:
    """Remove the work dirs of backups whose process died (each holds copies of both
    databases): only while no live process holds backups.lock shared, that is while no
    backup is being made anywhere. The names removed."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # a backup is being made: its dir is not stale
        removed = sorted(p.name for p in data_dir.glob(f"{WORKDIR_PREFIX}*") if p.is_dir())
        for name in removed:
            shutil.rmtree(data_dir / name, ignore_errors=True)
        if removed:
            log.warning("removed %d work dir(s) of backups a killed process left", len(removed))
        return removed
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LastBackup:
    """When the last backup archive was made, by whom, and what it held."""

    at: datetime.datetime
    actor: str
    size: int
    keys: int
    trust_state_version: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "at": self.at.isoformat(),
                "actor": self.actor,
                "size": self.size,
                "keys": self.keys,
                "trust_state_version": self.trust_state_version,
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> LastBackup | None:
        if not text:
            return None
        try:
            raw = json.loads(text)
            return cls(
                datetime.datetime.fromisoformat(raw["at"]),
                str(raw["actor"]),
                int(raw["size"]),
                int(raw["keys"]),
                int(raw["trust_state_version"]),
            )
        except (ValueError, KeyError, TypeError):
            log.warning("the record of the last backup does not parse; ignoring it")
            return None


@dataclass(frozen=True)
class Archive:
    """A backup archive made on the server, in a work dir to remove once sent."""

    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class StateChange:
    """A key whose state in the backup is not its live state."""

    key: ManifestKey
    live_state: str


@dataclass(frozen=True)
class Unheld:
    """A key the backup expects to be usable that its backend no longer holds."""

    key: ManifestKey
    reason: str


@dataclass(frozen=True)
class Verification:
    """The differences between a backup's manifest and the live inventory."""

    missing_from_backup: list[ManifestKey]
    missing_from_live: list[ManifestKey]
    state_changed: list[StateChange]
    not_held: list[Unheld]
    backup_trust_state_version: int
    live_trust_state_version: int
    backup_revocation_sequence: int
    live_revocation_sequence: int
    tables: dict[str, tuple[int, int]]  # table -> (backup rows, live rows)


def keyplane_version() -> str:
    try:
        return metadata.version("keyplane")
    except metadata.PackageNotFoundError:
        return "unknown"


def _manifest_key(record: KeyRecord, destroyed: bool, in_archive: bool) -> ManifestKey:
    return ManifestKey(
        fingerprint=record.fingerprint,
        kind=str(record.kind),
        name=record.name,
        state=str(record.state),
        backend=record.backend,
        key_uri=record.key_uri,
        destroyed=destroyed,
        in_archive=in_archive,
    )


class Backups:
    """Makes backup archives of one server and checks manifests against it."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.h = hierarchy
        self._locks: dict[Path, int] = {}
        self._locks_guard = threading.Lock()

    def new_workdir(self) -> Path:
        """A private dir beside the databases (same file system, same protection) for
        the copies and the archive, under a shared lock on backups.lock until discard."""
        data_dir = self.h.config.data_dir
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=data_dir))
        except BaseException:
            os.close(fd)
            raise
        with self._locks_guard:
            self._locks[workdir] = fd
        return workdir

    def discard(self, workdir: Path) -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        with self._locks_guard:
            fd = self._locks.pop(workdir, None)
        if fd is not None:
            os.close(fd)  # drops the shared lock

    def create(self, actor: str, workdir: Path) -> Archive:
        """Copy both databases at one point into `workdir` and write the archive there."""
        h = self.h
        now = h.clock.now()
        # Audited first, in a transaction of its own: the archive holds its own record.
        with h.store.transaction(now) as tx:
            tx.audit(actor, "backup.create", STATE_DB)
        state_copy = workdir / STATE_DB

        def copy_key_stores(copy: BackupReads) -> list[BackedUpStore]:
            recorded = [k.key_uri for k in copy.keys()]
            return [s.backup_into(workdir, recorded) for s in h.backends.backup_sources()]

        stores = h.store.copy_at_one_point(state_copy, copy_key_stores)
        for store in stores:
            if store.left_out:
                log.info(
                    "backup: left %d key(s) out of the %s copy that no record names yet",
                    len(store.left_out),
                    store.file_name,
                )
        with closing(sqlite3.connect(f"file:{state_copy}?mode=ro", uri=True)) as db:
            copy = BackupReads.of(db)
            destroyed = copy.destroyed_keys()
            in_archive = {uri for s in stores for uri in s.key_uris}
            keys = tuple(
                _manifest_key(k, k.fingerprint in destroyed, k.key_uri in in_archive)
                for k in copy.keys()
            )
            manifest = Manifest(
                created=now,
                server=h.config.fqdn,
                keyplane_version=keyplane_version(),
                schema_version=copy.schema_version(),
                trust_state_version=copy.trust_state_version(),
                revocation_sequence=copy.revocation_sequence(),
                members=(
                    member_of(state_copy),
                    *(member_of(workdir / s.file_name) for s in stores),
                ),
                tables=copy.row_counts(),
                keys=keys,
                key_stores=tuple(
                    KeyStore(
                        backend=s.backend,
                        file=s.file_name,
                        seal=s.seal,
                        key_file=s.key_file,
                        keys=len(s.key_uris),
                        left_out=s.left_out,
                    )
                    for s in stores
                ),
            )
        archive = workdir / ARCHIVE_NAME
        files = {STATE_DB: state_copy, **{s.file_name: workdir / s.file_name for s in stores}}
        write_archive(archive, manifest, files)
        for copied in files.values():
            copied.unlink()
        self._record_last(actor, manifest, archive.stat().st_size)
        log.info(
            "backup by %s: %d keys, %d certificates, trust-state version %d, revocation "
            "sequence %d",
            actor,
            len(keys),
            manifest.tables.get("certificates", 0),
            manifest.trust_state_version,
            manifest.revocation_sequence,
        )
        return Archive(archive, manifest)

    def _record_last(self, actor: str, manifest: Manifest, size: int) -> None:
        """What `keyplane status` shows as the last backup (kept in the state DB's meta,
        so every worker, and a restart, knows it)."""
        last = LastBackup(
            manifest.created, actor, size, len(manifest.keys), manifest.trust_state_version
        )
        with self.h.store.transaction(self.h.clock.now()) as tx:
            tx.set_meta(LAST_BACKUP, last.to_json())

    def last(self) -> LastBackup | None:
        """The last backup this server made, if any."""
        return LastBackup.from_json(self.h.store.meta_value(LAST_BACKUP))

    @staticmethod
    def check_archive(path: Path, scratch: Path) -> Manifest:
        """Check an archive as `keyplane backup verify` does before it asks the server:
        its members in order against their checksums and SHA256SUMS, and SQLite's checks
        of each database; its manifest, or INVALID_ARGUMENT saying what is wrong."""
        try:
            manifest = read_archive(path, scratch)
        except ArchiveError as exc:
            raise InvalidArgument(f"not an intact keyplane backup archive: {exc}") from None
        for member in manifest.members:
            problems = check_file(scratch / member.name)
            if problems:
                raise InvalidArgument(
                    f"{member.name} in the archive fails SQLite's checks: {'; '.join(problems[:3])}"
                )
        return manifest

    def verify(self, manifest_json: bytes) -> Verification:
        """The differences between the backup a manifest describes and what is live."""
        try:
            manifest = Manifest.from_json(manifest_json)
        except ArchiveError as exc:
            raise InvalidArgument(f"not a keyplane backup manifest: {exc}") from None
        live_reads = self.h.store.backup_reads
        live = {k.fingerprint: k for k in live_reads.keys()}
        live_destroyed = live_reads.destroyed_keys()
        backup = {k.fingerprint: k for k in manifest.keys}
        missing_from_backup = [
            _manifest_key(k, k.fingerprint in live_destroyed, False)
            for fp, k in live.items()
            if fp not in backup
        ]
        missing_from_live = [k for fp, k in backup.items() if fp not in live]
        state_changed = [
            StateChange(k, str(live[fp].state))
            for fp, k in backup.items()
            if fp in live and str(live[fp].state) != k.state
        ]
        live_counts = live_reads.row_counts()
        tables = {
            t: (manifest.tables.get(t, 0), live_counts.get(t, 0))
            for t in sorted({*manifest.tables, *live_counts})
        }
        return Verification(
            missing_from_backup=missing_from_backup,
            missing_from_live=missing_from_live,
            state_changed=state_changed,
            not_held=[u for k in manifest.keys if (u := self._unheld(k)) is not None],
            backup_trust_state_version=manifest.trust_state_version,
            live_trust_state_version=live_reads.trust_state_version(),
            backup_revocation_sequence=manifest.revocation_sequence,
            live_revocation_sequence=live_reads.revocation_sequence(),
            tables=tables,
        )

    def _unheld(self, key: ManifestKey) -> Unheld | None:
        """Why the live backend does not hold a key the backup expects to be usable, or
        None if it does (or the backup does not expect it: revoked, destroyed, or a
        zone's intermediate, which the zone holds)."""
        if key.state == KeyState.REVOKED or key.destroyed or key.kind == KeyKind.ZONE_INTERMEDIATE:
            return None
        backends = self.h.backends
        if key.backend not in backends.names:
            return Unheld(key, f"the {key.backend} backend is not configured on this server")
        try:
            if backends.holds_key(key.key_uri):
                return None
        except BackendError as exc:
            return Unheld(key, f"the {key.backend} backend could not look it up: {exc}")
        carried = " (the archive carries it, sealed)" if key.in_archive else ""
        return Unheld(key, f"not in the {key.backend} backend{carried}")
