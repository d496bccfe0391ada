"""`keyplane tokens create|list|revoke`: enrollment tokens for agents and zone servers."""

from __future__ import annotations

import argparse
import re
from typing import Any

from keyplane.clients.cli import positive_int
from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import KeyplaneClient
from keyplane.v1 import certificate_service_pb2

CREATE_HELP = """\
Create an enrollment token and print it: it is shown this once and stored only as a
hash. Agents (or zone servers, --role zone-server) enroll with it until its uses are
spent or it expires or is revoked.

example:
  keyplane tokens create --uses 50 --ttl 7d
"""

LIST_HELP = """\
List enrollment tokens, newest first: id, role, state, uses left of uses, expiry and
who created them. Only usable ones unless --all (spent, expired and revoked too). A
token's secret is shown once, by 'tokens create', and never again: the id is the first
16 hex digits of its SHA-256, as the audit log names it.

examples:
  keyplane tokens list
  keyplane tokens list --all --json
"""

REVOKE_HELP = """\
Revoke an enrollment token by its id: no enrollment can use it from now on, whatever
uses it has left (an enrollment already under way that has not spent its use yet is
refused). Audited. Needs the admin or operator role.

example:
  keyplane tokens revoke 3f9c2a1b7d4e6f08
"""


def parse_duration(text: str) -> int:
    """Seconds in '90s', '30m', '24h', '7d' or a plain number of seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 30m, 24h, 7d)")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def cmd_tokens_create(client: KeyplaneClient, args: argparse.Namespace) -> int:
    token = client.create_enrollment_token(args.uses, args.ttl, args.role)
    if args.json:
        print_json(
            {
                "token": token.token,
                "token_id": token.token_id,
                "role": token.role,
                "uses": token.uses,
                "expires": timestamp(token.expire_time),
            }
        )
    else:
        print(token.token)
    return 0


def token_json(token: certificate_service_pb2.EnrollmentToken) -> dict[str, Any]:
    """The `--json` form of a listed token (documented in README); never its secret."""
    return {
        "token_id": token.token_id,
        "role": token.role,
        "state": token.state,
        "uses": token.uses,
        "uses_left": token.uses_left,
        "expires": timestamp(token.expire_time),
        "created": timestamp(token.create_time),
        "created_by": token.created_by,
        "revoked": timestamp(token.revoke_time, token.HasField("revoke_time")),
        "revoked_by": token.revoked_by or None,
    }


def cmd_tokens_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    tokens = [token_json(t) for t in client.list_enrollment_tokens(include_unusable=args.all)]
    if args.json:
        print_json(tokens)
        return 0
    header = ["ID", "ROLE", "STATE", "USES LEFT", "EXPIRES", "CREATED BY"]
    rows = [
        [
            t["token_id"],
            t["role"],
            t["state"],
            f"{t['uses_left']}/{t['uses']}",
            (t["expires"] or "")[:19],
            t["created_by"],
        ]
        for t in tokens
    ]
    print(table(rows, header))
    return 0


def cmd_tokens_revoke(client: KeyplaneClient, args: argparse.Namespace) -> int:
    token = token_json(client.revoke_enrollment_token(args.token_id))
    if args.json:
        print_json(token)
    else:
        print(
            f"revoked token {token['token_id']} ({token['role']}, "
            f"{token['uses_left']} of {token['uses']} uses left)"
        )
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    tokens = commands.add_parser("tokens", help="enrollment tokens")
    verbs = tokens.add_subparsers(dest="verb", metavar="VERB", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    p = verbs.add_parser(
        "create",
        parents=[common],
        help="create a token (shown once, stored hashed)",
        description=CREATE_HELP,
        formatter_class=raw,
    )
    p.add_argument("--uses", type=positive_int, default=1, help="enrollments it allows (default 1)")
    p.add_argument(
        "--ttl",
        type=parse_duration,
        default=86400,
        help="how long it is valid: 90s, 30m, 24h, 7d (default 24h)",
    )
    p.add_argument("--role", choices=["agent", "zone-server"], default="agent")
    p.set_defaults(call=cmd_tokens_create)
    p = verbs.add_parser(
        "list",
        parents=[common],
        help="tokens by id, role, state and uses left; never their secret",
        description=LIST_HELP,
        formatter_class=raw,
    )
    p.add_argument("--all", action="store_true", help="also spent, expired and revoked tokens")
    p.set_defaults(call=cmd_tokens_list)
    p = verbs.add_parser(
        "revoke",
        parents=[common],
        help="make a token unusable at once",
        description=REVOKE_HELP,
        formatter_class=raw,
    )
    p.add_argument("token_id", metavar="ID", help="the token's id, as 'tokens list' shows")
    p.set_defaults(call=cmd_tokens_revoke)
