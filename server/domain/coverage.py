"""Root coverage: how far the fleet has moved to the newest root.

A component is live while its latest certificate is: unrevoked, unexpired and not
renewed to another (`renewed_to`, which the server sets on its renewals and on a zone's
reported ones). Components, and the root each is under:

- an agent: its latest certificate, issued by the server's intermediate or a zone's,
  under that intermediate's root;
- a zone server: its current TLS certificate and its active intermediate; under the
  newest root once both are, else under the older root of the two;
- a trusted peer server: the newest of this server's roots that the peer's own trust
  state (as this server last accepted it) lists for this server; under the newest root
  once it lists that one.

Agents are counted per issuer in one aggregate query; zones and peers are few. What a
revocation of root R leaves with a chain, the figure the gate compares, is the share of
live components not under R (1 with none).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field

from keyplane.server.domain.peers import PeerView, trusted_views
from keyplane.server.kinds import KeyKind, KeyState, Role
from keyplane.server.store import KeyRecord, ZoneRecord
from keyplane.server.store.reads import Reads

AGENT = "agent"
ZONE_SERVER = "zone-server"
PEER = "peer"
COMPONENT_KINDS = (AGENT, ZONE_SERVER, PEER)
DEFAULT_STRAGGLERS = 20
MAX_STRAGGLERS = 1000


@dataclass(frozen=True)
class Straggler:
    """A live component under a root (not the newest, in coverage)."""

    kind: str
    name: str
    serial: str
    root_fingerprint: str
    issued_at: datetime.datetime | None
    not_after: datetime.datetime | None
    last_seen: datetime.datetime | None
    issued_by: str


@dataclass(frozen=True)
class RootShare:
    """The live components under one active root."""

    root: KeyRecord
    newest: bool
    components: dict[str, int]
    coverage_without: float

    @property
    def total(self) -> int:
        return sum(self.components.values())


@dataclass(frozen=True)
class Coverage:
    """What GetRootCoverage answers."""

    newest: KeyRecord
    roots: tuple[RootShare, ...]
    live: dict[str, int]
    stragglers: tuple[Straggler, ...]
    straggler_count: int
    min_coverage: float

    @property
    def moved(self) -> dict[str, int]:
        return next(r.components for r in self.roots if r.newest)

    @property
    def share(self) -> float:
        live = sum(self.live.values())
        return sum(self.moved.values()) / live if live else 1.0


def common_name(subject: str) -> str:
    """The CN of an RFC 4514 subject as the store keeps it ("CN=agent-7" -> "agent-7")."""
    first = subject.split(",", 1)[0]
    return first[3:] if first.startswith("CN=") else subject


@dataclass(frozen=True)
class _Zone:
    zone: ZoneRecord
    root: str
    tls_serial: str
    issued_at: datetime.datetime
    not_after: datetime.datetime
    last_seen: datetime.datetime


@dataclass(frozen=True)
class _Peer:
    view: PeerView
    root: str
    holds_newest: bool


@dataclass
class Fleet:
    """The live components of this server at one moment, by root."""

    reads: Reads
    fqdn: str
    now: datetime.datetime
    roots: list[KeyRecord] = field(init=False)
    newest: KeyRecord = field(init=False)
    # Each intermediate: (its root, who issues with it: "server" or "zone NAME").
    issuers: dict[str, tuple[str, str]] = field(init=False)
    agents_by_issuer: dict[str, int] = field(init=False)
    zones: list[_Zone] = field(init=False)
    peers: list[_Peer] = field(init=False)

    def __post_init__(self) -> None:
        reads = self.reads
        self.roots = reads.keys(KeyKind.ROOT, (KeyState.ACTIVE,))
        self.newest = max(self.roots, key=lambda r: r.number or 0)
        names = {z.key_uri: z.name for z in reads.zones(include_revoked=True)}
        self.issuers = {}
        for key in reads.keys(KeyKind.INTERMEDIATE_TLS):
            self.issuers[key.fingerprint] = (key.issuer_fingerprint or "", "server")
        for key in reads.keys(KeyKind.ZONE_INTERMEDIATE):
            zone = names.get(key.key_uri, key.name.removesuffix(" zone intermediate"))
            self.issuers[key.fingerprint] = (key.issuer_fingerprint or "", f"zone {zone}")
        self.agents_by_issuer = reads.coverage.live_by_issuer(Role.AGENT, self.now)
        self.zones = self._live_zones()
        self.peers = [self._peer(view) for view in trusted_views(reads)]

    def _live_zones(self) -> list[_Zone]:
        active = {
            k.key_uri: k for k in self.reads.keys(KeyKind.ZONE_INTERMEDIATE, (KeyState.ACTIVE,))
        }
        found = []
        for zone in self.reads.zones():
            tls = self.reads.certificate(zone.tls_serial) if zone.tls_serial else None
            if tls is None or tls.revoked_at is not None or tls.not_after <= self.now:
                continue  # a zone without a live TLS certificate cannot call: not live
            roots = [tls.issuer_fingerprint]
            intermediate = active.get(zone.key_uri)
            if intermediate is not None:
                roots.append(intermediate.issuer_fingerprint or "")
            older = [r for r in roots if r != self.newest.fingerprint]
            seen = self.reads.coverage.last_seen([tls.serial]).get(tls.serial)
            last = max(t for t in (zone.last_seen, seen, tls.issued_at) if t is not None)
            found.append(
                _Zone(zone, older[0] if older else roots[0], tls.serial, tls.issued_at,
                      tls.not_after, last)
            )  # fmt: skip
        return found

    def _peer(self, view: PeerView) -> _Peer:
        """The newest of this server's active roots the peer has accepted."""
        listed: set[str] = set()
        if view.state is not None:
            for section in view.state.body.peers:
                if section.fqdn == self.fqdn:
                    listed = {r.fingerprint for r in section.roots}
        held = [r for r in self.roots if r.fingerprint in listed]
        if held:
            root = max(held, key=lambda r: r.number or 0).fingerprint
        else:  # it lists none of them yet: under the oldest, not moved
            root = min(self.roots, key=lambda r: r.number or 0).fingerprint
        return _Peer(view, root, root == self.newest.fingerprint)

    # -- counting ------------------------------------------------------------------------

    def intermediates_under(self, roots: Iterable[str]) -> list[str]:
        wanted = set(roots)
        return sorted(fp for fp, (root, _) in self.issuers.items() if root in wanted)

    def under(self, root: str) -> dict[str, int]:
        """The live components under `root`, by kind."""
        agents = sum(self.agents_by_issuer.get(i, 0) for i in self.intermediates_under([root]))
        return {
            AGENT: agents,
            ZONE_SERVER: sum(1 for z in self.zones if z.root == root),
            PEER: sum(1 for p in self.peers if p.root == root),
        }

    def live(self) -> dict[str, int]:
        counts = dict.fromkeys(COMPONENT_KINDS, 0)
        for root in self.roots:
            for kind, n in self.under(root.fingerprint).items():
                counts[kind] += n
        return counts

    def coverage_without(self, root: str) -> float:
        """The share of live components not under `root` (1 with no component)."""
        live = sum(self.live().values())
        if not live:
            return 1.0
        return (live - sum(self.under(root).values())) / live

    def stragglers(self, roots: Iterable[str], limit: int) -> tuple[list[Straggler], int]:
        """The live components under `roots`, slowest (oldest latest certificate)
        first, at most `limit` of them; and how many there are in all."""
        wanted = set(roots)
        total = sum(sum(self.under(r).values()) for r in wanted)
        found: list[Straggler] = []
        issuers = self.intermediates_under(wanted)
        for cert in self.reads.coverage.oldest_live(Role.AGENT, issuers, self.now, limit):
            root, issued_by = self.issuers[cert.issuer_fingerprint]
            seen = max(cert.last_seen, cert.issued_at) if cert.last_seen else cert.issued_at
            found.append(
                Straggler(AGENT, common_name(cert.subject), cert.serial, root, cert.issued_at,
                          cert.not_after, seen, issued_by)
            )  # fmt: skip
        for zone in self.zones:
            if zone.root in wanted:
                found.append(
                    Straggler(ZONE_SERVER, zone.zone.name, zone.tls_serial, zone.root,
                              zone.issued_at, zone.not_after, zone.last_seen, "server")
                )  # fmt: skip
        for peer in self.peers:
            if peer.root in wanted:
                record = peer.view.record
                found.append(
                    Straggler(PEER, record.fqdn, "", peer.root, record.trusted_at, None,
                              record.peer_updated_at or record.trusted_at, record.fqdn)
                )  # fmt: skip
        epoch = datetime.datetime.min.replace(tzinfo=datetime.UTC)
        # Stable: for the same time, agents in the order they were recorded.
        found.sort(key=lambda s: s.issued_at or epoch)
        return found[:limit], total

    def coverage(self, limit: int, min_coverage: float) -> Coverage:
        shares = tuple(
            RootShare(
                root,
                root.fingerprint == self.newest.fingerprint,
                self.under(root.fingerprint),
                self.coverage_without(root.fingerprint),
            )
            for root in self.roots
        )
        older = [r.fingerprint for r in self.roots if r.fingerprint != self.newest.fingerprint]
        stragglers, total = self.stragglers(older, limit)
        return Coverage(self.newest, shares, self.live(), tuple(stragglers), total, min_coverage)
