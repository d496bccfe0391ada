"""CRLs over plain HTTP (`--crl-listen`), for TLS stacks that are not keyplane's: a
server or zone server serves `GET`/`HEAD /crl/<issuer fingerprint>.crl` (DER,
application/pkix-crl) and `.pem`, on the event loop of its gRPC server.

Nothing else: no directory, no listing, no other method (405), no other path (404), no
request body (413), short request lines and headers (aiohttp answers 400 or 431 past
them). What it serves is public and signed: someone who can reach it learns the CRLs
and can change nothing, and hold at most MAX_CONNECTIONS of the process's descriptors,
each for a bounded time (server/http_listen.py). With `--workers N` every worker serves
the port (SO_REUSEPORT) from the same database, so each answers the same.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from email.utils import format_datetime

from aiohttp import web

from keyplane.server.config import format_address, parse_address
from keyplane.server.domain import crl
from keyplane.server.errors import PortTaken
from keyplane.server.http_listen import CappedListener, listener_cap

log = logging.getLogger(__name__)

# A CRL as served: its DER and its thisUpdate.
Served = tuple[bytes, datetime.datetime]
Lookup = Callable[[str], Served | None]

MAX_LINE = 1024
MAX_FIELD = 2048
MAX_HEADERS = 32
# Connections at once; one more is closed at once. CRL fetches are short.
MAX_CONNECTIONS = 256
# A request must arrive within this long of the connection's start or of the last
# answer (the keep-alive timeout counts from the start, not per read) ...
REQUEST_SECONDS = 5.0
# ... and a connection lasts at most this long, answers included.
CONNECTION_SECONDS = 30.0
ALLOWED = "GET, HEAD"


def _plain(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        text=text + "\n",
        headers={"Server": "keyplane", "X-Content-Type-Options": "nosniff", **headers},
    )


class CrlSite:
    """The CRL listener of one process."""

    def __init__(self, lookup: Lookup, address: str, option: str = "--crl-listen") -> None:
        self._lookup = lookup
        self._host, self._port = parse_address(address, option)
        self._option = option
        self._runner: web.ServerRunner | None = None
        self._listener: CappedListener | None = None
        self.address = ""

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _plain(405, "only GET and HEAD are served here", Allow=ALLOWED)
        if request.body_exists or (request.content_length or 0) > 0:
            return _plain(413, "a CRL request has no body")
        found = crl.parse_crl_path(request.path)
        if found is None:
            return _plain(404, "not found: CRLs are at /crl/<issuer fingerprint>.crl")
        fingerprint, form = found
        try:
            served = await asyncio.to_thread(self._lookup, fingerprint)
        except Exception:
            log.exception("could not read the CRL of %s", fingerprint)
            return _plain(503, "the CRL cannot be read right now; try again")
        if served is None:
            return _plain(404, "no CRL for that issuer here")
        der, this_update = served
        body = crl.to_pem(der) if form == "pem" else der
        content_type = crl.CONTENT_TYPE_PEM if form == "pem" else crl.CONTENT_TYPE_DER
        return web.Response(
            body=body,
            content_type=content_type,
            headers={
                "Server": "keyplane",
                "X-Content-Type-Options": "nosniff",
                # A revocation changes the CRL at once: ask every time.
                "Cache-Control": "no-cache",
                "Last-Modified": format_datetime(this_update.astimezone(datetime.UTC), True),
            },
        )

    async def start(self) -> str:
        """Listen (beside other workers on the port); the bound address."""
        server = web.Server(
            self._handle,
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            keepalive_timeout=REQUEST_SECONDS,
            access_log=None,
        )
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        listener = CappedListener(
            server,
            self._host,
            self._port,
            option=self._option,
            cap=listener_cap(MAX_CONNECTIONS),
            lifetime_seconds=CONNECTION_SECONDS,
        )
        try:
            port = listener.start()
        except PortTaken:
            await runner.cleanup()
            raise
        self._runner, self._listener = runner, listener
        self.address = format_address(self._host, port)
        return self.address

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
