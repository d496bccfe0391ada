"""The server at a glance (`keyplane status`): health, roots, the next expiries, the zone
servers and when each was last heard from, and the last backup. Reads only."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyplane.server.domain.backups import Backups, LastBackup, keyplane_version
from keyplane.server.errors import InvalidArgument
from keyplane.server.kinds import SUBORDINATE_KINDS, KeyKind, KeyState
from keyplane.server.store import KeyRecord, ZoneRecord

if TYPE_CHECKING:
    from keyplane.server.domain.hierarchy import Hierarchy

DEFAULT_EXPIRIES = 5
MAX_EXPIRIES = 100
# Kinds whose certificates expire (roots never do).
EXPIRING_KINDS = (*SUBORDINATE_KINDS, KeyKind.ZONE_INTERMEDIATE)

# Each key backend's health as this process last checked it: None, or why it is down.
BackendHealth = Callable[[], Mapping[str, str | None]]


@dataclass(frozen=True)
class ZoneSummary:
    zone: ZoneRecord
    intermediate_not_after: datetime.datetime | None


@dataclass(frozen=True)
class ServerStatus:
    """What GetServerStatus answers."""

    serving: bool
    problems: list[str]
    backends: dict[str, str | None]
    server: str
    version: str
    trust_state_version: int
    roots: list[KeyRecord]
    next_expiries: list[KeyRecord]
    zones: list[ZoneSummary]
    last_backup: LastBackup | None
    now: datetime.datetime


class Status:
    """Reads what `keyplane status` shows."""

    def __init__(self, hierarchy: Hierarchy, backups: Backups, health: BackendHealth) -> None:
        self.h = hierarchy
        self._backups = backups
        self._health = health

    def current(self, expiries: int = 0) -> ServerStatus:
        if not 0 <= expiries <= MAX_EXPIRIES:
            raise InvalidArgument(f"expiries is from 0 (the default, {DEFAULT_EXPIRIES}) to 100")
        h = self.h
        backends = dict(self._health())
        problems = [
            f"key backend {name} does not answer: {why}" for name, why in backends.items() if why
        ]
        live = (KeyState.ACTIVE, KeyState.PREPARED)
        expiring = [
            k
            for kind in EXPIRING_KINDS
            for k in h.store.keys(kind, live)
            if k.not_after is not None
        ]
        expiring.sort(key=lambda k: k.not_after or datetime.datetime.max)
        intermediates = h.store.keys(KeyKind.ZONE_INTERMEDIATE, (KeyState.ACTIVE,))
        zones = []
        for zone in h.store.reads.zones(False):  # afresh: last_seen changes without a generation
            mine = [k.not_after for k in intermediates if k.key_uri == zone.key_uri]
            zones.append(ZoneSummary(zone, max((t for t in mine if t), default=None)))
        return ServerStatus(
            serving=not problems,
            problems=problems,
            backends=backends,
            server=h.config.fqdn,
            version=keyplane_version(),
            trust_state_version=h.trust.latest_version(),
            roots=h.active_roots(),
            next_expiries=expiring[: expiries or DEFAULT_EXPIRIES],
            zones=sorted(zones, key=lambda z: z.zone.name),
            last_backup=self._backups.last(),
            now=h.clock.now(),
        )
