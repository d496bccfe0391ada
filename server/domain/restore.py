"""Restoring a backup archive into a stopped server's data dir, never good data with bad.

The archive is checked and restored into a new dir beside the target (checksums,
SQLite's integrity checks, both databases opened, every live sealed key unsealed);
only then are the two swapped (atomically where the kernel can: renameat2
RENAME_EXCHANGE), and the replaced data dir is kept as `DIR.replaced-<time>`. Up to the
swap, restore holds the target's state DB in SQLite's exclusive mode: a server that has
it open makes restore refuse, and a server cannot start on it meanwhile. An archive
whose revocation sequence is below the target's is older than it: restoring it would
bring back what was revoked since, so it is refused unless forced, with the list.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keyplane.plugins.errors import BackendAuthError, BackendError
from keyplane.plugins.keys import fingerprint
from keyplane.plugins.manager import KeyBackends
from keyplane.server.domain.backup_archive import (
    STATE_DB,
    ArchiveError,
    KeyStore,
    Manifest,
    read_archive,
)
from keyplane.server.kinds import KeyState
from keyplane.server.store import (
    SCHEMA_VERSION,
    BackupReads,
    SchemaError,
    StateStore,
    Unrevoked,
    check_file,
)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_PASSWORD_FILE = ".restore-password"  # noqa: S105 - a file name; the password is not here


class RestoreRefused(Exception):
    """The restore did not happen; the target data dir is as it was."""

    def __init__(self, message: str, came_back: tuple[Unrevoked, ...] = ()) -> None:
        super().__init__(message)
        self.came_back = came_back


@dataclass(frozen=True)
class Restored:
    """What a restore did."""

    data_dir: Path
    manifest: Manifest
    replaced: Path | None
    came_back: tuple[Unrevoked, ...] = ()
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Unsealing:
    """How to open the archive's key stores: the key file of a pki.db without a
    password, and the database password when it has one (asked only if needed)."""

    key_file: Path | None = None
    password: Callable[[], bytes | None] = lambda: None


def utc_stamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def restore(
    archive: Path,
    data_dir: Path,
    unsealing: Unsealing,
    now: datetime.datetime,
    force: bool = False,
) -> Restored:
    """Restore `archive` into `data_dir` (which may not exist yet); RestoreRefused, with
    nothing changed, if anything is wrong."""
    data_dir = data_dir.absolute()
    if not data_dir.parent.is_dir():
        raise RestoreRefused(f"{data_dir.parent} does not exist")
    with _Held(data_dir) as held:
        staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restore-", dir=data_dir.parent))
        try:
            try:
                manifest = read_archive(archive, staging)
            except ArchiveError as exc:
                raise RestoreRefused(f"{archive} is refused: {exc}") from None
            _check_databases(staging, manifest)
            notes = tuple(
                _open_key_store(staging, data_dir, manifest, store, unsealing)
                for store in manifest.key_stores
            )
            _open_state_db(staging)
            came_back = _older_than_live(held.reads, staging, manifest, data_dir, force)
            _raise_trust_version_floor(held.reads, staging, manifest)
            held.release()
            try:
                replaced = _swap(staging, data_dir, now)
            except OSError as exc:
                raise RestoreRefused(
                    f"cannot put the restored data dir in place of {data_dir} "
                    f"({exc.strerror}); restore into a directory on the same file system "
                    "that is not a mount point"
                ) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return Restored(data_dir, manifest, replaced, came_back, tuple(n for n in notes if n))


class _Held:
    """The target's state DB held in SQLite's exclusive mode while restore works (so no
    server has it open, nor opens it meanwhile); `reads` over it, None for a new or
    empty target. Let go of before the swap: SQLite removes its WAL by path on close,
    and after the swap that path is the restored dir's."""

    def __init__(self, data_dir: Path) -> None:
        self.reads: BackupReads | None = None
        self._db: sqlite3.Connection | None = None
        if not data_dir.exists():
            return
        if not data_dir.is_dir():
            raise RestoreRefused(f"{data_dir} is not a directory")
        state_db = data_dir / STATE_DB
        if not state_db.exists():
            if any(data_dir.iterdir()):
                raise RestoreRefused(
                    f"{data_dir} is not empty and holds no {STATE_DB}: it is not a keyplane "
                    "data dir; restore into a new or empty directory, or into a data dir"
                )
            return
        self._db = sqlite3.connect(state_db, timeout=0, isolation_level=None)
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("BEGIN EXCLUSIVE")
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc):
                self.release()
                raise RestoreRefused(
                    f"a server (or another process) has {state_db} open; stop it before "
                    "restoring into its data dir"
                ) from None
            # Unreadable: what restoring over it would undo cannot be told; see
            # _older_than_live, which asks for --force.
        self.reads = BackupReads.of(self._db)

    def release(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()

    def __enter__(self) -> _Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_databases(staging: Path, manifest: Manifest) -> None:
    for member in manifest.members:
        problems = check_file(staging / member.name)
        if problems:
            raise RestoreRefused(
                f"{member.name} in the archive fails SQLite's checks: {'; '.join(problems[:3])}"
            )
    if manifest.schema_version > SCHEMA_VERSION:
        raise RestoreRefused(
            f"the archive's {STATE_DB} has schema version {manifest.schema_version}, newer "
            f"than this keyplane knows ({SCHEMA_VERSION}); restore it with the version that "
            "wrote it"
        )


def _open_key_store(
    staging: Path, data_dir: Path, manifest: Manifest, store: KeyStore, unsealing: Unsealing
) -> str:
    """Open the restored key store as the server would, and unseal every key the
    archive carries that is still live: a wrong password or key file refuses here. A
    note on where its key file came from, if it has one."""
    options: dict[str, object] = {"path": str(staging / store.file)}
    note = ""
    password_file = staging / _PASSWORD_FILE
    if store.seal == "password":
        password = unsealing.password()
        if not password:
            raise RestoreRefused(
                f"the archive's {store.file} is sealed with a database password: give it "
                "(--password-file FILE, or at the prompt on a terminal)"
            )
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(password)
        options["password_file"] = str(password_file)
    elif store.key_file:
        source = unsealing.key_file or data_dir / store.key_file
        if not source.is_file():
            raise RestoreRefused(
                f"the archive's {store.file} is sealed with a key file ({store.key_file}), "
                "which no archive holds; give the one it was made with (--key-file FILE)"
            )
        shutil.copyfile(source, staging / store.key_file)
        (staging / store.key_file).chmod(0o600)
        note = f"{store.key_file} copied from {source}"
    try:
        backends = KeyBackends({store.backend: options}, staging)
    except BackendAuthError:
        raise RestoreRefused(
            f"the {'password' if store.seal == 'password' else 'key file'} given does not "
            f"open the archive's {store.file}"
        ) from None
    except BackendError as exc:
        raise RestoreRefused(f"the archive's {store.file} does not open: {exc}") from None
    finally:
        password_file.unlink(missing_ok=True)
    try:
        for key in manifest.keys:
            if not key.in_archive or key.state == KeyState.REVOKED or key.destroyed:
                continue
            try:
                unsealed = backends.private_key(key.key_uri)
            except BackendError as exc:
                raise RestoreRefused(f"key {key.name} ({key.fingerprint}): {exc}") from None
            if fingerprint(unsealed.public_key()) != key.fingerprint:
                raise RestoreRefused(
                    f"key {key.name} in {store.file} is not the key its record names"
                )
    finally:
        backends.close()
    return note


def _open_state_db(staging: Path) -> None:
    """Open the restored state DB as the server will (bringing an older schema up to date)."""
    try:
        StateStore(staging / STATE_DB).close()
    except SchemaError as exc:
        raise RestoreRefused(str(exc)) from None
    except sqlite3.Error as exc:
        raise RestoreRefused(f"the archive's {STATE_DB} does not open: {exc}") from None


def _older_than_live(
    live: BackupReads | None, staging: Path, manifest: Manifest, data_dir: Path, force: bool
) -> tuple[Unrevoked, ...]:
    """What the archive would bring back from revoked, if it is older than the target;
    refuses then unless forced."""
    if live is None:
        return ()
    try:
        newer = live.revocations_after(manifest.revocation_sequence)
        live_sequence = live.revocation_sequence()
    except sqlite3.DatabaseError as exc:
        if force:
            return ()
        raise RestoreRefused(
            f"cannot read the revocations of {data_dir / STATE_DB} ({exc}), so what the "
            "archive would bring back is unknown; add --force to restore anyway"
        ) from None
    if not newer:
        return ()
    with contextlib.closing(
        sqlite3.connect(f"file:{staging / STATE_DB}?mode=ro", uri=True)
    ) as restored:
        came_back = tuple(BackupReads.of(restored).unrevoked(newer))
    if force:
        return came_back
    raise RestoreRefused(
        f"the archive is older than {data_dir}: its revocation sequence is "
        f"{manifest.revocation_sequence}, the data dir's {live_sequence} ({len(newer)} "
        f"revocation(s) since); restoring it would bring back {len(came_back)} revoked "
        "key(s), certificate(s) or zone(s); add --force to restore it anyway",
        came_back,
    )


# With no data dir to replace (it was lost), how far past the archive's trust-state
# version the lost server might have got: its next version goes above that.
VERSIONS_SINCE_A_BACKUP = 100_000


def _raise_trust_version_floor(live: BackupReads | None, staging: Path, manifest: Manifest) -> None:
    """Components that followed the replaced server hold trust-state versions published
    after the backup, and refuse anything not newer (rollback): the restored server's next
    version must be above them. It goes above the replaced data dir's latest, or, when
    there is none to read, VERSIONS_SINCE_A_BACKUP above the archive's."""
    floor = 0
    if live is not None:
        try:
            floor = live.trust_state_version()
        except sqlite3.DatabaseError:
            floor = 0
    if not floor:
        floor = manifest.trust_state_version + VERSIONS_SINCE_A_BACKUP
    with contextlib.closing(sqlite3.connect(staging / STATE_DB, isolation_level=None)) as restored:
        BackupReads.of(restored).raise_trust_version_floor(floor)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); OSError if the
    kernel or the file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(staging: Path, data_dir: Path, now: datetime.datetime) -> Path | None:
    """Put the restored dir at `data_dir`; the replaced dir's new name, if there was one."""
    _fsync_dir(staging)
    if not data_dir.exists() or not any(data_dir.iterdir()):
        os.rename(staging, data_dir)  # over an empty dir too
        _fsync_dir(data_dir.parent)
        return None
    replaced = data_dir.with_name(f"{data_dir.name}.replaced-{utc_stamp(now)}")
    n = 1
    while replaced.exists():
        n += 1
        replaced = data_dir.with_name(f"{data_dir.name}.replaced-{utc_stamp(now)}-{n}")
    try:
        _exchange(staging, data_dir)
    except OSError:
        # No atomic exchange here: two renames, the first undone if the second fails.
        os.rename(data_dir, replaced)
        try:
            os.rename(staging, data_dir)
        except OSError:
            os.rename(replaced, data_dir)
            raise
    else:
        try:
            os.rename(staging, replaced)
        except OSError:  # restored; the replaced data stays where the restore was staged
            replaced = staging
    _fsync_dir(data_dir.parent)
    return replaced
