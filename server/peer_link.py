"""The peer link (active/active): keeps this server and each trusted peer current.

One thread per server (worker 0). When this server publishes a trust-state version it
pushes the versions each peer needs (PushTrustState: the peer answers the version it
holds, then gets the bridging versions from there); every LINK_SECONDS it pulls each
peer's new versions (GetTrustState from the version held), which is also how the two
catch up after a partition heals; and it tells peers of ends they have not heard yet.
Each side verifies what it receives itself (server/domain/peer_states.py).
"""

from __future__ import annotations

import logging
import threading

from keyplane.server.domain.exchange import TrustExchange
from keyplane.server.domain.peer_side import PeerAddress
from keyplane.server.domain.trust import TrustStatePublisher
from keyplane.server.errors import KeyplaneError
from keyplane.v1 import trust_state_pb2

log = logging.getLogger(__name__)

LINK_SECONDS = 2.0


class PeerLink:
    """Pushes this server's trust state to trusted peers and pulls theirs."""

    def __init__(
        self,
        exchange: TrustExchange,
        publisher: TrustStatePublisher,
        interval: float = LINK_SECONDS,
    ) -> None:
        self.exchange = exchange
        self.publisher = publisher
        self.interval = interval
        self._stop = threading.Event()
        self._push = threading.Event()
        self._thread: threading.Thread | None = None
        # Per peer: the last error logged, so that an outage is logged once, not per tick.
        self._errors: dict[str, str] = {}
        # Peers a push did not reach: they get one at every tick until one does.
        self._owed: set[str] = set()

    def start(self) -> None:
        self.publisher.on_publish(lambda version: self._push.set())
        self._push.set()  # a start may follow versions a peer has not seen
        self._thread = threading.Thread(target=self._run, name="peer link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._push.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        """Push now (a test, or a change of trust, may not wait for the next tick)."""
        self._push.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._push.wait(self.interval)
            push = self._push.is_set()
            self._push.clear()
            if self._stop.is_set():
                return
            try:
                peers = self.exchange.trusted_addresses()
            except Exception:
                log.exception("the peer link could not read the trusted peers")
                continue
            for peer in peers:
                self._sync(peer, push or peer.fqdn in self._owed)
            try:
                self.exchange.deliver_ends()
            except Exception:
                log.exception("the peer link could not deliver an end of trust")

    def _sync(self, peer: PeerAddress, push: bool) -> None:
        try:
            if push:
                self._owed.add(peer.fqdn)
                self._push_to(peer)
                self._owed.discard(peer.fqdn)
            since = self.exchange.held_version(peer.fqdn)
            versions = self.exchange.transport.trust_states(peer, since)
            if versions:
                self.exchange.accept_update(peer.fqdn, versions, "pull")
        except KeyplaneError as exc:
            self._failed(peer, exc)
            return
        except Exception as exc:  # never end the link
            log.exception("the peer link to %s failed", peer.fqdn)
            self._failed(peer, exc)
            return
        if self._errors.pop(peer.fqdn, None) is not None:
            log.info("the peer link to %s is up again", peer.fqdn)

    def _push_to(self, peer: PeerAddress) -> None:
        transport = self.exchange.transport
        held = transport.push(peer, self.exchange.fqdn, [])
        raw = self.publisher.versions_since(held)
        if raw:
            versions = [trust_state_pb2.SignedTrustState.FromString(b) for b in raw]
            transport.push(peer, self.exchange.fqdn, versions)

    def _failed(self, peer: PeerAddress, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if self._errors.get(peer.fqdn) != text:
            self._errors[peer.fqdn] = text
            log.warning(
                "the peer link to %s: %s (retrying every %.0f s)", peer.fqdn, text, self.interval
            )
