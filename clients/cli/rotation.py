"""What root rotation looks like on the command line: `keyplane roots coverage`, the plan
`roots revoke --dry-run` prints (and a real revocation too), `keyplane rotation
forecast`, and the forecast a `settings set --dry-run` of a validity or window shows."""

from __future__ import annotations

import argparse
from typing import Any

from keyplane.clients.cli import positive_int
from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import KeyplaneClient
from keyplane.v1 import root_key_service_pb2, rotation_pb2

ROTATION_HELP = """\
The renewal load ahead. Every subordinate certificate renews by itself inside its
renewal window (settings PKI<Kind>KeyValidityHours / PKI<Kind>KeyRenewalWindowHours);
the forecast counts the renewals expected per hour from the live certificates and
those settings, and the burst a root rotation now would cause (every live component
renews onto the new root within seconds of seeing it), per endpoint.
"""

_KIND_NAMES = {
    rotation_pb2.COMPONENT_KIND_AGENT: "agent",
    rotation_pb2.COMPONENT_KIND_ZONE_SERVER: "zone-server",
    rotation_pb2.COMPONENT_KIND_PEER: "peer",
}
_VERDICTS = {
    rotation_pb2.GATE_VERDICT_PASSES: "passes",
    rotation_pb2.GATE_VERDICT_REFUSED: "refused",
    rotation_pb2.GATE_VERDICT_FORCED: "forced",
}


def _counts(value: rotation_pb2.ComponentCounts) -> dict[str, int]:
    return {
        "agents": value.agents,
        "zone_servers": value.zone_servers,
        "peers": value.peers,
        "total": value.total,
    }


def straggler_json(value: rotation_pb2.Straggler) -> dict[str, Any]:
    return {
        "kind": _KIND_NAMES.get(value.kind, "unspecified"),
        "name": value.name,
        "serial": value.serial or None,
        "root_fingerprint": value.root_fingerprint,
        "issued": timestamp(value.issue_time, value.HasField("issue_time")),
        "not_after": timestamp(value.not_after, value.HasField("not_after")),
        "last_seen": timestamp(value.last_seen_time, value.HasField("last_seen_time")),
        "issued_by": value.issued_by,
    }


def coverage_json(value: root_key_service_pb2.GetRootCoverageResponse) -> dict[str, Any]:
    """The `--json` form of `roots coverage` (documented in README)."""
    return {
        "newest_root_fingerprint": value.newest_root_fingerprint,
        "share": value.share,
        "min_coverage": value.min_coverage,
        "live": _counts(value.live),
        "moved": _counts(value.moved),
        "roots": [
            {
                "name": r.name,
                "fingerprint": r.fingerprint,
                "newest": r.newest,
                "components": _counts(r.components),
                "coverage_without": r.coverage_without,
            }
            for r in value.roots
        ],
        "stragglers_total": value.stragglers_total,
        "stragglers": [straggler_json(s) for s in value.stragglers],
    }


def _stragglers_table(stragglers: list[dict[str, Any]]) -> str:
    header = ["KIND", "NAME", "ROOT", "ISSUED", "LAST SEEN", "ISSUED BY"]
    rows = [
        [
            s["kind"],
            s["name"],
            s["root_fingerprint"][:16],
            (s["issued"] or "")[:19],
            (s["last_seen"] or "")[:19],
            s["issued_by"],
        ]
        for s in stragglers
    ]
    return table(rows, header)


def _components(counts: dict[str, int]) -> str:
    return (
        f"{counts['agents']} agents, {counts['zone_servers']} zone servers, {counts['peers']} peers"
    )


def print_coverage(data: dict[str, Any]) -> None:
    live, moved = data["live"], data["moved"]
    print(
        f"{moved['total']} of {live['total']} live components under the newest root "
        f"({data['share']:.1%}; revoking an older root asks for {data['min_coverage']:.1%})"
    )
    header = ["ROOT", "FINGERPRINT", "AGENTS", "ZONES", "PEERS", "WITHOUT IT"]
    rows = [
        [
            r["name"] + (" (newest)" if r["newest"] else ""),
            r["fingerprint"][:16],
            str(r["components"]["agents"]),
            str(r["components"]["zone_servers"]),
            str(r["components"]["peers"]),
            f"{r['coverage_without']:.1%}",
        ]
        for r in data["roots"]
    ]
    print(table(rows, header))
    if data["stragglers"]:
        shown, total = len(data["stragglers"]), data["stragglers_total"]
        print(f"\nnot moved yet ({shown} of {total}, the slowest first):")
        print(_stragglers_table(data["stragglers"]))


def cmd_roots_coverage(client: KeyplaneClient, args: argparse.Namespace) -> int:
    data = coverage_json(client.get_root_coverage(args.limit or 0))
    if args.json:
        print_json(data)
    else:
        print_coverage(data)
    return 0


def plan_json(plan: rotation_pb2.RevocationPlan) -> dict[str, Any]:
    """The `--json` form of a revocation plan (documented in README)."""
    return {
        "dry_run": plan.dry_run,
        "root_fingerprint": plan.root_fingerprint,
        "root_name": plan.root_name,
        "verdict": _VERDICTS.get(plan.verdict, "unspecified"),
        "coverage": plan.coverage,
        "min_coverage": plan.min_coverage,
        "keys": [{"kind": k.kind, "fingerprint": k.fingerprint, "name": k.name} for k in plan.keys],
        "certificates": {c.name: c.count for c in plan.certificates},
        "certificates_total": plan.certificates_total,
        "zones": [
            {"name": z.name, "intermediate": z.intermediate, "tls_certificate": z.tls_certificate}
            for z in plan.zones
        ],
        "identities": [
            {"name": i.name, "role": i.role, "serial": i.serial} for i in plan.identities
        ],
        "stranded": {c.name: c.count for c in plan.stranded},
        "stranded_total": plan.stranded_total,
        "first_stranded": [straggler_json(s) for s in plan.first_stranded],
        "peers": [
            {
                "fqdn": p.fqdn,
                "root_removed": p.root_removed,
                "roots_remaining": list(p.roots_remaining),
                "holds_newest_root": p.holds_newest_root,
                "agents_losing_chain": p.agents_losing_chain,
            }
            for p in plan.peers
        ],
    }


def print_plan(data: dict[str, Any]) -> None:
    would = "would revoke" if data["dry_run"] else "revoked"
    print(f"{would} {data['root_name']} sha256:{data['root_fingerprint']}")
    keys = ", ".join(f"{k['kind']} {k['fingerprint'][:16]}" for k in data["keys"])
    print(f"  keys ({len(data['keys'])}): {keys}")
    roles = ", ".join(f"{n} {role}" for role, n in data["certificates"].items()) or "none"
    print(f"  certificates ({data['certificates_total']}): {roles}")
    for zone in data["zones"]:
        parts = (
            ("intermediate", zone["intermediate"]),
            ("TLS certificate", zone["tls_certificate"]),
        )
        lost = [what for what, gone in parts if gone]
        print(f"  zone {zone['name']} loses its {' and '.join(lost)} and must enroll again")
    for person in data["identities"]:
        print(f"  credential of {person['name']} ({person['role']}) revoked")
    stranded = ", ".join(f"{n} {kind}" for kind, n in data["stranded"].items() if n) or "none"
    print(f"  stranded, not moved to another root ({data['stranded_total']}): {stranded}")
    for peer in data["peers"]:
        holds = "holds" if peer["holds_newest_root"] else "does not hold yet"
        print(
            f"  peer {peer['fqdn']}: drops this root at its next update, {holds} the newest "
            f"root; {peer['agents_losing_chain']} agents lose their chain there"
        )
    print(
        f"  coverage left: {data['coverage']:.1%} (minimum {data['min_coverage']:.1%}): "
        f"gate {data['verdict']}"
    )
    if data["first_stranded"]:
        print(_stragglers_table(data["first_stranded"]))


def summary_json(value: rotation_pb2.ForecastSummary) -> dict[str, Any]:
    return {
        "peak_hour": timestamp(value.peak_hour_start, value.HasField("peak_hour_start")),
        "peak_hour_renewals": value.peak_hour_renewals,
        "total": value.total,
        "totals": {k.kind: k.renewals for k in value.totals},
    }


def forecast_json(value: rotation_pb2.RotationForecast) -> dict[str, Any]:
    """The `--json` form of `rotation forecast` (documented in README)."""
    burst = value.root_rotation_burst
    return {
        "start": timestamp(value.start_time),
        "summary": summary_json(value.summary),
        "hours": [
            {
                "start": timestamp(h.start_time),
                "total": h.total,
                "renewals": {k.kind: k.renewals for k in h.renewals},
            }
            for h in value.hours
        ],
        "root_rotation_burst": {
            "spread_seconds": burst.spread_seconds,
            "components": burst.components,
            "peak_per_second": burst.peak_per_second,
            "endpoints": [
                {
                    "endpoint": e.endpoint,
                    "components": e.components,
                    "peak_per_second": e.peak_per_second,
                }
                for e in burst.endpoints
            ],
        },
    }


def _summary_line(data: dict[str, Any]) -> str:
    return (
        f"{data['total']:.1f} renewals, the busiest hour {(data['peak_hour'] or '')[:16]} "
        f"with {data['peak_hour_renewals']:.1f}"
    )


def cmd_rotation_forecast(client: KeyplaneClient, args: argparse.Namespace) -> int:
    data = forecast_json(client.get_rotation_forecast(args.hours or 0))
    if args.json:
        print_json(data)
        return 0
    print(f"next {len(data['hours'])} hours: {_summary_line(data['summary'])}")
    rows = [
        [
            (h["start"] or "")[:16],
            f"{h['total']:.1f}",
            ", ".join(f"{kind} {n:.1f}" for kind, n in h["renewals"].items()),
        ]
        for h in data["hours"]
        if h["total"] >= 0.05 or args.all
    ]
    if rows:
        print(table(rows, ["HOUR (UTC)", "RENEWALS", "BY KIND"]))
    burst = data["root_rotation_burst"]
    print(
        f"\na root rotation now: {burst['components']} components renew within "
        f"{burst['spread_seconds']:g} s, {burst['peak_per_second']:.0f} per second at peak"
    )
    print(
        table(
            [
                [e["endpoint"], str(e["components"]), f"{e['peak_per_second']:.0f}"]
                for e in burst["endpoints"]
            ],
            ["ENDPOINT", "COMPONENTS", "PER SECOND"],
        )
    )
    return 0


def print_setting_trial(
    name: str, value: str, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> None:
    """What `settings set --dry-run` prints."""
    print(f"{name} = {value} (dry run: not saved)")
    if before is not None and after is not None:
        print(f"  the next 72 hours now:  {_summary_line(before)}")
        print(f"  with {value}: {_summary_line(after)}")


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    rotation = commands.add_parser(
        "rotation",
        help="the renewal load ahead, and what a root rotation would cause",
        description=ROTATION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = rotation.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "forecast", parents=[common], help="renewals expected per hour, and a root rotation's burst"
    )
    p.add_argument("--hours", type=positive_int, help="how far ahead (default 72, at most 720)")
    p.add_argument("--all", action="store_true", help="list the hours without renewals too")
    p.set_defaults(call=cmd_rotation_forecast)
