"""A trust between two servers, once set up (active/active): each follows the other's
trust state (PushTrustState and pulls by the peer link, server/peer_link.py), pinned to
the approved roots and their bridged successors (peer_states), and either may end it,
at once here and told to the peer now or as soon as it answers."""

from __future__ import annotations

import datetime
import logging

from keyplane.server.domain.peer_messages import (
    check_addressed,
    load_roots_pem,
    parse_message,
    verify_signed,
)
from keyplane.server.domain.peer_side import PeerAddress, PeerSide, reason_text
from keyplane.server.domain.peer_states import Followed, PeerState, follow_peer
from keyplane.server.domain.peers import view_of
from keyplane.server.errors import (
    FailedPrecondition,
    NotFound,
)
from keyplane.server.store import LIVE_PEER_STATES, PeerRecord
from keyplane.v1 import trust_service_pb2 as pb
from keyplane.v1 import trust_state_pb2

log = logging.getLogger(__name__)

# Updates are public: of the refusals of one peer's updates, the history keeps each
# reason once per REFUSAL_EVERY, and at most MAX_REFUSALS in that time.
REFUSAL_EVERY = datetime.timedelta(minutes=1)
MAX_REFUSALS = 10


class TrustedPeerSide(PeerSide):
    """Trust with peers once set up: updates over the peer link, and its end."""

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
        reason = reason_text(reason, "revoked by an admin")
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
            reason = reason_text(body.reason, "ended by the peer")
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
