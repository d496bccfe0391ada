"""The trust state: one versioned document every component follows, signed by every
active root.

Each version is published only when its content changes, gets the next version number,
and is signed by the roots active at that moment. Because the set of active roots
changes one root at a time, every version is signed by at least one root the previous
version trusted: a client that holds version N verifies N+k by walking the versions
whose root set changed (`versions_since`). The wire format (keyplane.v1 TrustStateBody
inside SignedTrustState) is the signed document itself, so it is built here.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from keyplane.plugins.keys import BackendPrivateKey, KeyAlgorithm
from keyplane.plugins.manager import KeyBackends
from keyplane.server.domain import certs, crl
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.crls import CrlPublisher
from keyplane.server.domain.faults import Faults
from keyplane.server.domain.settings import Settings
from keyplane.server.kinds import KeyKind, KeyState
from keyplane.server.store import KeyRecord, StateStore, Transaction, TrustStateRecord
from keyplane.server.store.reads import Reads
from keyplane.v1 import trust_state_pb2

log = logging.getLogger(__name__)

TRUST_STATE_CONTEXT = b"keyplane-trust-state-v1\0"
SUBORDINATE_KINDS = (
    KeyKind.INTERMEDIATE_TLS,
    KeyKind.ZONE_INTERMEDIATE,
    KeyKind.MESSAGE_SIGNING,
    KeyKind.SERVER_TLS,
)


def sign_with(key: BackendPrivateKey, algorithm: KeyAlgorithm, data: bytes) -> bytes:
    """A signature by a keyplane key: ECDSA with the curve's hash, or RSA PKCS#1 v1.5."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(algorithm.signature_hash))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


@dataclass(frozen=True)
class PublishedVersion:
    """A trust state as stored."""

    version: int
    signed: bytes


class TrustStatePublisher:
    """Builds, signs and stores trust-state versions; tells listeners of new ones."""

    def __init__(
        self,
        fqdn: str,
        store: StateStore,
        backends: KeyBackends,
        settings: Settings,
        clock: Clock,
        faults: Faults,
        crls: CrlPublisher | None = None,
    ) -> None:
        self.fqdn = fqdn
        # CRLs are signed anew with every publication that changes what they list.
        self.crls = crls
        self.store = store
        self.backends = backends
        self.settings = settings
        self.clock = clock
        self.faults = faults
        self._lock = threading.Lock()
        self._listeners: list[Callable[[int], None]] = []
        # The trusted peers' sections, read through the transaction's reads (set by the
        # hierarchy: server/domain/peers.py).
        self.peer_sections: Callable[[Reads], list[trust_state_pb2.PeerServer]] = lambda r: []

    def on_publish(self, listener: Callable[[int], None]) -> None:
        """Call `listener(version)` after each new version commits (from any thread)."""
        self._listeners.append(listener)

    def _certificate(self, record: KeyRecord) -> trust_state_pb2.TrustedCertificate:
        return trust_state_pb2.TrustedCertificate(
            fingerprint=record.fingerprint,
            certificate_der=certs.to_der(certs.load_pem(record.certificate_pem or "")),
            name=record.name,
            state=record.state if record.kind != KeyKind.ROOT else KeyState.ACTIVE,
            issuer_fingerprint=record.issuer_fingerprint or "",
            kind=record.kind,
        )

    def _content(self, reads: Reads) -> trust_state_pb2.TrustStateBody:
        """Everything but the version and time: what a change of state changes. Read
        through `reads`, so that a transaction can publish what it is about to commit."""
        now = self.clock.now()
        body = trust_state_pb2.TrustStateBody(server_fqdn=self.fqdn)
        roots = reads.keys(KeyKind.ROOT, (KeyState.ACTIVE,))
        body.roots.extend(self._certificate(r) for r in roots)
        body.revoked_root_fingerprints.extend(
            r.fingerprint for r in reads.keys(KeyKind.ROOT, (KeyState.REVOKED,))
        )
        lists = {
            KeyKind.INTERMEDIATE_TLS: body.intermediates,
            KeyKind.ZONE_INTERMEDIATE: body.intermediates,
            KeyKind.MESSAGE_SIGNING: body.message_signing,
            KeyKind.SERVER_TLS: body.server_tls,
        }
        revoked_keys: list[str] = []
        for kind in SUBORDINATE_KINDS:
            for record in reads.keys(kind):
                if record.state == KeyState.REVOKED:
                    revoked_keys.append(record.fingerprint)
                elif record.not_after is None or record.not_after > now:
                    lists[kind].append(self._certificate(record))
        body.revoked_key_fingerprints.extend(sorted(revoked_keys))
        live = [(s, f) for s, f, not_after in reads.revoked_certificates() if not_after > now]
        body.revoked_serials.extend(s for s, _ in live)
        body.revoked_certificate_key_fingerprints.extend(sorted({f for _, f in live}))
        body.client_settings.update(self.settings.client_values())
        values = self.settings.values()
        body.zone_settings.update(
            {
                n: values[n]
                for n in (
                    "PKIClientTLSKeyValidityHours",
                    "PKIClientTLSKeyRenewalWindowHours",
                    # Zones put their CRL's distribution point in what they issue and
                    # sign it for as long as the server's CRLs are valid.
                    crl.CRL_BASE_URL_SETTING,
                    crl.CRL_VALIDITY_SETTING,
                )
            }
        )
        body.peers.extend(self.peer_sections(reads))
        return body

    @staticmethod
    def _digest(body: trust_state_pb2.TrustStateBody) -> str:
        """What the content is, without the peers' own version numbers: a peer version
        that changes nothing of its section publishes nothing new (and two peers that
        each listed the other's version would publish each other forever)."""
        if body.peers:
            body = trust_state_pb2.TrustStateBody.FromString(body.SerializeToString())
            for peer in body.peers:
                peer.trust_state_version = 0
        return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()

    def publish(self, actor: str) -> int:
        """Publish a new version if the content changed; return the latest version."""
        with self._lock:
            with self.store.transaction(self.clock.now()) as tx:
                version = self.publish_in(tx, actor)
        return version

    def publish_in(self, tx: Transaction, actor: str) -> int:
        """Publish, inside `tx`, a version with what `tx` has written so far, if the
        content changed; return the latest version. If signing fails, this raises and
        `tx` rolls back: a change that must be published (a revocation) is then not made
        at all. Listeners hear of the version once `tx` has committed. The CRLs of the
        CAs that `tx` changed (or that are half way to their nextUpdate) are signed in
        `tx` too, so the same holds for them."""
        if self.crls is not None:
            self.crls.refresh_in(tx, actor)
        body = self._content(tx.reads)
        digest = self._digest(body)
        found = tx.reads.trust_states("ORDER BY version DESC LIMIT 1", ())
        latest = found[0] if found else None
        floor = tx.reads.trust_version_floor()
        held = latest.version if latest else 0
        if latest is not None and latest.content_digest == digest and held > floor:
            return latest.version
        # After a restore, above any version the replaced server may have published.
        version = max(held, floor) + 1
        now = self.clock.now()
        body.version = version
        body.issue_time.FromDatetime(now)
        body_bytes = body.SerializeToString(deterministic=True)
        signed = trust_state_pb2.SignedTrustState(body=body_bytes)
        roots = tx.reads.keys(KeyKind.ROOT, (KeyState.ACTIVE,))
        self.faults.failpoint("trust.sign")
        for root in roots:
            key = self.backends.private_key(root.key_uri)
            signature = sign_with(
                key, KeyAlgorithm(root.algorithm), TRUST_STATE_CONTEXT + body_bytes
            )
            signed.signatures.add(root_fingerprint=root.fingerprint, signature=signature)
        self.faults.checkpoint("trust.signed")
        root_set = ",".join(sorted(r.fingerprint for r in roots))
        tx.insert_trust_state(
            TrustStateRecord(version, digest, root_set, signed.SerializeToString(), now)
        )
        tx.audit(actor, "trust_state.publish", str(version), roots=root_set)
        tx.on_commit(lambda: self._published(version))
        return version

    def _published(self, version: int) -> None:
        log.info("published trust state version %d", version)
        for listener in self._listeners:
            # The version is committed: a listener that fails (its event loop closed)
            # must not turn the change that published it into an error.
            try:
                listener(version)
            except Exception:
                log.exception("a trust-state listener failed for version %d", version)

    def latest_version(self) -> int:
        latest = self.store.latest_trust_state()
        return latest.version if latest else 0

    def versions_since(self, since: int) -> list[bytes]:
        """The signed versions a holder of `since` needs to reach the latest, oldest first."""
        latest = self.store.latest_trust_state()
        if latest is None or latest.version <= since:
            return []
        if since <= 0:
            return [latest.signed]
        held = self.store.trust_state(since)
        previous_roots = held.root_set if held is not None else None
        chain: list[bytes] = []
        for record in self.store.trust_states_after(since):
            if record.version == latest.version:
                break
            if record.root_set != previous_roots:
                chain.append(record.signed)
            previous_roots = record.root_set
        chain.append(latest.signed)
        return chain
