"""The zone server's CRL: its intermediate signs one listing the agent certificates it
issued that were revoked. The trust state says when something was revoked (each new
version wakes the signer); the server says which of the zone's certificates and when and
why (ListZoneRevocations). The CRL is kept in zone.db (served by the zone's own CRL
listener, by every worker) and sent to the server (PublishZoneCrl), whose listener
serves it beside its own; it is signed anew once half its life is gone, from the entries
kept, even while the server is out of reach. Worker 0 signs; the others serve."""

from __future__ import annotations

import datetime
import json
import logging
import threading
from typing import TYPE_CHECKING

from keyplane.server.domain import certs, crl
from keyplane.zone.state import ZoneCrlRecord

if TYPE_CHECKING:
    from keyplane.zone.runtime import ZoneServer

log = logging.getLogger(__name__)

CHECK_SECONDS = 30.0


def _entries_json(entries: list[crl.Entry]) -> str:
    return json.dumps(
        [[e.serial, e.revoked_at.isoformat(), e.reason_code] for e in entries], sort_keys=True
    )


def _entries_of(text: str) -> list[crl.Entry]:
    return [
        crl.Entry(str(s), datetime.datetime.fromisoformat(str(at)), int(code))
        for s, at, code in json.loads(text)
    ]


class ZoneCrlSigner:
    """Keeps the CRL of the zone's current intermediate current."""

    def __init__(self, zone: ZoneServer) -> None:
        self.zone = zone
        self._wake = threading.Event()
        self._lock = threading.Lock()
        # The trust-state version whose revocations were fetched from the server last.
        self._fetched_version = -1

    def wake(self) -> None:
        """A new trust-state version came: look again soon (from any thread)."""
        self._wake.set()

    def loop(self) -> None:
        zone = self.zone
        while not zone.stopping.is_set():
            try:
                self.refresh()
            except Exception as exc:  # never ends the loop: the next tick tries again
                log.warning("could not bring the zone CRL up to date (%s); will retry", exc)
            self._wake.wait(CHECK_SECONDS)
            self._wake.clear()

    def _fetch(self, issuer_fingerprint: str, version: int) -> list[crl.Entry] | None:
        """What the server says the CRL must list now, or None when it cannot be asked."""
        try:
            found = self.zone.upstream.shared_client().list_zone_revocations()
        except Exception as exc:
            log.warning("cannot fetch the zone's revocations from the server (%s)", exc)
            return None
        self._fetched_version = version
        return [
            crl.Entry(r.serial, r.revoke_time.ToDatetime(datetime.UTC), r.reason_code)
            for r in found
            if r.issuer_fingerprint == issuer_fingerprint
        ]

    def refresh(self) -> ZoneCrlRecord | None:
        """Sign a CRL if what it lists changed or it is half way to its nextUpdate, and
        send the server the newest one if it has not kept it yet; the newest one."""
        zone = self.zone
        state = zone.relay.state
        if state is None or zone.revoked_because is not None:
            return None  # a revoked zone signs nothing more
        with self._lock:
            cert, key = zone.issuing.issuer()
            fingerprint = certs.key_fingerprint(cert)
            stored = zone.store.crl(fingerprint)
            entries: list[crl.Entry] | None = None
            if state.version != self._fetched_version or stored is None:
                entries = self._fetch(fingerprint, state.version)
            if entries is None:
                entries = _entries_of(stored.entries) if stored is not None else []
            hours = int(
                state.body.zone_settings.get(crl.CRL_VALIDITY_SETTING) or crl.DEFAULT_VALIDITY_HOURS
            )
            digest = crl.digest(fingerprint, entries, hours)
            now = zone.clock.now()
            if (
                stored is None
                or stored.content_digest != digest
                or crl.due(stored.this_update, stored.next_update, now)
            ):
                number = crl.next_number(stored.crl_number if stored else None, now)
                next_update = now + datetime.timedelta(hours=hours)
                der = crl.build(key, cert, entries, number, now, next_update)
                record = ZoneCrlRecord(
                    fingerprint, number, digest, now, next_update, der, _entries_json(entries)
                )
                if zone.store.put_crl(record):
                    log.info("signed zone CRL %d (%d entries)", number, len(entries))
                stored = zone.store.crl(fingerprint)
            if stored is not None and not stored.published:
                try:
                    zone.upstream.shared_client().publish_zone_crl(stored.der)
                except Exception:
                    # Refused as leaving something out (revoked since it was fetched),
                    # or not delivered: fetch the revocations again next time.
                    self._fetched_version = -1
                    raise
                zone.store.crl_published(fingerprint, stored.crl_number)
            return stored

    def served(self, issuer_fingerprint: str) -> tuple[bytes, datetime.datetime] | None:
        """The CRL the zone's listener serves for this issuer."""
        record = self.zone.store.crl(issuer_fingerprint)
        return (record.der, record.this_update) if record is not None else None
