"""Conversions of root coverage, revocation plans and the renewal forecast to their
keyplane.v1 messages (rotation.proto)."""

from __future__ import annotations

from keyplane.server.domain.coverage import AGENT, PEER, ZONE_SERVER, Coverage, Straggler
from keyplane.server.domain.forecast import Forecast, Summary
from keyplane.server.domain.revocation_plan import RevocationPlan, Verdict
from keyplane.server.services.convert import timestamp
from keyplane.v1 import root_key_service_pb2, rotation_pb2

_KINDS = {
    AGENT: rotation_pb2.COMPONENT_KIND_AGENT,
    ZONE_SERVER: rotation_pb2.COMPONENT_KIND_ZONE_SERVER,
    PEER: rotation_pb2.COMPONENT_KIND_PEER,
}
_VERDICTS = {
    Verdict.PASSES: rotation_pb2.GATE_VERDICT_PASSES,
    Verdict.REFUSED: rotation_pb2.GATE_VERDICT_REFUSED,
    Verdict.FORCED: rotation_pb2.GATE_VERDICT_FORCED,
}


def counts(components: dict[str, int]) -> rotation_pb2.ComponentCounts:
    return rotation_pb2.ComponentCounts(
        agents=components.get(AGENT, 0),
        zone_servers=components.get(ZONE_SERVER, 0),
        peers=components.get(PEER, 0),
        total=sum(components.values()),
    )


def straggler(value: Straggler) -> rotation_pb2.Straggler:
    return rotation_pb2.Straggler(
        kind=_KINDS[value.kind],
        name=value.name,
        serial=value.serial,
        root_fingerprint=value.root_fingerprint,
        issue_time=timestamp(value.issued_at),
        not_after=timestamp(value.not_after),
        last_seen_time=timestamp(value.last_seen),
        issued_by=value.issued_by,
    )


def coverage(value: Coverage) -> root_key_service_pb2.GetRootCoverageResponse:
    return root_key_service_pb2.GetRootCoverageResponse(
        roots=[
            rotation_pb2.RootCoverage(
                fingerprint=share.root.fingerprint,
                name=share.root.name,
                newest=share.newest,
                components=counts(share.components),
                coverage_without=share.coverage_without,
            )
            for share in value.roots
        ],
        newest_root_fingerprint=value.newest.fingerprint,
        live=counts(value.live),
        moved=counts(value.moved),
        share=value.share,
        stragglers=[straggler(s) for s in value.stragglers],
        stragglers_total=value.straggler_count,
        min_coverage=value.min_coverage,
    )


def _named(values: dict[str, int]) -> list[rotation_pb2.NamedCount]:
    return [rotation_pb2.NamedCount(name=n, count=c) for n, c in values.items()]


def plan(value: RevocationPlan) -> rotation_pb2.RevocationPlan:
    return rotation_pb2.RevocationPlan(
        dry_run=value.dry_run,
        root_fingerprint=value.root.fingerprint,
        root_name=value.root.name,
        keys=[
            rotation_pb2.PlannedKey(kind=k.kind, fingerprint=k.fingerprint, name=k.name)
            for k in value.keys
        ],
        certificates=_named(value.certificates),
        certificates_total=value.certificates_total,
        zones=[
            rotation_pb2.ZoneLoss(
                name=z.name, intermediate=z.intermediate, tls_certificate=z.tls_certificate
            )
            for z in value.zones
        ],
        identities=[
            rotation_pb2.IdentityLoss(name=i.name, role=i.role, serial=i.serial)
            for i in value.identities
        ],
        stranded=_named(value.stranded),
        stranded_total=value.stranded_total,
        first_stranded=[straggler(s) for s in value.first_stranded],
        peers=[
            rotation_pb2.PeerImpact(
                fqdn=p.fqdn,
                root_removed=p.root_removed,
                roots_remaining=list(p.roots_remaining),
                holds_newest_root=p.holds_newest_root,
                agents_losing_chain=p.agents_losing_chain,
            )
            for p in value.peers
        ],
        coverage=value.coverage,
        min_coverage=value.min_coverage,
        verdict=_VERDICTS[value.verdict],
    )


def _kinds(values: dict[str, float]) -> list[rotation_pb2.KindCount]:
    return [rotation_pb2.KindCount(kind=k, renewals=v) for k, v in values.items() if v]


def summary(value: Summary) -> rotation_pb2.ForecastSummary:
    return rotation_pb2.ForecastSummary(
        peak_hour_start=timestamp(value.peak_start),
        peak_hour_renewals=value.peak_renewals,
        total=value.total,
        totals=_kinds(value.totals),
    )


def forecast(value: Forecast) -> rotation_pb2.RotationForecast:
    burst = value.burst
    return rotation_pb2.RotationForecast(
        start_time=timestamp(value.start),
        hours=[
            rotation_pb2.ForecastHour(
                start_time=timestamp(h.start), renewals=_kinds(h.renewals), total=h.total
            )
            for h in value.hours
        ],
        summary=summary(value.summary),
        root_rotation_burst=rotation_pb2.RotationBurst(
            spread_seconds=burst.spread_seconds,
            endpoints=[
                rotation_pb2.EndpointBurst(
                    endpoint=name, components=n, peak_per_second=burst.peak_per_second(n)
                )
                for name, n in burst.endpoints
            ],
            components=burst.components,
            peak_per_second=burst.peak_per_second(burst.components),
        ),
    )
