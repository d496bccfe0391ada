"""`keyplane tokens create`: enrollment tokens for agents and zone servers."""

from __future__ import annotations

import argparse
import re

from keyplane.clients.cli.output import print_json, timestamp
from keyplane.clients.client import KeyplaneClient


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


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    tokens = commands.add_parser("tokens", help="enrollment tokens")
    verbs = tokens.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "create", parents=[common], help="create a token (shown once, stored hashed)"
    )
    p.add_argument("--uses", type=int, default=1, help="enrollments it allows (default 1)")
    p.add_argument(
        "--ttl",
        type=parse_duration,
        default=86400,
        help="how long it is valid: 90s, 30m, 24h, 7d (default 24h)",
    )
    p.add_argument("--role", choices=["agent", "zone-server"], default="agent")
    p.set_defaults(call=cmd_tokens_create)
