"""Checking a backup archive on the client, without a server: the members the manifest
lists, in order, each against its SHA-256, SHA256SUMS last, and SQLite's integrity
check of each database inside. The format is the server's
(server/domain/backup_archive.py); the client only reads it, and tests pin the two
together. Also the progress bar `backup create` draws."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

FORMAT = "keyplane-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_COPY_BYTES = 1024 * 1024


class ArchiveCheckError(Exception):
    """The file is not an intact keyplane backup archive."""


@dataclass(frozen=True)
class CheckedArchive:
    """An archive that passed every check: its manifest as bytes and parsed."""

    manifest_bytes: bytes
    manifest: dict[str, Any]


def _parse_manifest(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise ArchiveCheckError("the manifest is not JSON: the archive is corrupt") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArchiveCheckError("this is not a keyplane backup archive")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArchiveCheckError(
            f"the backup has format version {data.get('format_version')!r}; this keyplane "
            f"reads version {FORMAT_VERSION}"
        )
    members = data.get("members")
    if not isinstance(members, list) or not all(
        isinstance(m, dict) and {"name", "size", "sha256"} <= set(m) for m in members
    ):
        raise ArchiveCheckError("the manifest lists no members: the archive is corrupt")
    return data


def _integrity(path: Path, name: str) -> None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            result = [str(r[0]) for r in db.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        raise ArchiveCheckError(f"{name} in the archive is not a sound database ({exc})") from None
    if result != ["ok"]:
        raise ArchiveCheckError(f"{name} fails SQLite's integrity check: {'; '.join(result[:3])}")


def _read_all(source: IO[bytes] | None, size: int, name: str) -> bytes:
    assert source is not None  # noqa: S101 - a regular file
    data = source.read()
    if len(data) != size:
        raise ArchiveCheckError(f"the archive ends inside {name} (truncated)")
    return data


def _next(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    info = tar.next()
    if info is not None and not info.isreg():
        raise ArchiveCheckError(f"the archive holds {info.name!r}, which is not a file")
    return info


def check_archive(path: Path) -> CheckedArchive:
    """Every check that needs no server; ArchiveCheckError saying what failed."""
    try:
        with (
            path.open("rb") as f,
            tarfile.open(fileobj=f, mode="r|") as tar,
            tempfile.TemporaryDirectory(prefix="keyplane-verify-") as scratch,
        ):
            return _check(tar, Path(scratch))
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveCheckError(f"the archive is corrupt or truncated ({exc})") from None
    except OSError as exc:
        raise ArchiveCheckError(f"cannot read {path}: {exc.strerror}") from None


def _check(tar: tarfile.TarFile, scratch: Path) -> CheckedArchive:
    first = _next(tar)
    if first is None or first.name != MANIFEST or first.size > MAX_MANIFEST_BYTES:
        raise ArchiveCheckError(f"this is not a keyplane backup archive (no {MANIFEST} first)")
    manifest_bytes = _read_all(tar.extractfile(first), first.size, MANIFEST)
    manifest = _parse_manifest(manifest_bytes)
    sums = [f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}"]
    for n, member in enumerate(manifest["members"]):
        name = str(member["name"])
        info = _next(tar)
        if info is None:
            raise ArchiveCheckError(f"the archive ends before {name} (truncated)")
        if info.name != name or info.size != int(member["size"]):
            raise ArchiveCheckError(f"the archive holds {info.name!r} where {name} should be")
        source = tar.extractfile(info)
        assert source is not None  # noqa: S101 - a regular file
        digest = hashlib.sha256()
        copy = scratch / f"member-{n}.db"
        with copy.open("xb") as out:
            while chunk := source.read(_COPY_BYTES):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != member["sha256"]:
            raise ArchiveCheckError(f"{name} in the archive does not match its checksum")
        _integrity(copy, name)
        copy.unlink()
        sums.append(f"{member['sha256']}  {name}")
    info = _next(tar)
    if info is None or info.name != SUMS:
        raise ArchiveCheckError(f"the archive ends before {SUMS} (truncated)")
    if _read_all(tar.extractfile(info), info.size, SUMS) != ("\n".join(sums) + "\n").encode():
        raise ArchiveCheckError(f"the manifest does not match {SUMS}: the archive is corrupt")
    extra = _next(tar)
    if extra is not None:
        raise ArchiveCheckError(f"the archive holds {extra.name!r} after {SUMS}")
    return CheckedArchive(manifest_bytes, manifest)


class Progress:
    """A progress bar on a terminal (stderr), plain lines at each quarter otherwise."""

    WIDTH = 30

    def __init__(self, total: int, label: str, stream: TextIO) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.done = 0
        self._quarter = -1
        self._drawn = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        fraction = min(self.done / self.total, 1.0)
        if self.tty:
            now = time.monotonic()
            if now - self._drawn < 0.1 and fraction < 1.0:
                return
            self._drawn = now
            filled = int(fraction * self.WIDTH)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(
                f"\r{self.label} [{bar}] {fraction:4.0%} {_mib(self.done)}/{_mib(self.total)}"
            )
            if fraction >= 1.0:
                self.stream.write("\n")
            self.stream.flush()
            return
        quarter = int(fraction * 4)
        if quarter > self._quarter:
            self._quarter = quarter
            print(
                f"{self.label}: {fraction:.0%} ({self.done} of {self.total} bytes)",
                file=self.stream,
                flush=True,
            )


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
