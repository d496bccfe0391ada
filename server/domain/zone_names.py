"""What a zone server may be called and where it may listen: its name is a host name
(its TLS certificate names it) and never one of the server's; its listeners are
HOST:PORT at an address clients can reach. INVALID_ARGUMENT, saying what to fix,
otherwise."""

from __future__ import annotations

import ipaddress

from keyplane.server.domain.csr_policy import HOSTNAME
from keyplane.server.errors import InvalidArgument

MAX_ADDRESS_BYTES = 255


def parse_zone_name(name: str, server_names: list[str]) -> str:
    """A zone's name: a host name (its TLS certificate names it), never a server's."""
    if not name or len(name) > 63 or not HOSTNAME.fullmatch(name):
        raise InvalidArgument(
            "a zone server's name is a host name: 1-63 letters, digits, '-' and '.' "
            "(its TLS certificate is for that name)"
        )
    taken = {n.lower() for n in server_names} | {n.split(".")[0].lower() for n in server_names}
    if name.lower() in taken:
        raise InvalidArgument(
            f"{name!r} is one of the server's own names; a zone server needs a name of its own"
        )
    return name


def parse_listen(label: str, address: str, server_names: list[str]) -> tuple[str, int]:
    """HOST:PORT for a zone's listener: a host name or an IP address, at most 255 bytes,
    no wildcard, not one of the server's real names; INVALID_ARGUMENT otherwise."""
    if len(address.encode("utf-8", "replace")) > MAX_ADDRESS_BYTES:
        raise InvalidArgument(f"{label} is longer than {MAX_ADDRESS_BYTES} bytes")
    if not address.isascii() or not address.isprintable():
        raise InvalidArgument(f"{label} must be printable ASCII HOST:PORT")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"{label} must be HOST:PORT (port 1-65535), not {address!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or "*" in host or not HOSTNAME.fullmatch(host):
            raise InvalidArgument(
                f"{label}'s host must be a host name or an IP address (no wildcard), not {host!r}"
            ) from None
        if host.lower() in {n.lower() for n in server_names}:
            raise InvalidArgument(
                f"{label} names {host!r}, one of the server's own names; a zone server "
                "listens at an address of its own"
            ) from None
        return host, int(port)
    if ip.version == 6 and not bracketed:
        raise InvalidArgument(f"{label}: write an IPv6 address in brackets, [{host}]:{port}")
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidArgument(
            f"{label} is {host}, which no client can connect to; give the address clients use"
        )
    return str(ip), int(port)
