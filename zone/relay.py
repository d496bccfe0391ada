"""The zone server's trust state: it follows the server's (verified against the roots it
pinned, never going back), keeps every version in zone.db, and relays them to its own
clients, with the bridging versions a client that was away needs."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from keyplane.clients.trust import TrustState, follow
from keyplane.server.kinds import KeyKind
from keyplane.v1 import trust_state_pb2

if TYPE_CHECKING:
    from keyplane.zone.runtime import ZoneServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intermediate:
    """An intermediate the trust state lists, parsed."""

    fingerprint: str
    kind: KeyKind
    certificate: x509.Certificate


@dataclass(frozen=True)
class TrustView:
    """What admission needs from one trust-state version, parsed once."""

    version: int
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
        """Watch the server's trust state for as long as the zone runs; reconnect on error."""
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
                        delay = 0.2
                        if zone.stopping.is_set():
                            break
            except Exception as exc:  # reconnect on any failure, never die
                if not zone.stopping.is_set():
                    log.warning("trust-state watch failed (%s); retrying in %.1f s", exc, delay)
            zone.stopping.wait(delay * (0.5 + random.random()))  # noqa: S311 - jitter
            delay = min(delay * 2, 10.0)

    def view(self) -> TrustView | None:
        """The parsed trust state, made once per version."""
        state = self.state
        if state is None:
            return None
        view = self._view
        if view is None or view.version != state.version:
            revoked = set(state.body.revoked_key_fingerprints)
            by_subject: dict[x509.Name, tuple[Intermediate, ...]] = {}
            for entry in state.body.intermediates:
                if entry.fingerprint in revoked:
                    continue
                cert = x509.load_der_x509_certificate(entry.certificate_der)
                # A trust state from before kinds were named: every intermediate issues
                # agent certificates only, so either kind confers the same.
                kind = KeyKind(entry.kind) if entry.kind else KeyKind.ZONE_INTERMEDIATE
                one = Intermediate(entry.fingerprint, kind, cert)
                by_subject[cert.subject] = (*by_subject.get(cert.subject, ()), one)
            view = TrustView(
                state.version,
                frozenset(state.body.revoked_serials),
                frozenset(state.body.revoked_certificate_key_fingerprints),
                by_subject,
            )
            self._view = view
        return view
