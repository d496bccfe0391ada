"""Failover (active/active): where an agent turns when its own server does not answer.

Its own server's trust state lists the peer servers it trusts (their listeners, roots,
intermediates and revocations), and its init bundle names them too. While its own
server does not answer (connection refused, UNAVAILABLE, DEADLINE_EXCEEDED), the agent
renews at a peer and follows the peer's trust state, verified from the peer's roots as
its own server published them (then across the peer's rotations, never back); it asks
its own server again every few seconds and goes back as soon as it answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyplane.clients import trust
from keyplane.clients.agent.files import write_atomic
from keyplane.clients.bundle import Bundle
from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.trust import TrustState, TrustStateError
from keyplane.v1 import bundle_service_pb2, trust_state_pb2

log = logging.getLogger("keyplane.agent")

PEER_TRUST_FILE = "peer-trust.bin"
# While on a peer: its trust state is asked for this often, and the agent's own server
# again after this long.
PEER_POLL_SECONDS = 1.0
FAILBACK_SECONDS = 5.0
# How long a call to its own server may take before the agent counts it down.
PROBE_TIMEOUT = 8.0
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def unreachable(error: KeyplaneClientError) -> bool:
    """Whether a failed call means the server did not answer (rather than refused)."""
    return error.code in UNREACHABLE


@dataclass(frozen=True)
class Peer:
    """A peer server of the agent's own server."""

    fqdn: str
    listen: str
    bootstrap_listen: str
    roots: dict[str, x509.Certificate]

    def endpoint(self) -> bundle_service_pb2.ServerEndpoint:
        return bundle_service_pb2.ServerEndpoint(
            name=self.fqdn, listen=self.listen, bootstrap_listen=self.bootstrap_listen, peer=True
        )

    def roots_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots.values())


def _certificates(entries: list[trust_state_pb2.TrustedCertificate]) -> dict[str, x509.Certificate]:
    return {e.fingerprint: x509.load_der_x509_certificate(e.certificate_der) for e in entries}


def peers_of(state: TrustState | None, bundle: Bundle) -> list[Peer]:
    """The peers of the agent's own server: as its trust state lists them, else as its
    bundle does (which lists every peer's roots together)."""
    if state is not None and state.body.peers:
        return [
            Peer(p.fqdn, p.listen, p.bootstrap_listen, _certificates(list(p.roots)))
            for p in state.body.peers
        ]
    if state is not None:
        return []  # its own server trusts no peer (any more)
    roots = _certificates(list(bundle.body.peer_roots))
    return [
        Peer(s.name, s.listen, s.bootstrap_listen, roots) for s in bundle.body.servers if s.peer
    ]


def peer_sections(state: TrustState | None) -> list[trust_state_pb2.PeerServer]:
    return list(state.body.peers) if state is not None else []


def revoked_by_peers(
    cert: x509.Certificate, serial: int | None, states: list[TrustState | None]
) -> str | None:
    """Why a trusted peer (as the given trust states say) counts `cert` revoked, if it does."""
    key = trust.key_fingerprint(cert)
    for state in states:
        if state is None:
            continue
        sections: list[tuple[str, list[str], list[str]]] = [
            (p.fqdn, list(p.revoked_serials), list(p.revoked_certificate_key_fingerprints))
            for p in state.body.peers
        ]
        for fqdn, serials, keys in sections:
            if serial is not None and serial in {_number(s) for s in serials}:
                return f"its server {fqdn} lists it as revoked"
            if key in keys:
                return f"its server {fqdn} lists its key as revoked"
    return None


def _number(serial: str) -> int | None:
    try:
        return int(serial, 16)
    except ValueError:
        return None


class PeerTrust:
    """The trust state of the peer an agent fails over to, kept in peer-trust.bin."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / PEER_TRUST_FILE
        self.state: TrustState | None = None
        try:
            self.state = trust.load(self.path.read_bytes())
        except FileNotFoundError:
            pass
        except Exception as exc:  # protobuf's DecodeError or TrustStateError
            log.warning("ignoring a damaged %s (%s)", PEER_TRUST_FILE, exc)

    def follow(self, client: KeyplaneClient, peer: Peer) -> TrustState:
        """Catch up with `peer`'s trust state: from the version held if it is this
        peer's, else from the peer's roots as the agent's own server published them."""
        held = (
            self.state
            if self.state is not None and self.state.body.server_fqdn == peer.fqdn
            else None
        )
        batch = client.get_trust_state(held.version if held is not None else 0)
        if not batch and held is not None:
            return held
        try:
            state = trust.follow(held, batch, list(peer.roots))
        except TrustStateError:
            if held is None:
                raise
            # Away too long (or the peer rotated past what is held): start again from the
            # roots the agent's own server says the peer has now.
            state = trust.follow(None, client.get_trust_state(0), list(peer.roots))
        if state.body.server_fqdn != peer.fqdn:
            raise TrustStateError(
                f"the peer {peer.fqdn} sent {state.body.server_fqdn}'s trust state"
            )
        write_atomic(self.path, state.serialize())
        self.state = state
        return state
