"""`keyplane audit list|verify`: the server's audit log (admin and auditor)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from google.protobuf import timestamp_pb2

from keyplane.clients.cli import PROG
from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.cli.tokens import parse_duration
from keyplane.clients.client import KeyplaneClient
from keyplane.v1 import audit_service_pb2

# `audit verify` exits with this when the chain is broken (1 is a failed call).
BROKEN_EXIT = 3

AUDIT_HELP = """\
The audit log: every change, every reveal of a protected setting and every refused
call, each event with its time, actor (name and certificate fingerprint), action,
target, the key fingerprints before and after, and its outcome; never a secret. It is
append-only and hash-chained: each event's hash covers its fields and the previous
event's hash, so 'keyplane audit verify' finds an event edited, inserted or removed
behind keyplane's back. Needs the admin or auditor role.
"""

LIST_HELP = """\
List audit events, newest first, paging through the server as far as --limit asks.
--since and --until take an ISO 8601 time (2026-12-01T08:00:00Z, 2026-12-01) or an
age (90m, 24h, 7d: that long ago); --actor a certificate fingerprint, a full actor
name or a common name; --action an action such as certificate.revoke or
access.refused. --json gives every field, details included.

examples:
  keyplane audit list --since 24h
  keyplane audit list --action access.refused --limit 20 --json
  keyplane audit list --actor admin@pki.example.org --since 2026-12-01
"""

VERIFY_HELP = f"""\
Walk the whole hash chain, oldest first, and check each event against its own hash,
the previous event's, and the newest event the server recorded. Prints how many events
it checked; if the chain is broken, names the first event edited, inserted or missing
and exits with status {BROKEN_EXIT}.

example:
  keyplane audit verify
"""


def parse_time(text: str) -> datetime.datetime:
    """An ISO 8601 time (UTC if it names no zone), or an age such as 24h: that long ago."""
    try:
        seconds = parse_duration(text)
    except argparse.ArgumentTypeError:
        pass
    else:
        return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
    try:
        value = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use e.g. 2026-12-01T08:00:00Z, 2026-12-01 or 24h)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (0 or more)")
    return value


def _proto_time(value: datetime.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(datetime.UTC).replace(tzinfo=None))
    return ts


def event_json(event: audit_service_pb2.AuditEvent) -> dict[str, Any]:
    """The `--json` form of an audit event (documented in README)."""
    return {
        "id": event.id,
        "time": timestamp(event.time),
        "actor": event.actor,
        "actor_fingerprint": event.actor_fingerprint or None,
        "action": event.action,
        "target": event.target,
        "before_fingerprint": event.before_fingerprint or None,
        "after_fingerprint": event.after_fingerprint or None,
        "outcome": event.outcome,
        "details": json.loads(event.details_json or "{}"),
        "hash": event.hash,
    }


def cmd_audit_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    request = audit_service_pb2.ListAuditEventsRequest(
        since=_proto_time(args.since) if args.since else None,
        until=_proto_time(args.until) if args.until else None,
        actor=args.actor or "",
        action=args.action or "",
    )
    events = [event_json(e) for e in client.audit_events(request, args.limit)]
    if args.json:
        print_json(events)
        return 0
    header = ["ID", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"]
    rows = [
        [str(e["id"]), (e["time"] or "")[:19], e["actor"], e["action"], e["target"], e["outcome"]]
        for e in events
    ]
    print(table(rows, header))
    return 0


_KINDS = {
    audit_service_pb2.AuditChainProblem.KIND_EDITED: "edited",
    audit_service_pb2.AuditChainProblem.KIND_INSERTED: "inserted",
    audit_service_pb2.AuditChainProblem.KIND_MISSING: "missing",
}


def cmd_audit_verify(client: KeyplaneClient, args: argparse.Namespace) -> int:
    report = client.verify_audit_log()
    problem = (
        {
            "kind": _KINDS.get(report.problem.kind, "unknown"),
            "event_id": report.problem.event_id,
            "detail": report.problem.detail,
        }
        if report.HasField("problem")
        else None
    )
    if args.json:
        print_json(
            {
                "intact": report.intact,
                "events_checked": report.events_checked,
                "head_id": report.head_id,
                "head_hash": report.head_hash,
                "problem": problem,
            }
        )
    elif problem is None:
        print(
            f"the audit log is intact: {report.events_checked} events checked, the newest "
            f"is event {report.head_id} (hash {report.head_hash})"
        )
    if problem is not None:
        print(
            f"{PROG}: the audit log is broken at event {problem['event_id']}: "
            f"{problem['kind']} ({problem['detail']}); {report.events_checked} events checked",
            file=sys.stderr,
        )
        return BROKEN_EXIT
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    audit = commands.add_parser(
        "audit",
        help="read and verify the audit log",
        description=AUDIT_HELP,
        formatter_class=raw,
    )
    verbs = audit.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "list",
        parents=[common],
        help="audit events, newest first, filtered",
        description=LIST_HELP,
        formatter_class=raw,
    )
    p.add_argument("--since", type=parse_time, help="from this time on (ISO 8601, or 24h ago)")
    p.add_argument("--until", type=parse_time, help="before this time (ISO 8601, or 1h ago)")
    p.add_argument("--actor", help="a certificate fingerprint, actor name or common name")
    p.add_argument("--action", help="e.g. certificate.issue, setting.reveal, access.refused")
    p.add_argument(
        "--limit", type=_count, default=100, help="at most this many events (default 100; 0: all)"
    )
    p.set_defaults(call=cmd_audit_list)
    p = verbs.add_parser(
        "verify",
        parents=[common],
        help="check the hash chain; name the first event edited, inserted or missing",
        description=VERIFY_HELP,
        formatter_class=raw,
    )
    p.set_defaults(call=cmd_audit_verify)
