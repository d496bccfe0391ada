"""BackupService: a backup archive streamed in chunks, and a manifest checked against
the live inventory."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from keyplane.server.domain.backup_archive import ManifestKey
from keyplane.server.domain.backups import Archive, Backups, Unheld, Verification
from keyplane.server.services.context import Context, actor
from keyplane.v1 import backup_service_pb2 as pb
from keyplane.v1 import backup_service_pb2_grpc

# Every chunk but the last is this long: well under the 4 MiB message limit.
CHUNK_BYTES = 256 * 1024


def _key(key: ManifestKey) -> pb.BackupKey:
    return pb.BackupKey(
        fingerprint=key.fingerprint,
        kind=key.kind,
        name=key.name,
        state=key.state,
        backend=key.backend,
        key_uri=key.key_uri,
        in_archive=key.in_archive,
    )


def _unheld(unheld: Unheld) -> pb.UnheldBackupKey:
    return pb.UnheldBackupKey(key=_key(unheld.key), reason=unheld.reason)


def _verification(found: Verification) -> pb.VerifyBackupResponse:
    return pb.VerifyBackupResponse(
        missing_from_backup=[_key(k) for k in found.missing_from_backup],
        missing_from_live=[_key(k) for k in found.missing_from_live],
        state_changed=[
            pb.BackupKeyStateChange(key=_key(c.key), live_state=c.live_state)
            for c in found.state_changed
        ],
        not_held=[_unheld(u) for u in found.not_held],
        backup_trust_state_version=found.backup_trust_state_version,
        live_trust_state_version=found.live_trust_state_version,
        backup_revocation_sequence=found.backup_revocation_sequence,
        live_revocation_sequence=found.live_revocation_sequence,
        tables=[
            pb.BackupTableRows(table=t, backup_rows=b, live_rows=live)
            for t, (b, live) in found.tables.items()
        ],
    )


class BackupServicer(backup_service_pb2_grpc.BackupServiceServicer):
    """Thin: the domain makes the archive off the event loop; this streams it."""

    def __init__(self, backups: Backups) -> None:
        self._backups = backups

    async def CreateBackup(
        self, request: pb.CreateBackupRequest, context: Context
    ) -> AsyncIterator[pb.CreateBackupResponse]:
        making = asyncio.ensure_future(asyncio.to_thread(self._backups.new_workdir))
        try:
            workdir = await asyncio.shield(making)
        except asyncio.CancelledError:
            # Given up while its work dir was being made: the dir (and its lock) go once
            # it exists, instead of staying for good.
            making.add_done_callback(self._discard_made)
            raise
        made = asyncio.ensure_future(asyncio.to_thread(self._backups.create, actor(), workdir))
        try:
            # Shielded: a caller who hangs up does not stop the copy half-way; the work
            # dir goes once it is done.
            archive: Archive = await asyncio.shield(made)
            digest = hashlib.sha256()
            size = archive.path.stat().st_size
            with archive.path.open("rb") as f:
                first = True
                while True:
                    chunk = await asyncio.to_thread(f.read, CHUNK_BYTES)
                    digest.update(chunk)
                    last = f.tell() >= size
                    yield pb.CreateBackupResponse(
                        total_bytes=size if first else 0,
                        chunk=chunk,
                        archive_sha256=digest.hexdigest() if last else "",
                    )
                    first = False
                    if last:
                        return
        finally:
            if made.done():
                self._backups.discard(workdir)
            else:
                made.add_done_callback(lambda _: self._discard_after(made, workdir))

    def _discard_made(self, making: asyncio.Future[Path]) -> None:
        if not making.cancelled() and making.exception() is None:
            self._backups.discard(making.result())

    def _discard_after(self, made: asyncio.Future[Archive], workdir: Path) -> None:
        if not made.cancelled():
            made.exception()  # seen: the caller who would have had it is gone
        self._backups.discard(workdir)

    async def VerifyBackup(
        self, request: pb.VerifyBackupRequest, context: Context
    ) -> pb.VerifyBackupResponse:
        found = await asyncio.to_thread(self._backups.verify, request.manifest)
        return _verification(found)
