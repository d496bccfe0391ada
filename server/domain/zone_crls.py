"""What a zone server needs for its CRL: the revocations of what its intermediates
issued (when and why, as the server recorded them), and a place on the server's CRL
listener for the CRL it signs, so that one PKICRLBaseURL names every CRL."""

from __future__ import annotations

from keyplane.server.domain import crl
from keyplane.server.domain.crls import live_entries
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.zones import Zones
from keyplane.server.kinds import LIVE_STATES, KeyKind
from keyplane.server.store import CrlRecord, KeyRecord
from keyplane.server.store.reads import Reads


class ZoneCrls:
    """ListZoneRevocations and PublishZoneCrl, for the calling zone only."""

    def __init__(self, zones: Zones) -> None:
        self.zones = zones
        self.hierarchy = zones.hierarchy

    def _intermediates(self, reads: Reads, key_uri: str) -> list[KeyRecord]:
        """The zone's live intermediates (its identity is its certificate, so its key
        URI, never its name)."""
        return [
            k for k in reads.keys(KeyKind.ZONE_INTERMEDIATE, LIVE_STATES) if k.key_uri == key_uri
        ]

    def revocations(self, identity: Identity) -> list[tuple[str, crl.Entry]]:
        """(issuer fingerprint, entry) of each revoked, unexpired certificate the
        caller's live intermediates issued."""
        zone = self.zones.current_zone(identity)
        now = self.hierarchy.clock.now()
        reads = self.hierarchy.store.reads
        return [
            (issuer.fingerprint, entry)
            for issuer in self._intermediates(reads, zone.key_uri)
            for entry in live_entries(reads.revoked_under(issuer.fingerprint), now)
        ]

    def publish(self, identity: Identity, data: bytes) -> CrlRecord:
        """Keep the CRL the caller signed (CrlPublisher.accept_zone_crl checks it)."""
        zone = self.zones.current_zone(identity)
        h = self.hierarchy
        with h.store.transaction(h.clock.now()) as tx:
            intermediates = self._intermediates(tx.reads, zone.key_uri)
            return h.crls.accept_zone_crl(tx, identity.actor, intermediates, data)
