"""What revoking a root does, worked out before it is done: the keys and certificates
it revokes, the zones that lose their intermediate or TLS certificate, the people's
credentials that go, the live components it strands (they have not moved to another
root), what each trusted peer would see, and the gate's verdict.

A dry run answers this plan and changes nothing; a real revocation works it out with
the same code inside its own transaction, does it, and answers it: what the dry run
said is what the revocation does, unless something changed in between.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass

from keyplane.server.domain.coverage import (
    AGENT,
    COMPONENT_KINDS,
    Fleet,
    Straggler,
    common_name,
)
from keyplane.server.errors import FailedPrecondition
from keyplane.server.kinds import HUMAN_ROLES, LIVE_STATES, KeyKind, KeyState
from keyplane.server.store import KeyRecord
from keyplane.server.store.reads import Reads

# The kinds a root issues that go with it when it is revoked.
ISSUED_BY_ROOTS = (
    KeyKind.SERVER_TLS,
    KeyKind.INTERMEDIATE_TLS,
    KeyKind.MESSAGE_SIGNING,
    KeyKind.ZONE_INTERMEDIATE,
)
# How many stranded components a plan lists (the count is always complete).
FIRST_STRANDED = 20
# How many stragglers a refusal names.
NAMED_IN_REFUSAL = 5


class Verdict(enum.StrEnum):
    """The revocation gate's answer."""

    PASSES = "passes"
    REFUSED = "refused"
    FORCED = "forced"


class CoverageBelowMinimum(FailedPrecondition):
    """Too few live components have moved off the root: wait, or force (a compromise)."""

    reason = "ROOT_COVERAGE_BELOW_MINIMUM"


@dataclass(frozen=True)
class ZoneLoss:
    """A zone server that loses its current intermediate or TLS certificate."""

    name: str
    intermediate: bool
    tls_certificate: bool


@dataclass(frozen=True)
class IdentityLoss:
    """A person's credential that is revoked."""

    name: str
    role: str
    serial: str


@dataclass(frozen=True)
class PeerImpact:
    """What a trusted peer would see."""

    fqdn: str
    root_removed: str
    roots_remaining: tuple[str, ...]
    holds_newest_root: bool
    agents_losing_chain: int


@dataclass(frozen=True)
class RevocationPlan:
    """What revoking `root` does (see the module docstring)."""

    dry_run: bool
    root: KeyRecord
    keys: tuple[KeyRecord, ...]
    certificates: dict[str, int]
    zones: tuple[ZoneLoss, ...]
    identities: tuple[IdentityLoss, ...]
    stranded: dict[str, int]
    first_stranded: tuple[Straggler, ...]
    peers: tuple[PeerImpact, ...]
    coverage: float
    min_coverage: float
    verdict: Verdict
    newest: KeyRecord

    @property
    def certificates_total(self) -> int:
        return sum(self.certificates.values())

    @property
    def stranded_total(self) -> int:
        return sum(self.stranded.values())

    @property
    def subordinates(self) -> tuple[KeyRecord, ...]:
        return tuple(k for k in self.keys if k.fingerprint != self.root.fingerprint)

    def refusal(self) -> CoverageBelowMinimum:
        """The gate's refusal: the figures and the first stragglers' names."""
        live = self.stranded_total
        named = [f"{s.name} ({s.kind})" for s in self.first_stranded[:NAMED_IN_REFUSAL]]
        more = self.stranded_total - len(named)
        names = ", ".join(named) + (f" and {more} more" if more > 0 else "")
        return CoverageBelowMinimum(
            f"{self.root.name} still carries {live} live component(s) that have not moved to "
            f"{self.newest.name}: revoking it now leaves {self.coverage:.1%} of live components "
            f"with a chain, below PKIRootRevocationMinCoverage ({self.min_coverage:.1%}). Not "
            f"moved yet: {names}. Wait until they renew ('keyplane roots coverage'), or, for a "
            "compromised key, revoke at once with force (--force)"
        )


def plan_revocation(
    reads: Reads,
    fqdn: str,
    root: KeyRecord,
    now: datetime.datetime,
    min_coverage: float,
    force: bool,
    dry_run: bool,
) -> RevocationPlan:
    """The plan of revoking `root`, read through `reads` (inside the revocation's
    transaction, for a real one)."""
    fleet = Fleet(reads, fqdn, now)
    subordinates = [
        k
        for kind in ISSUED_BY_ROOTS
        for k in reads.keys(kind, LIVE_STATES)
        if k.issuer_fingerprint == root.fingerprint
    ]
    issuers = [root.fingerprint, *(k.fingerprint for k in subordinates)]
    people = reads.coverage.unrevoked_of_roles(issuers, sorted(HUMAN_ROLES))
    stranded = fleet.under(root.fingerprint)
    first, _ = fleet.stragglers([root.fingerprint], FIRST_STRANDED)
    coverage = fleet.coverage_without(root.fingerprint)
    if coverage >= min_coverage:
        verdict = Verdict.PASSES
    else:
        verdict = Verdict.FORCED if force else Verdict.REFUSED
    remaining = tuple(r.fingerprint for r in fleet.roots if r.fingerprint != root.fingerprint)
    return RevocationPlan(
        dry_run=dry_run,
        root=root,
        keys=(root, *subordinates),
        certificates=reads.coverage.unrevoked_by_role(issuers),
        zones=_zone_losses(reads, root, subordinates),
        identities=tuple(
            IdentityLoss(common_name(subject), role, serial) for serial, subject, role in people
        ),
        stranded={kind: stranded[kind] for kind in COMPONENT_KINDS},
        first_stranded=tuple(first),
        peers=tuple(
            PeerImpact(
                peer.view.fqdn,
                root.fingerprint,
                remaining,
                peer.holds_newest,
                stranded[AGENT],
            )
            for peer in fleet.peers
        ),
        coverage=coverage,
        min_coverage=min_coverage,
        verdict=verdict,
        newest=fleet.newest,
    )


def _zone_losses(
    reads: Reads, root: KeyRecord, subordinates: list[KeyRecord]
) -> tuple[ZoneLoss, ...]:
    """The live zones whose active intermediate or current TLS certificate the root issued."""
    revoked = {
        k.key_uri
        for k in subordinates
        if k.kind == KeyKind.ZONE_INTERMEDIATE and k.state == KeyState.ACTIVE
    }
    losses = []
    for zone in reads.zones():
        tls = reads.certificate(zone.tls_serial) if zone.tls_serial else None
        loses_tls = (
            tls is not None
            and tls.revoked_at is None
            and tls.issuer_fingerprint == root.fingerprint
        )
        if zone.key_uri in revoked or loses_tls:
            losses.append(ZoneLoss(zone.name, zone.key_uri in revoked, loses_tls))
    return tuple(losses)
