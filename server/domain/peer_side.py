"""What both sides of a trust between servers share (active/active): how to reach a peer
(PeerAddress) and call it (PeerTransport, server/peer_transport.py), and PeerSide, the
helpers every step uses: this server's signers and roots, signed message bodies, the
request rows, the history (every step is also in the audit log, in the same
transaction), and telling a peer that a request or a trust ended."""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from keyplane.plugins.keys import KeyAlgorithm
from keyplane.server.domain import certs
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.domain.peer_messages import (
    REQUEST_ID,
    Signer,
    roots_pem,
    sign_message,
    trusted_certificate,
)
from keyplane.server.domain.peers import view_of
from keyplane.server.domain.roots import SERVER_ACTOR
from keyplane.server.errors import (
    InvalidArgument,
    KeyplaneError,
    NotFound,
)
from keyplane.server.store import LIVE_PEER_STATES, PeerRecord, Transaction
from keyplane.v1 import trust_service_pb2 as pb
from keyplane.v1 import trust_state_pb2

log = logging.getLogger(__name__)

MAX_REASON = 500


@dataclass(frozen=True)
class PeerAddress:
    """How to reach a peer's bootstrap listener: its fqdn (the name its TLS certificate
    carries), address, and the roots its chain ends at."""

    fqdn: str
    bootstrap_listen: str
    roots_pem: bytes


class PeerTransport(Protocol):
    """The calls this server makes to a peer (server/peer_transport.py). Each raises the
    domain error its status means: UNAVAILABLE and DEADLINE_EXCEEDED when the peer does
    not answer, and the peer's own refusal otherwise."""

    def discover(
        self, bootstrap_listen: str
    ) -> tuple[x509.Certificate, list[trust_state_pb2.SignedTrustState]]:
        """The root the peer's TLS chain ends at (not verified) and its latest trust state."""
        ...

    def offer(self, peer: PeerAddress, message: pb.SignedPeerMessage) -> pb.SignedPeerMessage: ...

    def reveal(self, peer: PeerAddress, message: pb.SignedPeerMessage) -> str: ...

    def decide(
        self, peer: PeerAddress, message: pb.SignedPeerMessage
    ) -> pb.SignedPeerMessage | None: ...

    def end(self, peer: PeerAddress, message: pb.SignedPeerMessage) -> None: ...

    def trust_states(
        self, peer: PeerAddress, since: int
    ) -> list[trust_state_pb2.SignedTrustState]: ...

    def push(
        self, peer: PeerAddress, sender_fqdn: str, versions: list[trust_state_pb2.SignedTrustState]
    ) -> int: ...


def listen_address(text: str, what: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"{what} must be HOST:PORT (port 1-65535), not {text!r}")
    if len(text) > 255 or not text.isascii() or not text.isprintable():
        raise InvalidArgument(f"{what} must be printable ASCII HOST:PORT, at most 255 bytes")
    return text.strip()


def reason_text(text: str, default: str) -> str:
    text = (text or default).strip()
    if len(text) > MAX_REASON or not text.isprintable():
        raise InvalidArgument(f"a reason is printable text of at most {MAX_REASON} characters")
    return text


class PeerSide:
    """This server's side of trust with peers: the state and helpers every step shares."""

    def __init__(
        self,
        hierarchy: Hierarchy,
        transport: PeerTransport,
        endpoints: Callable[[], tuple[str, str]],
    ) -> None:
        self.h = hierarchy
        self.store = hierarchy.store
        self.transport = transport
        self.endpoints = endpoints
        self.fqdn = hierarchy.config.fqdn
        # Changes of one request never interleave in this process; across workers the
        # state DB's unique index on a live peer does the same.
        self._lock = threading.RLock()

    # -- helpers -------------------------------------------------------------------------

    def _now(self) -> datetime.datetime:
        return self.h.clock.now()

    def _signers(self) -> list[Signer]:
        return [
            Signer(r.fingerprint, self.h.backends.private_key(r.key_uri), KeyAlgorithm(r.algorithm))
            for r in self.h.active_roots()
        ]

    def _own_roots(self) -> dict[str, x509.Certificate]:
        return {
            r.fingerprint: certs.load_pem(r.certificate_pem or "") for r in self.h.active_roots()
        }

    def _body(
        self, kind: pb.PeerMessageKind, request_id: str, recipient: str
    ) -> pb.PeerMessageBody:
        body = pb.PeerMessageBody(
            kind=kind, request_id=request_id, sender_fqdn=self.fqdn, recipient_fqdn=recipient
        )
        body.send_time.FromDatetime(self._now())
        return body

    def _with_own_roots(self, body: pb.PeerMessageBody) -> pb.PeerMessageBody:
        for record in self.h.active_roots():
            body.roots.append(
                trusted_certificate(certs.load_pem(record.certificate_pem or ""), record.name)
            )
        listen, bootstrap = self.endpoints()
        body.listen, body.bootstrap_listen = listen, bootstrap
        return body

    def _sign(self, body: pb.PeerMessageBody) -> pb.SignedPeerMessage:
        return sign_message(body, self._signers())

    @staticmethod
    def peer_roots(record: PeerRecord) -> dict[str, x509.Certificate]:
        """The roots this server holds for the peer now: its last accepted trust state's,
        else the ones the exchange gave."""
        view = view_of(record)
        return view.roots

    def _address_of(self, record: PeerRecord) -> PeerAddress:
        return PeerAddress(
            record.fqdn, record.bootstrap_listen, roots_pem(self.peer_roots(record)).encode()
        )

    def _row(self, request_id: str) -> PeerRecord:
        wanted = request_id.strip().lower()
        if not REQUEST_ID.fullmatch(wanted):
            raise InvalidArgument(
                "a trust request id is 32 hex digits ('keyplane trust list' shows them), "
                f"not {request_id[:64]!r}"
            )
        found = self.store.reads.peers.trust_peer(wanted)
        if found is None:
            raise NotFound(f"no trust request has id {request_id!r} ('keyplane trust list')")
        return found

    def _live(self, fqdn: str) -> PeerRecord | None:
        return next(
            (r for r in self.store.reads.peers.trust_peers(LIVE_PEER_STATES) if r.fqdn == fqdn),
            None,
        )

    def _known_revoked_roots(self) -> set[str]:
        """Every root a peer's trust state said was revoked, as far as this server saw."""
        revoked: set[str] = set()
        for record in self.store.reads.peers.trust_peers():
            view = view_of(record)
            if view.state is not None:
                revoked.update(view.state.body.revoked_root_fingerprints)
        return revoked

    def _history(
        self,
        tx: Transaction,
        record: PeerRecord,
        event: str,
        actor: str,
        fingerprints: list[str] | tuple[str, ...],
        detail: str = "",
    ) -> None:
        tx.peers.add_history(record.id, record.fqdn, event, actor, fingerprints, detail)
        action = f"trust.{event.replace('-', '_')}"
        if detail:
            tx.audit(
                actor,
                action,
                record.fqdn,
                request_id=record.id,
                fingerprints=list(fingerprints),
                detail=detail,
            )
        else:
            tx.audit(
                actor, action, record.fqdn, request_id=record.id, fingerprints=list(fingerprints)
            )

    def _publish(self, tx: Transaction) -> None:
        self.h.trust.publish_in(tx, SERVER_ACTOR)

    def _refuse_self(self, fqdn: str, roots: dict[str, x509.Certificate]) -> None:
        if fqdn == self.fqdn or set(roots) & set(self._own_roots()):
            raise InvalidArgument(
                "that is this server itself; give the peer's bootstrap listener and its "
                "root fingerprint"
            )

    def _tell_end(self, record: PeerRecord, reason: str, rejected: bool = False) -> bool:
        """Tell the peer that this request or trust ended; whether it heard."""
        address = self._address_of(record)
        if rejected:
            body = self._body(pb.PEER_MESSAGE_KIND_DECISION, record.id, record.fqdn)
            body.approved = False
        else:
            body = self._body(pb.PEER_MESSAGE_KIND_END, record.id, record.fqdn)
        body.reason = reason
        try:
            if rejected:
                self.transport.decide(address, self._sign(body))
            else:
                self.transport.end(address, self._sign(body))
        except KeyplaneError as exc:
            log.warning("could not tell %s yet (%s); will try again", record.fqdn, exc)
            return False
        return True
