"""`keyplane zones list|show|revoke`: the zone servers the server knows (admin)."""

from __future__ import annotations

import argparse
from typing import Any

from keyplane.clients.cli import CONFIRM_HINTS
from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import KeyplaneClient
from keyplane.v1 import zone_service_pb2

ZONES_HELP = """\
Zone servers: relays close to their clients that sign their agents' certificates with
their own intermediate (see 'keyplane zone serve'). A zone is known by its enrolled key
and certificate; its name is how you refer to it here.
"""

LIST_HELP = """\
List the live zone servers: name, state, mutual-TLS listener, when each last called the
server, when its current intermediate expires, and how many certificates it issued.
--all adds the revoked ones; --json gives every field.

example:
  keyplane zones list --all
"""

SHOW_HELP = """\
Show one zone server by name: the live one, else the newest revoked one of that name.

example:
  keyplane zones show zone1 --json
"""

REVOKE_HELP = """\
Revoke a zone server for good: its intermediate and every certificate it issued are
revoked, as are its own TLS certificates, published in the trust state before this
command returns. Every component refuses them from then on; its agents stop and must
enroll again with a new token (through another zone, or the server). Needs --reason
(kept in the audit log) and --yes.

example:
  keyplane zones revoke zone1 --reason "host decommissioned" --yes
"""


def zone_json(zone: zone_service_pb2.ZoneServer) -> dict[str, Any]:
    """The `--json` form of a zone server (documented in README)."""
    return {
        "name": zone.name,
        "state": zone.state,
        "listen": zone.listen,
        "bootstrap_listen": zone.bootstrap_listen,
        "registered": timestamp(zone.registered_time, zone.HasField("registered_time")),
        "last_seen": timestamp(zone.last_seen_time, zone.HasField("last_seen_time")),
        "intermediate_fingerprint": zone.intermediate_fingerprint or None,
        "intermediate_not_after": timestamp(
            zone.intermediate_not_after, zone.HasField("intermediate_not_after")
        ),
        "tls_serial": zone.tls_serial or None,
        "certificates_issued": zone.certificates_issued,
        "revoked": timestamp(zone.revoke_time, zone.HasField("revoke_time")),
        "revoked_by": zone.revoked_by or None,
        "revoke_reason": zone.revoke_reason or None,
    }


def _print_zone(data: dict[str, Any]) -> None:
    for key, value in data.items():
        if value is not None:
            print(f"{key + ':':26}{value}")


def cmd_zones_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    zones = [zone_json(z) for z in client.list_zone_servers(include_revoked=args.all)]
    if args.json:
        print_json(zones)
        return 0
    header = ["NAME", "STATE", "LISTEN", "LAST SEEN", "INTERMEDIATE NOT AFTER", "ISSUED"]
    rows = [
        [
            z["name"],
            z["state"],
            z["listen"],
            (z["last_seen"] or "never")[:19],
            (z["intermediate_not_after"] or "")[:19],
            str(z["certificates_issued"]),
        ]
        for z in zones
    ]
    print(table(rows, header))
    return 0


def cmd_zones_show(client: KeyplaneClient, args: argparse.Namespace) -> int:
    zone = zone_json(client.get_zone_server(args.name))
    if args.json:
        print_json(zone)
    else:
        _print_zone(zone)
    return 0


def cmd_zones_revoke(client: KeyplaneClient, args: argparse.Namespace) -> int:
    zone = zone_json(client.revoke_zone_server(args.name, args.reason, args.yes))
    if args.json:
        print_json(zone)
    else:
        print(
            f"revoked zone server {zone['name']} and the {zone['certificates_issued']} "
            f"certificates it issued: {zone['revoke_reason']}"
        )
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    zones = commands.add_parser(
        "zones", help="list, show and revoke zone servers", description=ZONES_HELP
    )
    verbs = zones.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "list",
        parents=[common],
        help="the zone servers, live ones (--all: revoked ones too)",
        description=LIST_HELP,
        formatter_class=raw,
    )
    p.add_argument("--all", action="store_true", help="also list revoked zone servers")
    p.set_defaults(call=cmd_zones_list)
    p = verbs.add_parser(
        "show",
        parents=[common],
        help="one zone server and everything known of it",
        description=SHOW_HELP,
        formatter_class=raw,
    )
    p.add_argument("name", help="the zone server's name (as 'zones list' shows)")
    p.set_defaults(call=cmd_zones_show)
    p = verbs.add_parser(
        "revoke",
        parents=[common],
        help="revoke a zone server, its intermediate and everything it issued, for good",
        description=REVOKE_HELP,
        formatter_class=raw,
    )
    p.add_argument("name", help="the live zone server's name")
    p.add_argument("--reason", required=True, help="why; kept in the audit log")
    p.add_argument(
        "--yes", action="store_true", help="confirm: the zone and what it issued are revoked"
    )
    p.set_defaults(call=cmd_zones_revoke, hints=CONFIRM_HINTS)
