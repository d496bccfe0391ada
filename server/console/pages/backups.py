"""Backups: create one and download it (the same archive as `keyplane backup create`),
and verify an uploaded archive, then compare its manifest with the live inventory (as
`keyplane backup verify` does)."""

from __future__ import annotations

import asyncio
import datetime
import shutil
from pathlib import Path

from aiohttp import BodyPartReader, web

from keyplane.server.console.app import CONSOLE, CallFailed, Console, session_of
from keyplane.server.console.security import MAX_UPLOAD_BYTES
from keyplane.server.domain.backups import Backups
from keyplane.server.domain.console_sessions import csrf_matches
from keyplane.server.errors import KeyplaneError
from keyplane.v1 import backup_service_pb2 as pb

CREATE = "/keyplane.v1.BackupService/CreateBackup"
VERIFY = "/keyplane.v1.BackupService/VerifyBackup"
_CHUNK = 256 * 1024


async def backups_page(
    request: web.Request,
    status: int = 200,
    error: str = "",
    found: pb.VerifyBackupResponse | None = None,
    checked: str = "",
) -> web.Response:
    return await request.app[CONSOLE].page(
        request,
        "backups.html",
        status=status,
        error=error,
        found=found,
        checked=checked,
        CREATE=CREATE,
        VERIFY=VERIFY,
    )


async def show(request: web.Request) -> web.StreamResponse:
    return await backups_page(request)


async def create(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    chunks = console.stream(request, CREATE, pb.CreateBackupRequest())
    try:
        first: pb.CreateBackupResponse = await anext(chunks)  # refusals come before a byte
    except CallFailed as exc:
        return await backups_page(request, exc.http_status, exc.message)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="keyplane-{console.fqdn}-{stamp}.tar"',
            "Cache-Control": "no-store",
        }
    )
    if first.total_bytes:
        response.content_length = first.total_bytes
    await response.prepare(request)
    await response.write(first.chunk)
    async for chunk in chunks:
        await response.write(chunk.chunk)
    await response.write_eof()
    return response


async def _receive(request: web.Request, target: Path) -> str | None:
    """Stream the upload into `target`, the form token first; why not, or None."""
    reader = await request.multipart()
    part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "csrf":
        return "the form token must come first"
    given = (await part.read(decode=True))[:200].decode(errors="replace")
    if not csrf_matches(session_of(request).cookie, given):
        return "the form token is missing or wrong; reload the page and try again"
    part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "archive":
        return "choose a backup archive to upload"
    size = 0
    with target.open("xb") as out:
        while chunk := await part.read_chunk(_CHUNK):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                return f"the archive is over {MAX_UPLOAD_BYTES} bytes"
            await asyncio.to_thread(out.write, chunk)
    return None if size else "the uploaded file is empty"


async def verify(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    try:  # refused before a byte is read or stored
        console.require(request, VERIFY)
    except CallFailed as exc:
        return await backups_page(request, exc.http_status, exc.message)
    session = session_of(request).id
    busy = console.uploads.take(session)  # before anything is stored
    if busy is not None:
        return await backups_page(request, 429, busy)
    try:
        return await _verify(request, console)
    finally:
        console.uploads.give_back(session)


async def _verify(request: web.Request, console: Console) -> web.StreamResponse:
    workdir = await asyncio.to_thread(console.new_workdir)
    try:
        archive = workdir / "upload.tar"
        why = await _receive(request, archive)
        if why is not None:
            status = 403 if "form token" in why else 400
            return await backups_page(request, status, why)
        scratch = workdir / "members"
        scratch.mkdir()
        try:
            manifest = await asyncio.to_thread(Backups.check_archive, archive, scratch)
        except KeyplaneError as exc:
            return await backups_page(request, 400, str(exc))
        try:
            found: pb.VerifyBackupResponse = await console.call(
                request, VERIFY, pb.VerifyBackupRequest(manifest=manifest.to_json())
            )
        except CallFailed as exc:
            return await backups_page(request, exc.http_status, exc.message)
        checked = (
            f"The archive of {manifest.server} from {manifest.created:%Y-%m-%d %H:%M:%S} UTC "
            f"is intact ({len(manifest.members)} databases, {len(manifest.keys)} keys)."
        )
        return await backups_page(request, found=found, checked=checked)
    finally:
        # Shielded: an upload cut short (the browser gone, the server stopping) still
        # takes its file with it.
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, workdir, True))


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/backups", show)
    router.add_post("/backups/create", create)
    router.add_post("/backups/verify", verify)
