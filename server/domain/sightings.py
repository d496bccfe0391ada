"""When components were last seen: every admitted mutual-TLS call, renewal and
trust-state watch notes the caller's certificate here, in memory; the server writes what
was noted in one batch every `sightings_seconds` (and at stop), a zone server reports it
to its server, so that no call costs a write. An open trust-state watch counts as seen
at every batch for as long as it lasts."""

from __future__ import annotations

import collections
import contextlib
import datetime
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from keyplane.server.domain.clock import Clock
from keyplane.server.domain.identity import Identity

# How often what was seen is written (the server) or reported (a zone server).
SIGHTINGS_SECONDS = 30.0


@dataclass(frozen=True)
class Sighting:
    """When a certificate's holder was seen, and who issued that certificate."""

    at: datetime.datetime
    issuer_fingerprint: str


class Sightings:
    """The certificates seen since the last batch (serial -> the latest sighting)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, Sighting] = {}
        # Open trust-state watches: serial -> (how many, its issuer).
        self._watching: collections.Counter[str] = collections.Counter()
        self._watch_issuers: dict[str, str] = {}

    def seen(self, identity: Identity) -> None:
        """The holder of `identity`'s certificate called just now."""
        sighting = Sighting(self._clock.now(), identity.issuer_fingerprint)
        with self._lock:
            self._seen[identity.serial] = sighting

    @contextlib.contextmanager
    def watching(self, identity: Identity) -> Iterator[None]:
        """For the life of a stream (a trust-state watch): seen now, and at each batch."""
        self.seen(identity)
        with self._lock:
            self._watching[identity.serial] += 1
            self._watch_issuers[identity.serial] = identity.issuer_fingerprint
        try:
            yield
        finally:
            with self._lock:
                self._watching[identity.serial] -= 1
                if self._watching[identity.serial] <= 0:
                    del self._watching[identity.serial]
                    self._watch_issuers.pop(identity.serial, None)
            self.seen(identity)

    def take(self) -> dict[str, Sighting]:
        """What was seen since the last take, open watches as seen now; forgotten here
        (give it back with put_back if it could not be written)."""
        now = self._clock.now()
        with self._lock:
            taken, self._seen = self._seen, {}
            for serial in self._watching:
                taken[serial] = Sighting(now, self._watch_issuers.get(serial, ""))
        return taken

    def put_back(self, taken: dict[str, Sighting]) -> None:
        """Sightings that could not be written, kept for the next batch (a later
        sighting of the same certificate wins)."""
        with self._lock:
            for serial, sighting in taken.items():
                current = self._seen.get(serial)
                if current is None or current.at < sighting.at:
                    self._seen[serial] = sighting

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)
