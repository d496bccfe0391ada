"""One server per port: the ports a `keyplane serve` or `keyplane zone serve` claims
before it opens its data dir.

The listeners use SO_REUSEPORT so that the workers of one server (`--workers N`) share
their ports, and a restarted worker rejoins them; but the kernel lets any process of the
same user join that way, and clients would then get answers from two hierarchies at
random. So the process that owns the ports (the server itself, or the supervisor of its
workers) claims each one, for its whole life, before anything else:

1. It binds a Linux abstract Unix socket named after the address
   (`\\0keyplane-port:127.0.0.1:7443`). Only one socket can have a name, and the kernel
   frees it when the process dies (even by SIGKILL): a second keyplane finds it taken.
2. It binds a probe socket to the port itself, with SO_REUSEADDR (so connections of an
   earlier run still in TIME_WAIT do not count) but without SO_REUSEPORT: any listener
   on the port, keyplane's or another program's, makes that fail. The probe stays
   bound, never listening, so that the kernel hands the port to no one else; the
   listeners bind beside it.

Workers claim nothing: they bind beside their supervisor's claim. Port 0 is resolved
here, by the probe, to a port the kernel chose. Limits: a claim names the address as
written, so two keyplanes on one port under two spellings (`0.0.0.0` and `127.0.0.1`)
are kept apart by the probe alone, which leaves them a start race; and abstract names
are per network namespace.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from keyplane.server.config import format_address
from keyplane.server.errors import ConfigError, PortTaken

CLAIM_PREFIX = "\0keyplane-port:"


@dataclass(frozen=True)
class Listener:
    """One address to listen on, and the option that set it (for messages)."""

    option: str
    host: str
    port: int


@dataclass
class PortClaims:
    """The claimed addresses (ports resolved), held until closed or the process dies."""

    addresses: list[str] = field(default_factory=list)
    _sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def __enter__(self) -> PortClaims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _claim_name(host: str, port: int) -> str:
    return CLAIM_PREFIX + format_address(host, port)


def _take_claim(listener: Listener, port: int) -> socket.socket:
    address = format_address(listener.host, port)
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(_claim_name(listener.host, port))
    except OSError as exc:
        claim.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortTaken(
            f"port {address} ({listener.option}) is held by another keyplane server on this "
            f"machine; stop it, or give this one another {listener.option}"
        ) from None
    return claim


def _probe(listener: Listener) -> socket.socket:
    address = format_address(listener.host, listener.port)
    probe = socket.socket(_family(listener.host), socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((listener.host, listener.port))
    except OSError as exc:
        probe.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortTaken(
                f"port {address} ({listener.option}) is in use by another process; stop "
                f"it, or give this server another {listener.option}"
            ) from None
        raise ConfigError(
            f"cannot listen on {address} ({listener.option}): {exc.strerror}"
        ) from None
    return probe


def claim_ports(listeners: Sequence[Listener]) -> PortClaims:
    """Claim every listener's port (resolving port 0), or raise PortTaken naming the
    first one held by another process; on failure nothing stays claimed."""
    explicit = [(listener.host, listener.port) for listener in listeners if listener.port]
    if len(set(explicit)) != len(explicit):
        options = " and ".join(listener.option for listener in listeners)
        raise ConfigError(f"{options} must be different addresses")
    claims = PortClaims()
    try:
        for listener in listeners:
            if listener.port:
                # Claimed first, so that another keyplane is named as such.
                claims._sockets.append(_take_claim(listener, listener.port))
                claims._sockets.append(_probe(listener))
                port = listener.port
            else:
                probe = _probe(listener)
                claims._sockets.append(probe)
                port = int(probe.getsockname()[1])
                claims._sockets.append(_take_claim(listener, port))
            claims.addresses.append(format_address(listener.host, port))
    except BaseException:
        claims.close()
        raise
    return claims


def add_listener(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials, option: str
) -> int:
    """Add a TLS listener to `server`; PortTaken, not grpc's RuntimeError, if it cannot
    bind (another process took the port after it was claimed)."""
    try:
        return int(server.add_secure_port(address, credentials))
    except RuntimeError:
        raise PortTaken(
            f"cannot listen on {address} ({option}): the port is in use by another process"
        ) from None
