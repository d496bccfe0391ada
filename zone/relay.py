"""The zone server's trust state: it follows the server's (verified against the roots it
pinned, never going back), keeps every version in zone.db, and relays them to its own
clients, with the bridging versions a client that was away needs.

Active/active: the trust state lists the peer servers its server trusts; a certificate
a peer's live intermediate issued is admitted as an agent, unless the peer revoked it.
While its own server does not answer, the zone follows a peer's trust state too
(verified from the peer's roots as its own server published them), for what the peer
revokes meanwhile; it relays only its own server's versions, the ones its clients can
verify, and goes back to its own server as soon as it answers.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyplane.clients.client import (
    KeyplaneClient,
    KeyplaneClientError,
    bootstrap_channel_for,
)
from keyplane.clients.trust import TrustState, TrustStateError, follow
from keyplane.server.kinds import KeyKind
from keyplane.v1 import trust_state_pb2

if TYPE_CHECKING:
    from keyplane.zone.runtime import ZoneServer

log = logging.getLogger(__name__)

# While its own server does not answer: a peer's trust state is asked for this often,
# and its own server again after this long.
PEER_POLL_SECONDS = 1.0
FAILBACK_SECONDS = 5.0
PEER_TIMEOUT = 8.0
UNREACHABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


@dataclass(frozen=True)
class Intermediate:
    """An intermediate the trust state lists, parsed."""

    fingerprint: str
    kind: KeyKind
    certificate: x509.Certificate


@dataclass(frozen=True)
class TrustView:
    """What admission needs from one trust-state version, parsed once."""

    # The trust state's version, and the followed peer's (0: none).
    version: tuple[int, int]
    revoked_serials: frozenset[str]
    revoked_keys: frozenset[str]
    # The live intermediates by subject: a certificate is checked against those its
    # issuer name names, not against every one.
    by_subject: dict[x509.Name, tuple[Intermediate, ...]]


def _root_set(state: TrustState) -> str:
    return ",".join(sorted(state.root_fingerprints))


class Relay:
    """The trust state a zone server holds and serves."""

    def __init__(self, zone: ZoneServer) -> None:
        self.zone = zone
        self.state: TrustState | None = None
        self._view: TrustView | None = None
        self._lock = threading.RLock()
        self.notify: Callable[[int], None] = lambda version: None
        # A peer's trust state, followed while its own server does not answer.
        self.peer_state: TrustState | None = None
        # Which server it follows now: its own (None) or a peer's fqdn.
        self.using_peer: str | None = None

    def load(self) -> None:
        latest = self.zone.store.latest_trust_version()
        if latest is not None:
            signed = trust_state_pb2.SignedTrustState.FromString(latest[2])
            body = trust_state_pb2.TrustStateBody.FromString(signed.body)
            self.state = TrustState(body, signed)

    def accept(self, batch: list[trust_state_pb2.SignedTrustState]) -> None:
        """Verify and keep new versions; renew the intermediate if a new root calls for
        it, and only then tell this zone's watchers, so that a client that renews because
        of the new version gets a certificate from the new chain."""
        with self._lock:
            state = self.state
            for signed in batch:
                state = follow(state, [signed], self.zone.bundle().root_fingerprints)
                self.zone.store.add_trust_version(
                    state.version, _root_set(state), signed.SerializeToString()
                )
            self.state = state
        if state is not None and self.zone.check_revoked(state):
            # A revoked zone renews nothing; it tells its clients (they learn they are
            # revoked too) and stops soon after.
            self.notify(state.version)
            return
        self.zone.upstream.maybe_renew_quietly()
        self.zone.crl.wake()  # the version may revoke what this zone issued
        if state is not None:
            self.notify(state.version)

    def versions_since(self, since: int) -> list[bytes]:
        """What a client holding `since` needs: root-set changes, then the latest."""
        store = self.zone.store
        latest = store.latest_trust_version()
        if latest is None or latest[0] <= since:
            return []
        if since <= 0:
            return [latest[2]]
        held = store.trust_version(since)
        previous = held[1] if held else None
        chain = []
        for version, root_set, signed in store.trust_versions_after(since):
            if version == latest[0]:
                break
            if root_set != previous:
                chain.append(signed)
            previous = root_set
        chain.append(latest[2])
        return chain

    def follow_loop(self) -> None:
        """Watch the server's trust state for as long as the zone runs; reconnect on error,
        and follow a peer meanwhile when its own server does not answer."""
        zone = self.zone
        delay = 0.2
        while not zone.stopping.is_set():
            try:
                with zone.upstream.server_client() as client:
                    held = self.state.version if self.state else 0
                    watch = client.watch_trust_state(held)
                    zone.upstream.watch = watch
                    for batch in watch:
                        self.accept(batch)
                        self._back_home()
                        delay = 0.2
                        if zone.stopping.is_set():
                            break
            except KeyplaneClientError as exc:
                if zone.stopping.is_set():
                    return
                if exc.code.name in UNREACHABLE and self._follow_a_peer():
                    delay = 0.2
                    continue  # its own server is asked again now
                log.warning("trust-state watch failed (%s); retrying in %.1f s", exc, delay)
            except Exception as exc:  # reconnect on any failure, never die
                if not zone.stopping.is_set():
                    log.warning("trust-state watch failed (%s); retrying in %.1f s", exc, delay)
            zone.stopping.wait(delay * (0.5 + random.random()))  # noqa: S311 - jitter
            delay = min(delay * 2, 10.0)

    def _back_home(self) -> None:
        if self.using_peer is not None:
            log.info("its own server answers again; no longer following %s", self.using_peer)
            self.using_peer = None
            self.peer_state = None
            self._view = None

    def _follow_a_peer(self) -> bool:
        """Follow a peer's trust state for a few seconds; False if none answered."""
        state = self.state
        if state is None or not state.body.peers:
            return False
        deadline = time.monotonic() + FAILBACK_SECONDS
        answered = False
        while not self.zone.stopping.is_set() and time.monotonic() < deadline:
            for section in state.body.peers:
                try:
                    self._follow_peer(section)
                except (KeyplaneClientError, TrustStateError) as exc:
                    log.warning("the peer %s: %s", section.fqdn, exc)
                    continue
                answered = True
                break
            if not answered:
                return False
            self.zone.stopping.wait(PEER_POLL_SECONDS)
        return answered

    def _follow_peer(self, section: trust_state_pb2.PeerServer) -> None:
        roots = {r.fingerprint: r for r in section.roots}
        roots_pem = b"".join(
            x509.load_der_x509_certificate(r.certificate_der).public_bytes(
                serialization.Encoding.PEM
            )
            for r in roots.values()
        )
        held = self.peer_state if self.using_peer == section.fqdn else None
        channel = bootstrap_channel_for(section.bootstrap_listen, roots_pem)
        with KeyplaneClient(channel, timeout=PEER_TIMEOUT) as client:
            batch = client.get_trust_state(held.version if held else 0)
            if not batch:
                return
            try:
                followed = follow(held, batch, list(roots))
            except TrustStateError:
                if held is None:
                    raise
                followed = follow(None, client.get_trust_state(0), list(roots))
        if followed.body.server_fqdn != section.fqdn:
            raise TrustStateError(f"{section.fqdn} sent {followed.body.server_fqdn}'s trust state")
        if self.using_peer != section.fqdn:
            log.warning(
                "its own server does not answer: following the peer %s's trust state",
                section.fqdn,
            )
        with self._lock:
            self.peer_state = followed
            self.using_peer = section.fqdn
            self._view = None

    def view(self) -> TrustView | None:
        """The parsed trust state, made once per version."""
        state = self.state
        if state is None:
            return None
        view = self._view
        peer_version = self.peer_state.version if self.peer_state else 0
        if view is None or view.version != (state.version, peer_version):
            revoked = set(state.body.revoked_key_fingerprints)
            by_subject: dict[x509.Name, tuple[Intermediate, ...]] = {}

            def add(entry: trust_state_pb2.TrustedCertificate, kind: KeyKind) -> None:
                cert = x509.load_der_x509_certificate(entry.certificate_der)
                one = Intermediate(entry.fingerprint, kind, cert)
                by_subject[cert.subject] = (*by_subject.get(cert.subject, ()), one)

            for entry in state.body.intermediates:
                if entry.fingerprint not in revoked:
                    # A trust state from before kinds were named: every intermediate issues
                    # agent certificates only, so either kind confers the same.
                    add(entry, KeyKind(entry.kind) if entry.kind else KeyKind.ZONE_INTERMEDIATE)
            serials = set(state.body.revoked_serials)
            keys = set(state.body.revoked_certificate_key_fingerprints)
            # The trusted peers' agents are agents here too, unless their server revoked them.
            peers = list(state.body.peers)
            if self.peer_state is not None:
                peers = [p for p in peers if p.fqdn != self.peer_state.body.server_fqdn]
                body = self.peer_state.body
                peers.append(
                    trust_state_pb2.PeerServer(
                        fqdn=body.server_fqdn,
                        intermediates=body.intermediates,
                        revoked_key_fingerprints=body.revoked_key_fingerprints,
                        revoked_serials=body.revoked_serials,
                        revoked_certificate_key_fingerprints=body.revoked_certificate_key_fingerprints,
                    )
                )
            for peer in peers:
                peer_revoked = set(peer.revoked_key_fingerprints)
                for entry in peer.intermediates:
                    if entry.fingerprint not in peer_revoked:
                        add(entry, KeyKind.PEER_INTERMEDIATE)
                serials.update(peer.revoked_serials)
                keys.update(peer.revoked_certificate_key_fingerprints)
                keys.update(peer_revoked)
            view = TrustView(
                (state.version, self.peer_state.version if self.peer_state else 0),
                frozenset(serials),
                frozenset(keys),
                by_subject,
            )
            self._view = view
        return view
