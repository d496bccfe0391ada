"""Backup manifests (server/domain/backup_archive.py, which VerifyBackup and restore
read; clients/backup_archive.py, which `backup verify` reads): any bytes give a Manifest
or ArchiveError (the server's) and a manifest or ArchiveCheckError (the client's),
never another exception."""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["keyplane"]):
    from keyplane.clients import backup_archive as client_archive
    from keyplane.server.domain import backup_archive as server_archive

from fuzz.harness import run


def test_one_input(data: bytes) -> None:
    try:
        manifest = server_archive.Manifest.from_json(data)
        manifest.to_json()
    except server_archive.ArchiveError:
        pass
    try:
        client_archive._parse_manifest(data)
    except client_archive.ArchiveCheckError:
        pass


if __name__ == "__main__":
    run(test_one_input)
