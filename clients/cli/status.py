"""`keyplane status`: the server at a glance."""

from __future__ import annotations

import argparse
from typing import Any

from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import KeyplaneClient
from keyplane.v1 import status_service_pb2

STATUS_HELP = """\
Show whether the server serves (its key backends answer: an HSM that does not makes it
NOT_SERVING), its active roots, the keys whose certificates expire next, its zone
servers and when each last called, and the last backup. Admins, operators and
auditors may ask; it changes nothing. Exit status 0 while it serves, 4 when it does not
(a script or a monitor can test that), 1 when it cannot be asked.

example:
  keyplane status
  keyplane status --json --expiries 10
"""

EXIT_NOT_SERVING = 4


def status_json(status: status_service_pb2.GetServerStatusResponse) -> dict[str, Any]:
    """The `--json` form (documented in README)."""
    last = status.last_backup
    return {
        "serving": status.serving,
        "problems": list(status.problems),
        "server": status.server,
        "version": status.version,
        "now": timestamp(status.now, status.HasField("now")),
        "trust_state_version": status.trust_state_version,
        "backends": [
            {"backend": b.backend, "up": b.up, "problem": b.problem or None}
            for b in status.backends
        ],
        "roots": [
            {
                "name": r.name,
                "fingerprint": r.fingerprint,
                "backend": r.backend,
                "created": timestamp(r.create_time, r.HasField("create_time")),
            }
            for r in status.roots
        ],
        "next_expiries": [
            {
                "kind": e.kind,
                "name": e.name,
                "fingerprint": e.fingerprint,
                "state": e.state,
                "not_after": timestamp(e.not_after, e.HasField("not_after")),
            }
            for e in status.next_expiries
        ],
        "zones": [
            {
                "name": z.name,
                "last_seen": timestamp(z.last_seen, z.HasField("last_seen")),
                "intermediate_not_after": timestamp(
                    z.intermediate_not_after, z.HasField("intermediate_not_after")
                ),
            }
            for z in status.zones
        ],
        "last_backup": {
            "created": timestamp(last.create_time, last.HasField("create_time")),
            "actor": last.actor,
            "size_bytes": last.size_bytes,
            "keys": last.keys,
            "trust_state_version": last.trust_state_version,
        }
        if status.HasField("last_backup")
        else None,
    }


def _print_text(data: dict[str, Any]) -> None:
    health = "SERVING" if data["serving"] else "NOT_SERVING"
    print(f"server:       {data['server']} (keyplane {data['version']})")
    print(f"health:       {health}")
    for problem in data["problems"]:
        print(f"  problem:    {problem}")
    backends = ", ".join(f"{b['backend']} {'up' if b['up'] else 'DOWN'}" for b in data["backends"])
    print(f"backends:     {backends}")
    print(f"trust state:  version {data['trust_state_version']}")
    last = data["last_backup"]
    if last is None:
        print("last backup:  never (keyplane backup create --out FILE)")
    else:
        print(
            f"last backup:  {(last['created'] or '')[:19]} by {last['actor']} "
            f"({last['keys']} keys, {last['size_bytes']} bytes)"
        )
    print()
    print(
        table(
            [[r["name"], r["fingerprint"], r["backend"]] for r in data["roots"]],
            ["ROOT", "FINGERPRINT", "BACKEND"],
        )
    )
    print()
    rows = [
        [(e["not_after"] or "")[:19], e["kind"], e["state"], e["fingerprint"][:16], e["name"]]
        for e in data["next_expiries"]
    ]
    print(table(rows, ["EXPIRES", "KIND", "STATE", "FINGERPRINT", "NAME"]))
    if data["zones"]:
        print()
        zone_rows = [
            [z["name"], (z["last_seen"] or "never")[:19], (z["intermediate_not_after"] or "")[:19]]
            for z in data["zones"]
        ]
        print(table(zone_rows, ["ZONE", "LAST SEEN", "INTERMEDIATE NOT AFTER"]))


def cmd_status(client: KeyplaneClient, args: argparse.Namespace) -> int:
    data = status_json(client.get_server_status(args.expiries))
    if args.json:
        print_json(data)
    else:
        _print_text(data)
    return 0 if data["serving"] else EXIT_NOT_SERVING


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    p = commands.add_parser(
        "status",
        parents=[common],
        help="health, roots, next expiries, zones and the last backup",
        description=STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--expiries",
        type=int,
        default=0,
        metavar="N",
        help="list the N keys that expire next (default 5, at most 100)",
    )
    p.set_defaults(call=cmd_status)
