"""The console's TLS: the server's own certificate (the one the gRPC listeners serve),
picked up again at the first handshake after it changes, as the gRPC listeners do.

Python's ssl module loads a key only from a file: the key goes through an anonymous
in-memory file (memfd) that is never on disk and is closed at once.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable

from keyplane.server.domain.hierarchy import TlsMaterial

log = logging.getLogger(__name__)


def _context(material: TlsMaterial) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    fd = os.memfd_create("keyplane-console-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, material.private_key_pem + b"\n" + material.certificate_chain_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


class ConsoleTls:
    """An SSL context whose certificate follows the hierarchy's: each handshake asks
    whether the TLS version changed and, if so, swaps in a fresh context."""

    def __init__(
        self, material: Callable[[], TlsMaterial], version: Callable[[], tuple[str, ...]]
    ) -> None:
        self._material = material
        self._version = version
        first = material()
        self._served = first.version
        self._current = _context(first)
        self.context = _context(first)
        self.context.sni_callback = self._each_handshake

    def _each_handshake(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        try:
            version = self._version()
            if version != self._served:
                material = self._material()
                self._current = _context(material)
                self._served = material.version
        except Exception:
            log.exception(
                "could not refresh the console's TLS certificate; keeping the current one"
            )
        sock.context = self._current
