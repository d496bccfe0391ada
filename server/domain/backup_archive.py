"""The backup archive: an uncompressed tar of `manifest.json`, the database copies it
lists (`keyplane.db`, then each key store's file, `pki.db`), and `SHA256SUMS`, in that
order. The manifest gives each member's size and SHA-256; SHA256SUMS, last, gives the
manifest's and the members' (`sha256sum -c` reads it), so a flipped byte anywhere is
caught, and an archive cut short lacks it. The client reads the same format
(clients/backup_archive.py; tests pin the two together)."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

FORMAT = "keyplane-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_DB = "keyplane.db"
SUMS = "SHA256SUMS"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_COPY_BYTES = 1024 * 1024


class ArchiveError(Exception):
    """The file is not an intact keyplane backup archive."""


@dataclass(frozen=True)
class Member:
    """A database file in the archive."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ManifestKey:
    """A key of the hierarchy as the backup holds it."""

    fingerprint: str
    kind: str
    name: str
    state: str
    backend: str
    key_uri: str
    destroyed: bool
    in_archive: bool


@dataclass(frozen=True)
class KeyStore:
    """A key backend's store in the archive (the software backend's pki.db)."""

    backend: str
    file: str
    seal: str
    key_file: str | None
    keys: int
    left_out: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """What an archive holds; written first, read back by verify and restore."""

    created: datetime.datetime
    server: str
    keyplane_version: str
    schema_version: int
    trust_state_version: int
    revocation_sequence: int
    members: tuple[Member, ...]
    tables: dict[str, int]
    keys: tuple[ManifestKey, ...]
    key_stores: tuple[KeyStore, ...]

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        data.update(asdict(self))
        data["created"] = self.created.astimezone(datetime.UTC).isoformat()
        data["notes"] = [_key_file_note(s) for s in self.key_stores if s.key_file]
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse a manifest; ArchiveError saying what is wrong if keyplane did not write it."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ArchiveError(f"the manifest is over {MAX_MANIFEST_BYTES} bytes")
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ArchiveError("this is not a keyplane backup manifest")
            if data.get("format_version") != FORMAT_VERSION:
                raise ArchiveError(
                    f"the backup has format version {data.get('format_version')!r}; this "
                    f"keyplane reads version {FORMAT_VERSION}"
                )
            return cls(
                created=datetime.datetime.fromisoformat(str(data["created"])),
                server=str(data["server"]),
                keyplane_version=str(data["keyplane_version"]),
                schema_version=int(data["schema_version"]),
                trust_state_version=int(data["trust_state_version"]),
                revocation_sequence=int(data["revocation_sequence"]),
                members=tuple(
                    Member(str(m["name"]), int(m["size"]), str(m["sha256"]))
                    for m in data["members"]
                ),
                tables={str(t): int(n) for t, n in dict(data["tables"]).items()},
                keys=tuple(
                    ManifestKey(
                        fingerprint=str(k["fingerprint"]),
                        kind=str(k["kind"]),
                        name=str(k["name"]),
                        state=str(k["state"]),
                        backend=str(k["backend"]),
                        key_uri=str(k["key_uri"]),
                        destroyed=bool(k["destroyed"]),
                        in_archive=bool(k["in_archive"]),
                    )
                    for k in data["keys"]
                ),
                key_stores=tuple(
                    KeyStore(
                        backend=str(s["backend"]),
                        file=str(s["file"]),
                        seal=str(s["seal"]),
                        key_file=str(s["key_file"]) if s.get("key_file") else None,
                        keys=int(s["keys"]),
                        left_out=tuple(str(u) for u in s["left_out"]),
                    )
                    for s in data["key_stores"]
                ),
            )
        except ArchiveError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ArchiveError(f"the manifest is malformed ({type(exc).__name__})") from None


def _key_file_note(store: KeyStore) -> str:
    return (
        f"{store.file} is sealed with the key file {store.key_file} (no database password "
        f"was set), which this archive does not hold: keep it apart from the archive, and "
        f"give it to restore (--key-file)"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_COPY_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def member_of(path: Path, name: str | None = None) -> Member:
    return Member(name or path.name, path.stat().st_size, sha256_file(path))


def _info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(mtime)
    return info


def sums_text(manifest_bytes: bytes, members: tuple[Member, ...]) -> bytes:
    lines = [f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}"]
    lines += [f"{m.sha256}  {m.name}" for m in members]
    return ("\n".join(lines) + "\n").encode()


def write_archive(target: Path, manifest: Manifest, files: dict[str, Path]) -> None:
    """Write the archive of `manifest` and its members' files (by member name)."""
    manifest_bytes = manifest.to_json()
    mtime = manifest.created.timestamp()
    with target.open("xb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
        tar.addfile(_info(MANIFEST, len(manifest_bytes), mtime), io.BytesIO(manifest_bytes))
        for member in manifest.members:
            with files[member.name].open("rb") as f:
                tar.addfile(_info(member.name, member.size, mtime), f)
        sums = sums_text(manifest_bytes, manifest.members)
        tar.addfile(_info(SUMS, len(sums), mtime), io.BytesIO(sums))
    target.chmod(0o600)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        info = tar.next()
        if info is None:
            return
        if not info.isreg():
            raise ArchiveError(f"the archive holds {info.name!r}, which is not a file")
        yield info


def _copy_out(source: IO[bytes], target: Path) -> str:
    digest = hashlib.sha256()
    with target.open("xb") as out:
        while chunk := source.read(_COPY_BYTES):
            digest.update(chunk)
            out.write(chunk)
    target.chmod(0o600)
    return digest.hexdigest()


def read_archive(path: Path, extract_to: Path) -> Manifest:
    """Check the archive at `path` member by member and extract its database files into
    `extract_to` (they are named by the manifest, never by the tar): the manifest, or
    ArchiveError saying what is wrong (corrupt, truncated, not an archive)."""
    try:
        with path.open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            return _read(tar, extract_to)
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"the archive is corrupt or truncated ({exc})") from None
    except OSError as exc:
        raise ArchiveError(f"cannot read the archive ({exc.strerror})") from None


def _read(tar: tarfile.TarFile, extract_to: Path) -> Manifest:
    members = _members(tar)
    first = next(members, None)
    if first is None or first.name != MANIFEST or first.size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"this is not a keyplane backup archive (no {MANIFEST} first)")
    manifest_bytes = _read_member(tar, first)
    manifest = Manifest.from_json(manifest_bytes)
    for expected in manifest.members:
        if "/" in expected.name or expected.name.startswith("."):
            raise ArchiveError(f"the manifest names a bad member {expected.name!r}")
        info = next(members, None)
        if info is None:
            raise ArchiveError(f"the archive ends before {expected.name} (truncated)")
        if info.name != expected.name or info.size != expected.size:
            raise ArchiveError(f"the archive holds {info.name!r} where {expected.name} should be")
        source = tar.extractfile(info)
        assert source is not None  # noqa: S101 - a regular file
        if _copy_out(source, extract_to / expected.name) != expected.sha256:
            raise ArchiveError(f"{expected.name} in the archive does not match its checksum")
    info = next(members, None)
    if info is None or info.name != SUMS:
        raise ArchiveError(f"the archive ends before {SUMS} (truncated)")
    if _read_member(tar, info) != sums_text(manifest_bytes, manifest.members):
        raise ArchiveError(f"the manifest does not match {SUMS}: the archive is corrupt")
    extra = next(members, None)
    if extra is not None:
        raise ArchiveError(f"the archive holds {extra.name!r} after {SUMS}")
    return manifest


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(info)
    assert source is not None  # noqa: S101 - a regular file
    data = source.read()
    if len(data) != info.size:
        raise ArchiveError(f"the archive ends inside {info.name} (truncated)")
    return data
