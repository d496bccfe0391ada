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
approval) leaves this side as it was. Trust, once set up, lives on in peer_trust: the
peer link keeps each side current with the other's trust state, and either may end
it. Every step is in the history and the audit log, in the same transaction as the
change it records.
"""

from __future__ import annotations

import datetime
import hmac
import logging
from dataclasses import dataclass

from cryptography import x509

from keyplane.server.domain import certs
from keyplane.server.domain.der import UNPARSED
from keyplane.server.domain.inputs import parse_fingerprint
from keyplane.server.domain.peer_messages import (
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
    verify_signed,
)
from keyplane.server.domain.peer_side import PeerAddress, listen_address, reason_text
from keyplane.server.domain.peer_states import PeerState, accept_one, follow_peer
from keyplane.server.domain.peer_trust import TrustedPeerSide
from keyplane.server.domain.peers import PeerView, view_of
from keyplane.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KeyplaneError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from keyplane.server.store import LIVE_PEER_STATES, PeerRecord, TrustEventRecord
from keyplane.v1 import trust_service_pb2 as pb
from keyplane.v1 import trust_state_pb2

log = logging.getLogger(__name__)

HISTORY_DEFAULT = 100
HISTORY_MAX = 10_000
# Offers are public: at most this many requests from peers are under way at once (made
# within the last REQUEST_LIFETIME; an older one that never got a nonce no longer counts).
MAX_INCOMING = 20
REQUEST_LIFETIME = datetime.timedelta(hours=1)
# A sender may replace its own request under way (a new offer under its name, signed by
# one of the same roots) once that request is this old; sooner, the offer is refused
# (RESOURCE_EXHAUSTED, counted in the metrics, not stored). The replaced request is
# deleted, and the new one's "received" says which it replaced: one trust_peers row per
# sender, and at most 1 + 60/10 history and audit rows per sender and hour.
REOFFER_AFTER = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Listing:
    """What ListTrust shows."""

    requests: list[PeerRecord]
    peers: list[PeerView]
    history: list[TrustEventRecord]


class TrustExchange(TrustedPeerSide):
    """Setting trust up with a peer, both ways (see the module docstring); what is set
    up lives on in TrustedPeerSide."""

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
        try:
            pinned = {
                r.fingerprint: x509.load_der_x509_certificate(r.certificate_der)
                for r in body.roots
                if r.fingerprint == fingerprint
            }
        except UNPARSED:
            raise PermissionDenied(
                f"the server at {bootstrap} sent a root certificate that does not parse; "
                "nothing was recorded"
            ) from None
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
        bootstrap = listen_address(peer, "--peer")
        fingerprint = parse_fingerprint(fingerprint_text)
        with self._lock:
            for row in self.store.reads.peers.trust_peers(("pending",)):
                if (
                    row.direction == "outgoing"
                    and row.bootstrap_listen == bootstrap
                    and fingerprint in load_roots_pem(row.peer_roots_pem)
                ):
                    # Asked again: the same request, as the peer has recorded it (this
                    # server records one only once the peer has), even while it is down.
                    return row
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
                raise FailedPrecondition(
                    f"a request to {address.fqdn} is under way already (request {live.id}, "
                    f"made to {live.bootstrap_listen})"
                )
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
        listen_address(receipt.listen, "the receipt's listen")
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

    # -- B: receiving --------------------------------------------------------------------

    def receive_offer(self, signed: pb.SignedPeerMessage) -> pb.SignedPeerMessage:
        body = parse_message(signed, pb.PEER_MESSAGE_KIND_OFFER)
        check_addressed(body, self.fqdn, self._now())
        roots = roots_of(body)
        verify_signed(signed, roots, require_all=True)
        listen_address(body.listen, "the offer's listen")
        listen_address(body.bootstrap_listen, "the offer's bootstrap_listen")
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
                replace_at = live.created_at + REOFFER_AFTER
                if self._now() < replace_at:
                    raise ResourceExhausted(
                        f"a request from {body.sender_fqdn} (request {live.id}) was received "
                        f"at {live.created_at.isoformat(timespec='seconds')}; a new one may "
                        f"replace it from {replace_at.isoformat(timespec='seconds')} on: "
                        "retry then, or have this server's admin reject it first"
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
                replaces = ""
                if live is not None:  # the same peer asked again: this one replaces it
                    tx.peers.delete_peer(live.id)
                    replaces = f"replaces request {live.id}"
                tx.peers.insert_peer(record)
                self._history(tx, record, "received", actor, list(roots), replaces)
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
            if (
                record.state == "pending"
                and record.peer_nonce is not None
                and hmac.compare_digest(record.peer_nonce, body.nonce)
            ):
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
        reason = reason_text(reason, "rejected by an admin")
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
                    reason = reason_text(body.reason, "rejected by the peer's admin")
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
