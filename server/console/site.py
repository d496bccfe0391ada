"""Serving the console: aiohttp's AppRunner and TCPSite on the gRPC server's own event
loop, so signals stay keyplane's (the server's or its supervisor's handlers), with the
port bound beside the claim the serving process (or its supervisor) holds on it."""

from __future__ import annotations

import logging

from aiohttp import web

from keyplane.server.config import format_address
from keyplane.server.console.app import Console, make_app
from keyplane.server.console.tls import ConsoleTls
from keyplane.server.errors import PortTaken
from keyplane.server.http_listen import CappedListener, listener_cap

log = logging.getLogger(__name__)

# Connections at once (a browser opens up to six to a site): a few dozen people.
MAX_CONNECTIONS = 128
# A TLS handshake must end within this long of the connection's start.
HANDSHAKE_SECONDS = 10.0
# A request head must arrive within this long of the handshake or of the last answer
# (aiohttp's keep-alive timeout); an upload's body may take longer.
REQUEST_HEAD_SECONDS = 30.0


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
        self._listener: CappedListener | None = None
        self.port = port

    async def start(self) -> int:
        """Listen; the bound port (the kernel's choice when 0 was asked for)."""
        # handle_signals=False: the runner leaves SIGINT and SIGTERM to keyplane.
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=2.0,
            keepalive_timeout=REQUEST_HEAD_SECONDS,
        )
        await runner.setup()
        server = runner.server
        assert server is not None  # noqa: S101 - setup() made it
        listener = CappedListener(
            server,
            self._host,
            self._port,
            option="--console-listen",
            cap=listener_cap(MAX_CONNECTIONS),
            tls=self._tls.context,
            handshake_seconds=HANDSHAKE_SECONDS,
        )
        try:
            self.port = listener.start()
        except PortTaken:
            await runner.cleanup()
            raise
        self._runner, self._listener = runner, listener
        log.info(
            "admin console on https://%s (at most %d connections at once)",
            format_address(self._host, self.port),
            listener.cap,
        )
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()
        if runner is None:
            return
        # Browsers hold keep-alive connections; a TLS close waits for the peer's
        # close_notify, which may outlive the event loop: drop them outright.
        server = runner.server
        for handler in list(server.connections if server is not None else ()):
            if handler.transport is not None:
                handler.transport.abort()
        await runner.cleanup()
