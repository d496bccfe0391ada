"""What a start may do with a data dir: initialise an empty one, finish a first start that
was interrupted, reuse a whole one, and refuse one that holds only part of a state.

A data dir holds one state DB (`keyplane.db`, or `zone.db` on a zone server) and the
software key store it belongs with (`pki.db`, with `pki.db.key` when no database
password is set). Initialising over a part of that would orphan the keys in `pki.db` or
replace the hierarchy its admin credential trusts, so only an empty data dir is
initialised. A first start writes a marker (`first-start.incomplete`) before anything
else and removes it once it is complete; a start that finds the marker finishes what
the interrupted one began, since nothing it made was acknowledged to anyone yet.

Every file in it is 0600 and every directory 0700: the process umask is 0o077 before a
file is created, and older files with looser modes are tightened at start.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sqlite3
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keyplane.plugins.manager import software_database_path as database_path
from keyplane.server.errors import DataDirIncomplete, DataDirUnwritable

log = logging.getLogger(__name__)

UMASK = 0o077
MARKER = "first-start.incomplete"
_MARKER_TEXT = (
    b"keyplane's first start in this data dir has not finished; the next start finishes\n"
    b"it. This file is removed once the data dir is complete.\n"
)


def private_umask() -> None:
    """Files this process creates from now on are 0600 and directories 0700."""
    os.umask(UMASK)


class DataDirState(enum.Enum):
    """What a start found in a data dir."""

    EMPTY = "empty"  # nothing of a state: initialise it
    UNFINISHED = "unfinished"  # the marker: finish the first start
    COMPLETE = "complete"  # the state DB and its key store: reuse them


def _password_configured(options: Mapping[str, object]) -> bool:
    return bool(options.get("password_file") or options.get("password_env"))


def _sealed_with_password(key_db: Path) -> bool:
    """Whether pki.db's header may say its keys are sealed with a password (which a
    locked start is then given by keyplane unlock). Read as immutable, so nothing beside
    it is made; a header still in the `-wal` is not seen there, and then the backend,
    which reads it, decides."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"{key_db.resolve().as_uri()}?immutable=1", uri=True)
        ) as db:
            row = db.execute("SELECT kek_source FROM header").fetchone()
    except sqlite3.Error:
        row = None
    if row is None:
        wal = key_db.with_name(key_db.name + "-wal")
        return wal.exists() and wal.stat().st_size > 0
    return bool(row[0] == "password")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DataDir:
    """One server's (or zone server's) data dir and the files its state is made of."""

    path: Path
    state_db: str  # file name in the data dir: keyplane.db or zone.db
    key_db: Path  # the software backend's pki.db (in the data dir unless configured)
    afresh: str  # how to start afresh, for the refusal message
    # No database password is configured, so pki.db's keys are sealed with pki.db.key.
    key_file_needed: bool = True
    credential: str | None = None  # the admin credential, relative to the data dir

    @classmethod
    def of_server(cls, path: Path, software_options: Mapping[str, object]) -> DataDir:
        return cls(
            path,
            "keyplane.db",
            database_path(software_options, path),
            "move the data dir aside to start afresh",
            key_file_needed=not _password_configured(software_options),
            credential="admin/admin.pem",
        )

    @classmethod
    def of_zone(cls, path: Path, software_options: Mapping[str, object]) -> DataDir:
        return cls(
            path,
            "zone.db",
            database_path(software_options, path),
            "move the data dir aside and enroll afresh (--bundle, --token)",
            key_file_needed=not _password_configured(software_options),
        )

    @property
    def key_file(self) -> Path:
        return self.key_db.with_name(self.key_db.name + ".key")

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def _name(self, file: Path) -> str:
        try:
            return str(file.relative_to(self.path))
        except ValueError:
            return str(file)

    def _state_files(self) -> list[Path]:
        """The files a state is made of. A `-wal` counts: SQLite would replay it into a
        new database of the same name. `-shm` and lock files are rebuilt, so they do not."""
        state_db = self.path / self.state_db
        files = [
            state_db,
            state_db.with_name(state_db.name + "-wal"),
            self.key_db,
            self.key_db.with_name(self.key_db.name + "-wal"),
            self.key_file,
        ]
        if self.credential is not None:
            files.append(self.path / self.credential)
        return files

    def check(self) -> DataDirState:
        """What is there; DataDirIncomplete, with what is missing and what to do, when
        only part of a state is. Reads only: a refused start changes nothing."""
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise DataDirUnwritable(
                f"{self.path} cannot be written (a read-only file system, or its owner and "
                "mode): the server writes every change there; make it writable"
            )
        if self.marker.exists():
            return DataDirState.UNFINISHED
        present = [f for f in self._state_files() if f.exists()]
        if not present:
            return DataDirState.EMPTY
        databases = (self.path / self.state_db, self.key_db)
        missing = [self._name(f) for f in databases if not f.exists()]
        why = ""
        if (
            not missing
            and self.key_file_needed
            and not self.key_file.exists()
            and not _sealed_with_password(self.key_db)
        ):
            missing = [self._name(self.key_file)]
            why = f" (no database password is configured: it seals the keys in {self.key_db.name})"
        if not missing:
            return DataDirState.COMPLETE
        beside = ", ".join(self._name(f) for f in present)
        were = "is" if len(missing) == 1 else "are"
        raise DataDirIncomplete(
            f"{' and '.join(missing)} {were} missing beside {beside} in {self.path}{why}: "
            f"restore {'it' if len(missing) == 1 else 'them'} from the same backup as the "
            f"rest (keyplane backup restore, coming), or {self.afresh}; nothing was changed"
        )

    def begin_first_start(self) -> None:
        """Before anything else of a first start: the marker, durably."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _MARKER_TEXT)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path)

    def first_start_done(self) -> None:
        """The first start is complete (a no-op after that)."""
        if self.marker.exists():
            self.marker.unlink()
            _fsync_dir(self.path)
            log.info("first start of %s complete", self.path)

    def tighten_modes(self) -> None:
        """Make keyplane's files 0600 and its directories 0700, whatever made them."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        prefixes = (self.state_db, self.key_db.name, MARKER)
        targets = [self.path]
        for entry in self.path.iterdir():
            if entry.name.startswith(prefixes) or entry.name == "admin":
                targets.append(entry)
        admin = self.path / "admin"
        if admin.is_dir() and not admin.is_symlink():
            targets.extend(admin.iterdir())
        if self.key_db.parent != self.path and self.key_db.parent.is_dir():
            targets.extend(p for p in self.key_db.parent.glob(self.key_db.name + "*"))
        tightened = []
        for target in targets:
            info = target.lstat()
            if stat.S_ISLNK(info.st_mode) or not info.st_mode & 0o077:
                continue
            target.chmod(stat.S_IMODE(info.st_mode) & 0o700)
            tightened.append(self._name(target))
        if tightened:
            log.warning(
                "others could read %s; made them private to this user", ", ".join(tightened)
            )
