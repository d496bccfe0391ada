"""Serving the console: aiohttp's AppRunner and TCPSite on the gRPC server's own event
loop, so signals stay keyplane's (the server's or its supervisor's handlers), with the
port bound beside the claim the serving process (or its supervisor) holds on it."""

from __future__ import annotations

import logging
import socket

from aiohttp import web

from keyplane.server.config import format_address
from keyplane.server.console.app import Console, make_app
from keyplane.server.console.tls import ConsoleTls
from keyplane.server.errors import PortTaken

log = logging.getLogger(__name__)


def console_url(host: str, port: int, fqdn: str) -> str:
    """The address a browser opens: a wildcard listener is reached by the server's name."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - compared, not bound
        host = fqdn
    return f"https://{format_address(host, port)}"


class ConsoleSite:
    """The console's HTTPS listener."""

    def __init__(self, console: Console, tls: ConsoleTls, host: str, port: int) -> None:
        self._app = make_app(console)
        self._tls = tls
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> int:
        """Listen; the bound port (the kernel's choice when 0 was asked for)."""
        # handle_signals=False: the runner leaves SIGINT and SIGTERM to keyplane.
        runner = web.AppRunner(
            self._app, handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await runner.setup()
        site = web.TCPSite(
            runner,
            self._host,
            self._port,
            ssl_context=self._tls.context,
            reuse_address=True,
            reuse_port=True,
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PortTaken(
                f"cannot listen on {format_address(self._host, self._port)} "
                f"(--console-listen): {exc.strerror}"
            ) from None
        self._runner = runner
        server = site._server  # the asyncio server: its socket has the bound port
        sockets: list[socket.socket] = list(getattr(server, "sockets", None) or [])
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("admin console on https://%s", format_address(self._host, self.port))
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        # Browsers hold keep-alive connections; a TLS close waits for the peer's
        # close_notify, which may outlive the event loop: drop them outright.
        server = runner.server
        for handler in list(server.connections if server is not None else ()):
            if handler.transport is not None:
                handler.transport.abort()
        await runner.cleanup()
