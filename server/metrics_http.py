"""The metrics endpoint: `GET /metrics` over plain HTTP (`--metrics-listen`), off by
default.

It serves the Prometheus text and nothing else: another path gets 404, another method
405, and no request changes anything. The page holds counts, key fingerprints and
expiry times, never a key, a certificate or a secret; still, it tells whoever reaches
it how the server is used, so listen on loopback or a management network. It binds
with SO_REUSEPORT beside the claim of the process that owns the port (server/ports.py),
so that every worker of `--workers N` answers on it, each with the whole run's counts.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keyplane.server.config import format_address, parse_address
from keyplane.server.errors import PortTaken

log = logging.getLogger(__name__)

PATH = "/metrics"
# Connections served at once (each has a thread); more are closed at once.
MAX_CONNECTIONS = 16
# A request must arrive (and its answer be taken) within this long of the connection's
# start: a whole-connection deadline, not a per-read timeout, so that clients that send a
# byte now and then cannot hold the slots.
REQUEST_SECONDS = 10.0


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    timeout = REQUEST_SECONDS
    server_version = "keyplane"
    sys_version = ""
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(REQUEST_SECONDS, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def _expire(self) -> None:
        """Past the deadline: the blocked read or write returns, and the slot is free."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != PATH:
            self._answer(404, b"not found: this endpoint serves GET /metrics only\n")
            return
        try:
            body = self.server.render()
        except Exception:
            log.exception("metrics: could not render the page")
            self._answer(500, b"the metrics could not be read; see the server log\n")
            return
        self._answer(200, body, CONTENT_TYPE_LATEST)

    def _refuse(self) -> None:
        self._answer(405, b"method not allowed: this endpoint serves GET /metrics only\n")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

    def do_HEAD(self) -> None:
        self._answer(405, b"")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if status == 405:
            self.send_header("Allow", "GET")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, render: Callable[[], bytes]
    ) -> None:
        self.address_family = family
        self.render = render
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Beside the owning process's claim and the other workers' listeners. (Not
        # HTTPServer.server_bind: it looks the host's name up in DNS.)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: closed, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsEndpoint:
    """Serves `render()` on GET /metrics from a thread of its own."""

    def __init__(self, address: str, render: Callable[[], bytes]) -> None:
        host, port = parse_address(address, "metrics_listen")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._server = _HttpServer((host, port), family, render)
        except OSError as exc:
            raise PortTaken(
                f"cannot listen on {address} (--metrics-listen): {exc.strerror}"
            ) from None
        self.address = format_address(host, int(self._server.server_address[1]))
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics endpoint", daemon=True
        )

    def start(self) -> str:
        self._thread.start()
        log.info("metrics on http://%s%s", self.address, PATH)
        return self.address

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
