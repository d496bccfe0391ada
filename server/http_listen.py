"""A bounded HTTP(S) listener for aiohttp, and the process's descriptor limit.

Every listener of a serving process shares its file descriptors with gRPC, SQLite and
the other listeners. asyncio's own `create_server` accepts as many connections as the
kernel hands it, so a thousand idle connections to one plain or HTTPS port use up a
systemd service's default soft limit (1024) and the mutual-TLS API stops accepting; and
every refused accept then logs a traceback. So the console and the CRL listeners accept
here instead:

- at most `cap` connections at once (TLS handshakes under way included); one past the
  cap is accepted and closed at once, which costs a descriptor for a moment only;
- a TLS handshake must finish within `handshake_seconds`, a request head must arrive
  within the aiohttp server's keep-alive timeout of the connection's start or its last
  answer, and a connection may last at most `lifetime_seconds` when that is set;
- refusals and a full descriptor table are logged as one line a minute, never a line
  (nor a traceback) per accept.

`raise_descriptor_limit()` raises the soft RLIMIT_NOFILE to the hard one at start, and
`listener_cap()` keeps each cap below what the limit leaves after RESERVED descriptors
for gRPC, SQLite, the log and the key backend.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable

from keyplane.server.config import format_address
from keyplane.server.errors import PortTaken

log = logging.getLogger(__name__)

# Descriptors no HTTP listener may take: gRPC's connections and polling, SQLite's files
# (each worker thread's connection, its WAL and shared memory), the log, the HSM.
RESERVED = 512
# A soft limit is raised no further than this (the hard limit may be "unlimited").
RAISE_AT_MOST = 1 << 20
# Out of descriptors: accepting waits this long before it tries again.
ACCEPT_PAUSE_SECONDS = 0.25
# Refusals are told in one line at most this often.
REPORT_SECONDS = 60.0
# Connections accepted in one wake-up of the event loop, before others get their turn.
ACCEPTS_PER_WAKE = 64
BACKLOG = 128

_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = RAISE_AT_MOST if hard == resource.RLIM_INFINITY else min(hard, RAISE_AT_MOST)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
    return int(soft)


def listener_cap(wanted: int, listeners: int = 2) -> int:
    """`wanted`, or less when the descriptor limit cannot give each of `listeners` HTTP
    listeners that many beside the RESERVED ones (never under 8)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, (int(soft) - RESERVED) // max(1, listeners)))


class _Slot:
    """One accepted connection's place under the cap; given back once."""

    def __init__(self, listener: CappedListener) -> None:
        self._listener = listener
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._listener._released()


class _Counted(asyncio.Protocol):
    """The aiohttp protocol of one connection, giving its slot back when it ends."""

    def __init__(
        self, inner: asyncio.Protocol, slot: _Slot, lifetime_seconds: float | None
    ) -> None:
        self._inner = inner
        self._slot = slot
        self._lifetime = lifetime_seconds
        self._expiry: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._lifetime is not None and isinstance(transport, asyncio.Transport):
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(self._lifetime, transport.abort)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        try:
            self._inner.connection_lost(exc)
        finally:
            self._slot.release()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class CappedListener:
    """Accepts on `host:port` (beside the port's claim: SO_REUSEPORT), at most `cap`
    connections at once, each served by a protocol from `factory`."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        host: str,
        port: int,
        *,
        option: str,
        cap: int,
        tls: ssl.SSLContext | None = None,
        handshake_seconds: float = 10.0,
        lifetime_seconds: float | None = None,
    ) -> None:
        self._factory = factory
        self._host, self._port = host, port
        self._option = option
        self.cap = cap
        self._tls = tls
        self._handshake_seconds = handshake_seconds
        self._lifetime = lifetime_seconds
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._resume: asyncio.TimerHandle | None = None
        self.open = 0
        self.refused = 0
        self._unreported = 0
        self._starved = 0
        self._reported_at = -REPORT_SECONDS
        self._later: asyncio.TimerHandle | None = None
        self.port = port

    def start(self) -> int:
        """Bind, listen and accept; the bound port."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self._host, self._port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise PortTaken(
                f"cannot listen on {format_address(self._host, self._port)} ({self._option}): "
                f"{exc.strerror}"
            ) from None
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._accept)
        return self.port

    async def stop(self) -> None:
        """Accept no more; connections still in their TLS handshake are dropped (the
        served ones are the aiohttp server's to close)."""
        sock, self._sock = self._sock, None
        if self._resume is not None:
            self._resume.cancel()
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in list(self._starting):
            task.cancel()
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)

    def _released(self) -> None:
        self.open -= 1

    def _accept(self) -> None:
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            return
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._starved += 1
                    self._report()
                    loop.remove_reader(sock.fileno())
                    self._resume = loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume_accepting)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                log.warning("%s: accept failed: %s", self._option, exc)
                return
            if self.open >= self.cap:
                conn.close()  # over the cap: closed at once, not served nor queued
                self.refused += 1
                self._unreported += 1
                self._report()
                continue
            self.open += 1
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn, _Slot(self)))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _serve(self, conn: socket.socket, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        lifetime = self._lifetime
        try:
            if self._tls is None:
                await loop.connect_accepted_socket(
                    lambda: _Counted(self._factory(), slot, lifetime), conn
                )
            else:
                await loop.connect_accepted_socket(
                    lambda: _Counted(self._factory(), slot, lifetime),
                    conn,
                    ssl=self._tls,
                    ssl_handshake_timeout=self._handshake_seconds,
                )
        except (TimeoutError, OSError, asyncio.CancelledError) as exc:
            conn.close()
            slot.release()
            log.debug("%s: a connection ended before it was served: %s", self._option, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _report(self) -> None:
        """Tell what was refused: at once if nothing was told within REPORT_SECONDS, else
        at the end of that time (one line for all of it)."""
        now = time.monotonic()
        wait = self._reported_at + REPORT_SECONDS - now
        if wait > 0:
            if self._later is None and self._loop is not None:
                self._later = self._loop.call_later(wait, self._report_later)
            return
        self._reported_at = now
        if self._starved:
            log.warning(
                "%s: out of file descriptors, accepting paused %d time(s) "
                "(raise LimitNOFILE= or lower the listeners' caps)",
                self._option,
                self._starved,
            )
            self._starved = 0
        if self._unreported:
            log.warning(
                "%s: refused %d connection(s) past the cap of %d at once (%d open now)",
                self._option,
                self._unreported,
                self.cap,
                self.open,
            )
            self._unreported = 0

    def _report_later(self) -> None:
        self._later = None
        self._report()
