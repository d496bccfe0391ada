"""Trust exchange between two keyplane servers (active/active), step by step.

    A (requester)                                   B (receiver)
    trust request --peer B --peer-fingerprint FP
      fetch B's trust state: signed by FP, TLS chain ends at one of its roots
      OFFER  (A's roots, addresses, commit(Na)) --->  recorded: awaiting-nonce
             <--- RECEIPT (Nb, B's roots, addresses)
      REVEAL (Na)                              --->  commitment checked: pending
      recorded: pending, code(Na, Nb, fps)           code(Na, Nb, fps)
                            both admins compare the code and the fingerprints
                                                    trust approve ID
             <--- DECISION (approved)
      trusted here; ACK                        --->  trusted here
    trust revoke PEER (either side): ended here at once; END told to the peer

Every message is signed by its sender's active roots (peer_messages). A's request is
A's approval (its admin pinned FP); B's approval starts trust on both sides, A first:
B commits only once A's signed ACK says A has. A peer that does not answer (request,
approval) leaves this side as it was. Trust, once set up, is kept current by the peer
link: each side follows the other's trust state (peer_states) and republishes its own
with the peer's section. Every step is in the history and the audit log, in the same
transaction as the change it records.
"""

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
from keyplane.server.domain.inputs import parse_fingerprint
from keyplane.server.domain.peer_messages import (
    Signer,
    check_addressed,
    commitment,
    commitment_matches,
    comparison_code,
    load_roots_pem,
    new_nonce,
    new_request_id,
    parse_message,
    roots_of,
    roots_pem,
    sign_message,
    trusted_certificate,
    verify_signed,
)
from keyplane.server.domain.peer_states import Followed, PeerState, accept_one, follow_peer
from keyplane.server.domain.peers import PeerView, view_of
from keyplane.server.domain.roots import SERVER_ACTOR
from keyplane.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KeyplaneError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from keyplane.server.store import LIVE_PEER_STATES, PeerRecord, Transaction, TrustEventRecord
from keyplane.v1 import trust_service_pb2 as pb
from keyplane.v1 import trust_state_pb2

log = logging.getLogger(__name__)

HISTORY_DEFAULT = 100
HISTORY_MAX = 10_000
MAX_REASON = 500
# Offers are public: at most this many requests from peers are under way at once (made
# within the last REQUEST_LIFETIME; an older one that never got a nonce no longer counts).
MAX_INCOMING = 20
REQUEST_LIFETIME = datetime.timedelta(hours=1)
# Updates are public too: of the refusals of one peer's updates, the history keeps each
# reason once per REFUSAL_EVERY, and at most MAX_REFUSALS in that time.
REFUSAL_EVERY = datetime.timedelta(minutes=1)
MAX_REFUSALS = 10


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


@dataclass(frozen=True)
class Listing:
    """What ListTrust shows."""

    requests: list[PeerRecord]
    peers: list[PeerView]
    history: list[TrustEventRecord]


def _address(text: str, what: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"{what} must be HOST:PORT (port 1-65535), not {text!r}")
    if len(text) > 255 or not text.isascii() or not text.isprintable():
        raise InvalidArgument(f"{what} must be printable ASCII HOST:PORT, at most 255 bytes")
    return text.strip()


def _reason(text: str, default: str) -> str:
    text = (text or default).strip()
    if len(text) > MAX_REASON or not text.isprintable():
        raise InvalidArgument(f"a reason is printable text of at most {MAX_REASON} characters")
    return text


class TrustExchange:
    """This server's side of trust with peers."""

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
        found = self.store.reads.peers.trust_peer(request_id.strip().lower())
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
        tx.audit(
            actor,
            f"trust.{event.replace('-', '_')}",
            record.fqdn,
            request_id=record.id,
            fingerprints=list(fingerprints),
            **({"detail": detail} if detail else {}),
        )

    def _publish(self, tx: Transaction) -> None:
        self.h.trust.publish_in(tx, SERVER_ACTOR)

    def _refuse_self(self, fqdn: str, roots: dict[str, x509.Certificate]) -> None:
        if fqdn == self.fqdn or set(roots) & set(self._own_roots()):
            raise InvalidArgument(
                "that is this server itself; give the peer's bootstrap listener and its "
                "root fingerprint"
            )

    # -- A: requesting -------------------------------------------------------------------

    def _discover(self, bootstrap: str, fingerprint: str) -> tuple[PeerAddress, PeerState]:
        """The peer at `bootstrap`, if the root with `fingerprint` vouches for it: its
        latest trust state is signed by that root, and its TLS chain ends at one of
        that state's roots. PERMISSION_DENIED otherwise."""
        served_root, versions = self.transport.discover(bootstrap)
        if not versions:
            raise PermissionDenied(f"the server at {bootstrap} sent no trust state")
        latest = versions[-1]
        try:
            body = trust_state_pb2.TrustStateBody.FromString(latest.body)
        except Exception:  # protobuf's DecodeError
            raise PermissionDenied(f"the server at {bootstrap} sent a broken trust state") from None
        pinned = {
            r.fingerprint: x509.load_der_x509_certificate(r.certificate_der)
            for r in body.roots
            if r.fingerprint == fingerprint
        }
        if not pinned:
            raise PermissionDenied(
                f"fingerprint mismatch: none of the active roots of the server at {bootstrap} "
                f"({', '.join(r.fingerprint for r in body.roots)}) has the fingerprint "
                f"{fingerprint}; nothing was recorded"
            )
        state = accept_one(latest, body.server_fqdn, pinned, 0)
        if certs.key_fingerprint(served_root) not in state.roots:
            raise PermissionDenied(
                f"fingerprint mismatch: the server at {bootstrap} serves a TLS chain that does "
                f"not end at one of the roots its trust state lists; nothing was recorded"
            )
        self._refuse_self(body.server_fqdn, state.roots)
        address = PeerAddress(body.server_fqdn, bootstrap, roots_pem(state.roots).encode())
        return address, state

    def request(self, actor: str, peer: str, fingerprint_text: str) -> PeerRecord:
        bootstrap = _address(peer, "--peer")
        fingerprint = parse_fingerprint(fingerprint_text)
        with self._lock:
            address, state = self._discover(bootstrap, fingerprint)
            live = self._live(address.fqdn)
            if live is not None and live.state == "trusted":
                raise AlreadyExists(
                    f"{address.fqdn} is trusted already (request {live.id}); to start again, "
                    f"revoke it first ('keyplane trust revoke {address.fqdn}')"
                )
            if live is not None and live.direction == "incoming":
                raise FailedPrecondition(
                    f"{address.fqdn} has asked this server for trust already (request "
                    f"{live.id}): compare the code and approve or reject it here"
                )
            if live is not None:
                return self._send_again(live, address)
            return self._request_new(actor, address, state, fingerprint)

    def _exchange(
        self,
        address: PeerAddress,
        offer: pb.SignedPeerMessage,
        request_id: str,
        nonce: bytes,
        peer_roots: dict[str, x509.Certificate],
    ) -> tuple[pb.PeerMessageBody, str]:
        """Send the offer, check the receipt, reveal the nonce: (receipt, code)."""
        signed_receipt = self.transport.offer(address, offer)
        receipt = parse_message(signed_receipt, pb.PEER_MESSAGE_KIND_RECEIPT)
        check_addressed(receipt, self.fqdn, self._now())
        verify_signed(signed_receipt, peer_roots)
        if receipt.request_id != request_id or receipt.sender_fqdn != address.fqdn:
            raise PermissionDenied(f"{address.fqdn} answered for another request")
        if len(receipt.nonce) != 32:
            raise PermissionDenied(f"{address.fqdn} sent no valid nonce")
        _address(receipt.listen, "the receipt's listen")
        reveal = self._body(pb.PEER_MESSAGE_KIND_REVEAL, request_id, address.fqdn)
        reveal.nonce = nonce
        their_code = self.transport.reveal(address, self._sign(reveal))
        fingerprints = [*self._own_roots(), *roots_of(receipt)]
        code = comparison_code(nonce, receipt.nonce, fingerprints)
        if their_code != code:
            raise PermissionDenied(
                f"{address.fqdn} computed another comparison code; the request is not recorded"
            )
        return receipt, code

    def _request_new(
        self, actor: str, address: PeerAddress, state: PeerState, fingerprint: str
    ) -> PeerRecord:
        request_id, nonce = new_request_id(), new_nonce()
        own = list(self._own_roots())
        body = self._with_own_roots(
            self._body(pb.PEER_MESSAGE_KIND_OFFER, request_id, address.fqdn)
        )
        body.commitment = commitment(nonce, own)
        body.recipient_root_fingerprint = fingerprint
        offer = self._sign(body)
        receipt, code = self._exchange(address, offer, request_id, nonce, state.roots)
        now = self._now()
        record = PeerRecord(
            id=request_id,
            direction="outgoing",
            state="pending",
            fqdn=address.fqdn,
            listen=receipt.listen,
            bootstrap_listen=address.bootstrap_listen,
            peer_roots_pem=roots_pem(state.roots),
            own_fingerprints=tuple(own),
            commitment=body.commitment,
            own_nonce=nonce,
            peer_nonce=receipt.nonce,
            offer=offer.SerializeToString(),
            comparison_code=code,
            peer_state=state.signed,
            peer_version=state.version,
            peer_updated_at=now,
            created_at=now,
            updated_at=now,
            trusted_at=None,
        )
        with self.store.transaction(now) as tx:
            if any(r.fqdn == address.fqdn for r in tx.reads.peers.trust_peers(LIVE_PEER_STATES)):
                raise FailedPrecondition(f"a request with {address.fqdn} was made meanwhile")
            tx.peers.insert_peer(record)
            self._history(tx, record, "requested", actor, [*state.roots, *own], f"code {code}")
        log.info("asked %s for trust (request %s, code %s)", address.fqdn, request_id, code)
        return record

    def _send_again(self, record: PeerRecord, address: PeerAddress) -> PeerRecord:
        """The same request, sent again (the peer answers it as before, or records it
        again if it lost it)."""
        if record.offer is None or record.own_nonce is None:
            raise FailedPrecondition(f"request {record.id} cannot be sent again")
        offer = pb.SignedPeerMessage.FromString(record.offer)
        self._exchange(
            address, offer, record.id, record.own_nonce, load_roots_pem(record.peer_roots_pem)
        )
        return record

    # -- B: receiving --------------------------------------------------------------------

    def receive_offer(self, signed: pb.SignedPeerMessage) -> pb.SignedPeerMessage:
        body = parse_message(signed, pb.PEER_MESSAGE_KIND_OFFER)
        check_addressed(body, self.fqdn, self._now())
        roots = roots_of(body)
        verify_signed(signed, roots, require_all=True)
        _address(body.listen, "the offer's listen")
        _address(body.bootstrap_listen, "the offer's bootstrap_listen")
        if len(body.commitment) != 32:
            raise InvalidArgument("an offer carries a 32-byte commitment")
        if body.recipient_root_fingerprint not in self._own_roots():
            raise PermissionDenied(
                "the requester pinned a root fingerprint that is none of this server's "
                "active roots; it is refused"
            )
        self._refuse_self(body.sender_fqdn, roots)
        revoked = sorted(set(roots) & self._known_revoked_roots())
        if revoked:
            raise PermissionDenied(
                f"root {revoked[0]} of {body.sender_fqdn} was revoked by its server; a request "
                "signed by it is refused"
            )
        data = signed.SerializeToString()
        with self._lock:
            existing = self.store.reads.peers.trust_peer(body.request_id)
            if existing is not None:
                if existing.offer == data and existing.state in ("awaiting-nonce", "pending"):
                    return self._receipt(existing)  # the same offer again: the same answer
                raise FailedPrecondition(
                    f"request {body.request_id} was {existing.state} already; a replayed "
                    "request is refused"
                )
            live = self._live(body.sender_fqdn)
            if live is not None and live.direction == "incoming" and live.state != "trusted":
                if not set(load_roots_pem(live.peer_roots_pem)) & set(roots):
                    # Only the same server (one of the same roots) may replace its request.
                    raise FailedPrecondition(
                        f"a request from {body.sender_fqdn} with other roots is under way "
                        f"(request {live.id}); its admin may send it again, or this server's "
                        "admin may reject it first"
                    )
            under_way = [
                r
                for r in self.store.reads.peers.trust_peers(("awaiting-nonce", "pending"))
                if r.direction == "incoming"
                and (r.state == "pending" or self._now() - r.created_at < REQUEST_LIFETIME)
                and (live is None or r.id != live.id)
            ]
            if len(under_way) >= MAX_INCOMING:
                raise ResourceExhausted(
                    f"{len(under_way)} requests from peers are under way already; reject some "
                    "('keyplane trust list', 'keyplane trust reject ID') before more can come"
                )
            if live is not None and live.state == "trusted":
                raise AlreadyExists(
                    f"{body.sender_fqdn} is trusted already; revoke the trust on both sides "
                    "before asking again"
                )
            if live is not None and live.direction == "outgoing":
                raise FailedPrecondition(
                    f"this server has asked {body.sender_fqdn} for trust already (request "
                    f"{live.id}); approve that one there, or reject it here first"
                )
            now = self._now()
            record = PeerRecord(
                id=body.request_id,
                direction="incoming",
                state="awaiting-nonce",
                fqdn=body.sender_fqdn,
                listen=body.listen,
                bootstrap_listen=body.bootstrap_listen,
                peer_roots_pem=roots_pem(roots),
                own_fingerprints=tuple(self._own_roots()),
                commitment=body.commitment,
                own_nonce=new_nonce(),
                peer_nonce=None,
                offer=data,
                comparison_code=None,
                peer_state=None,
                peer_version=0,
                peer_updated_at=None,
                created_at=now,
                updated_at=now,
                trusted_at=None,
            )
            actor = f"peer server {body.sender_fqdn}"
            with self.store.transaction(now) as tx:
                if live is not None:  # the same peer asked again: this one replaces it
                    tx.peers.update_peer(live.id, state="superseded")
                    self._history(tx, live, "superseded", actor, list(roots), record.id)
                tx.peers.insert_peer(record)
                self._history(tx, record, "received", actor, list(roots))
            return self._receipt(record)

    def _receipt(self, record: PeerRecord) -> pb.SignedPeerMessage:
        body = self._with_own_roots(
            self._body(pb.PEER_MESSAGE_KIND_RECEIPT, record.id, record.fqdn)
        )
        body.nonce = record.own_nonce or b""
        return self._sign(body)

    def receive_reveal(self, signed: pb.SignedPeerMessage) -> str:
        body = parse_message(signed, pb.PEER_MESSAGE_KIND_REVEAL)
        check_addressed(body, self.fqdn, self._now())
        with self._lock:
            record = self.store.reads.peers.trust_peer(body.request_id)
            if record is None or record.direction != "incoming":
                raise NotFound(f"no request {body.request_id} from {body.sender_fqdn}")
            roots = load_roots_pem(record.peer_roots_pem)
            verify_signed(signed, roots)
            if record.state == "pending" and record.peer_nonce == body.nonce:
                return record.comparison_code or ""
            if record.state != "awaiting-nonce":
                raise FailedPrecondition(f"request {record.id} is {record.state} already")
            if not commitment_matches(record.commitment or b"", body.nonce, roots):
                raise PermissionDenied(
                    "the nonce does not match the offer's commitment; the request is refused"
                )
            code = comparison_code(
                body.nonce, record.own_nonce or b"", [*roots, *record.own_fingerprints]
            )
            with self.store.transaction(self._now()) as tx:
                tx.peers.update_peer(
                    record.id, state="pending", peer_nonce=body.nonce, comparison_code=code
                )
            return code

    # -- B: deciding ---------------------------------------------------------------------

    def _decidable(self, request_id: str) -> PeerRecord:
        record = self._row(request_id)
        if record.state == "awaiting-nonce":
            raise FailedPrecondition(
                f"request {record.id} from {record.fqdn} has no comparison code yet (its "
                "nonce was not revealed): ask its admin to run 'keyplane trust request' again"
            )
        if record.state != "pending":
            raise FailedPrecondition(f"request {record.id} is {record.state} already")
        return record

    def approve(self, actor: str, request_id: str) -> PeerView:
        with self._lock:
            record = self._decidable(request_id)
            if record.direction == "outgoing":
                raise FailedPrecondition(
                    f"this server made request {record.id}: the request is its approval; "
                    f"{record.fqdn}'s admin approves it there"
                )
            roots = load_roots_pem(record.peer_roots_pem)
            address = PeerAddress(record.fqdn, record.bootstrap_listen, roots_pem(roots).encode())
            decision = self._body(pb.PEER_MESSAGE_KIND_DECISION, record.id, record.fqdn)
            decision.approved = True
            signed_ack = self.transport.decide(address, self._sign(decision))
            if signed_ack is None:
                raise PermissionDenied(f"{record.fqdn} did not acknowledge the approval")
            ack = parse_message(signed_ack, pb.PEER_MESSAGE_KIND_ACK)
            check_addressed(ack, self.fqdn, self._now())
            verify_signed(signed_ack, roots)
            if ack.request_id != record.id or ack.sender_fqdn != record.fqdn:
                raise PermissionDenied(f"{record.fqdn} acknowledged another request")
            state = self._first_state(record, address, roots)
            now = self._now()
            with self.store.transaction(now) as tx:
                tx.peers.update_peer(
                    record.id,
                    state="trusted",
                    trusted_at=now,
                    peer_state=state.signed if state else None,
                    peer_version=state.version if state else 0,
                    peer_updated_at=now if state else None,
                )
                self._history(
                    tx, record, "approved", actor, [*roots, *record.own_fingerprints],
                    f"code {record.comparison_code}",
                )  # fmt: skip
                self._publish(tx)
        log.info("trust with %s approved (request %s)", record.fqdn, record.id)
        return view_of(self._row(record.id))

    def _first_state(
        self, record: PeerRecord, address: PeerAddress, roots: dict[str, x509.Certificate]
    ) -> PeerState | None:
        """The peer's trust state when trust begins (the peer link fetches it later if
        this fails)."""
        try:
            followed = follow_peer(
                record.fqdn, None, roots, self.transport.trust_states(address, 0)
            )
        except KeyplaneError as exc:
            log.warning("could not fetch %s's trust state yet (%s)", record.fqdn, exc)
            return None
        return followed.state

    def reject(self, actor: str, request_id: str, reason: str) -> tuple[PeerRecord, bool]:
        reason = _reason(reason, "rejected by an admin")
        with self._lock:
            record = self._row(request_id)
            if record.state not in ("awaiting-nonce", "pending"):
                raise FailedPrecondition(f"request {record.id} is {record.state} already")
            told = self._tell_end(record, reason, rejected=record.direction == "incoming")
            with self.store.transaction(self._now()) as tx:
                tx.peers.update_peer(
                    record.id, state="rejected", end_unsent=not told, end_reason=reason
                )
                self._history(
                    tx,
                    record,
                    "rejected",
                    actor,
                    list(load_roots_pem(record.peer_roots_pem)),
                    reason,
                )
        return self._row(record.id), told

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

    # -- A: the peer decided -------------------------------------------------------------

    def receive_decision(self, signed: pb.SignedPeerMessage) -> pb.SignedPeerMessage | None:
        body = parse_message(signed, pb.PEER_MESSAGE_KIND_DECISION)
        check_addressed(body, self.fqdn, self._now())
        with self._lock:
            record = self.store.reads.peers.trust_peer(body.request_id)
            if record is None or record.direction != "outgoing" or record.fqdn != body.sender_fqdn:
                raise NotFound(
                    f"this server made no request {body.request_id} to {body.sender_fqdn}"
                )
            roots = self.peer_roots(record)
            verify_signed(signed, roots)
            actor = f"peer server {record.fqdn}"
            if not body.approved:
                if record.state == "pending":
                    reason = _reason(body.reason, "rejected by the peer's admin")
                    with self.store.transaction(self._now()) as tx:
                        tx.peers.update_peer(record.id, state="rejected", end_reason=reason)
                        self._history(tx, record, "rejected", actor, list(roots), reason)
                return None
            if record.state == "pending":
                now = self._now()
                with self.store.transaction(now) as tx:
                    tx.peers.update_peer(record.id, state="trusted", trusted_at=now)
                    self._history(
                        tx, record, "approved", actor, [*roots, *record.own_fingerprints],
                        f"code {record.comparison_code}",
                    )  # fmt: skip
                    self._publish(tx)
                log.info("%s approved this server's request %s: trusted", record.fqdn, record.id)
            elif record.state != "trusted":
                raise FailedPrecondition(f"request {record.id} is {record.state} already")
            return self._sign(self._body(pb.PEER_MESSAGE_KIND_ACK, record.id, record.fqdn))

    # -- either side: ending -------------------------------------------------------------

    def _trusted(self, peer: str) -> PeerRecord:
        name = peer.strip()
        for record in self.store.reads.peers.trust_peers(("trusted",)):
            if name in (record.fqdn, record.id):
                return record
        raise NotFound(f"no trusted peer {name!r} ('keyplane trust list' shows them)")

    def revoke(self, actor: str, peer: str, reason: str) -> tuple[PeerRecord, bool]:
        """End the trust with a peer: its roots leave this server's bundle, trust state
        and admission in this transaction; then the peer is told (or, later, the link)."""
        reason = _reason(reason, "revoked by an admin")
        with self._lock:
            record = self._trusted(peer)
            roots = list(self.peer_roots(record))
            with self.store.transaction(self._now()) as tx:
                tx.peers.update_peer(record.id, state="revoked", end_unsent=True, end_reason=reason)
                self._history(tx, record, "revoked", actor, roots, reason)
                self._publish(tx)
            log.info("revoked the trust with %s: %s", record.fqdn, reason)
            told = self._tell_end(record, reason)
            if told:
                with self.store.transaction(self._now()) as tx:
                    tx.peers.update_peer(record.id, end_unsent=False)
        return self._row(record.id), told

    def receive_end(self, signed: pb.SignedPeerMessage) -> None:
        body = parse_message(signed, pb.PEER_MESSAGE_KIND_END)
        check_addressed(body, self.fqdn, self._now())
        with self._lock:
            record = self.store.reads.peers.trust_peer(body.request_id)
            if record is None or record.fqdn != body.sender_fqdn:
                raise NotFound(f"no request {body.request_id} with {body.sender_fqdn}")
            verify_signed(signed, self.peer_roots(record))
            if record.state not in LIVE_PEER_STATES:
                return  # ended here already
            reason = _reason(body.reason, "ended by the peer")
            ended = "revoked" if record.state == "trusted" else "rejected"
            actor = f"peer server {record.fqdn}"
            with self.store.transaction(self._now()) as tx:
                tx.peers.update_peer(record.id, state=ended, end_reason=reason)
                self._history(tx, record, ended, actor, list(self.peer_roots(record)), reason)
                if ended == "revoked":
                    self._publish(tx)
            log.info("%s ended request %s: %s", record.fqdn, record.id, reason)

    def deliver_ends(self) -> None:
        """Tell peers of the ends they did not hear of yet (the peer link calls this)."""
        for record in self.store.reads.peers.trust_peers(("rejected", "revoked")):
            if not record.end_unsent:
                continue
            rejected = record.state == "rejected" and record.direction == "incoming"
            if self._tell_end(record, record.end_reason or "", rejected=rejected):
                with self.store.transaction(self._now()) as tx:
                    tx.peers.update_peer(record.id, end_unsent=False)
                log.info("told %s that request %s ended", record.fqdn, record.id)

    # -- the peer link -------------------------------------------------------------------

    def held_version(self, fqdn: str) -> int:
        record = self._trusted_by_fqdn(fqdn)
        return record.peer_version

    def _trusted_by_fqdn(self, fqdn: str) -> PeerRecord:
        for record in self.store.reads.peers.trust_peers(("trusted",)):
            if record.fqdn == fqdn:
                return record
        raise FailedPrecondition(f"this server does not trust {fqdn!r}")

    def accept_update(
        self, fqdn: str, versions: list[trust_state_pb2.SignedTrustState], via: str
    ) -> int:
        """Follow a trusted peer's trust state from the version held, pinned to the
        approved roots; keep and publish what is accepted. A refusal is kept in the
        history (once in a row), the last good state stays, and the error is raised."""
        with self._lock:
            record = self._trusted_by_fqdn(fqdn)
            held = view_of(record).state
            # The version held, sent again (a push and a pull crossed): nothing to do. A
            # pull asked from the version held when it began, so what a push brought
            # meanwhile is not news from it either; a push of an older version is refused.
            versions = [
                v
                for v in versions
                if held is None
                or (v.SerializeToString() != held.signed and (via != "pull" or _newer(v, held)))
            ]
            if not versions:
                return record.peer_version
            approved = load_roots_pem(record.peer_roots_pem)
            followed: Followed = follow_peer(fqdn, held, approved, versions)
            now = self._now()
            with self.store.transaction(now) as tx:
                current = tx.reads.peers.trust_peer(record.id)
                if (
                    followed.state is not None
                    and current is not None
                    and current.peer_version >= followed.state.version
                ):
                    # Another worker (a push beside a pull) stored this or a newer one.
                    return current.peer_version
                if followed.state is not None:
                    tx.peers.update_peer(
                        record.id,
                        peer_state=followed.state.signed,
                        peer_version=followed.state.version,
                        peer_updated_at=now,
                    )
                    tx.audit(
                        f"peer server {fqdn}",
                        "trust.peer_update",
                        fqdn,
                        request_id=record.id,
                        version=followed.state.version,
                        roots=list(followed.state.roots),
                        via=via,
                    )
                    self._publish(tx)
                if followed.error is not None:
                    detail = f"{type(followed.error).__name__}: {followed.error}"
                    recent = tx.peers.recent_details(
                        record.id, "update-refused", now - REFUSAL_EVERY
                    )
                    if detail not in recent and len(recent) < MAX_REFUSALS:
                        actor = f"peer server {fqdn} ({via})"
                        fps = _root_fingerprints(versions[-1])
                        self._history(tx, record, "update-refused", actor, fps, detail)
            if followed.error is not None:
                if followed.state is None:
                    raise followed.error
                log.warning("%s: %s", fqdn, followed.error)
            return followed.state.version if followed.state else record.peer_version

    # -- reading -------------------------------------------------------------------------

    def listing(self, history_size: int = 0) -> Listing:
        size = history_size or HISTORY_DEFAULT
        if not 1 <= size <= HISTORY_MAX:
            raise InvalidArgument(f"history_size is 1 to {HISTORY_MAX}")
        rows = self.store.reads.peers.trust_peers(LIVE_PEER_STATES)
        return Listing(
            requests=[r for r in rows if r.state != "trusted"],
            peers=[view_of(r) for r in rows if r.state == "trusted"],
            history=self.store.reads.peers.trust_history(size),
        )

    def trusted_addresses(self) -> list[PeerAddress]:
        return [self._address_of(r) for r in self.store.reads.peers.trust_peers(("trusted",))]


def _newer(signed: trust_state_pb2.SignedTrustState, held: PeerState) -> bool:
    try:
        return trust_state_pb2.TrustStateBody.FromString(signed.body).version > held.version
    except Exception:  # protobuf's DecodeError: let the follower refuse it
        return True


def _root_fingerprints(signed: trust_state_pb2.SignedTrustState) -> list[str]:
    """The roots a (refused) version names, if it parses at all."""
    try:
        body = trust_state_pb2.TrustStateBody.FromString(signed.body)
    except Exception:  # protobuf's DecodeError
        return []
    return [r.fingerprint for r in body.roots]
