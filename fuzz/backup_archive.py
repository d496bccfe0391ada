"""Backup archives (server/domain/backup_archive.py, as restore reads one;
clients/backup_archive.py, as `backup verify` checks one): any bytes as the archive
file give a Manifest or ArchiveError, and a CheckedArchive or ArchiveCheckError, never
another exception; nothing is written outside the extraction dir."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["keyplane"]):
    from keyplane.clients import backup_archive as client_archive
    from keyplane.server.domain import backup_archive as server_archive

from fuzz.harness import run

# Every input is written to a file and extracted: in memory where the machine has it
# (mkdtemp makes a directory only this user can enter, so a shared parent is safe).
SHM = Path("/dev/shm")  # noqa: S108
SCRATCH = Path(tempfile.mkdtemp(prefix="keyplane-fuzz-archive-", dir=SHM if SHM.is_dir() else None))


def test_one_input(data: bytes) -> None:
    archive = SCRATCH / "archive.tar"
    archive.write_bytes(data)
    extract = SCRATCH / "extract"
    extract.mkdir()
    try:
        try:
            server_archive.read_archive(archive, extract)
        except server_archive.ArchiveError:
            pass
        try:
            client_archive.check_archive(archive)
        except client_archive.ArchiveCheckError:
            pass
        outside = {p.name for p in SCRATCH.iterdir()} - {"archive.tar", "extract"}
        assert not outside, f"the archive wrote {outside} outside its extraction dir"
    finally:
        shutil.rmtree(extract)


if __name__ == "__main__":
    run(test_one_input)
