"""`keyplane keys list|rotate`: the subordinate keys (server TLS, intermediate TLS,
message signing)."""

from __future__ import annotations

import argparse
from typing import Any

from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import ALGORITHM_NAMES, KEY_KIND_NAMES, KEY_KINDS, KeyplaneClient
from keyplane.v1 import key_service_pb2

KEYS_HELP = """\
Subordinate keys: the server's TLS key, the intermediate TLS key (signs client
certificates) and the message-signing key. Each rotates by itself when it enters its
renewal window (settings PKI<Kind>KeyValidityHours / PKI<Kind>KeyRenewalWindowHours):
the new key is published in the trust state before it is used, and the old one stays
trusted until it expires. Kinds: server-tls, intermediate-tls, message-signing.
'keys list' also shows how many signatures each key has made and when it last signed
(counted by every server process and recorded every few seconds).
"""


def key_json(key: key_service_pb2.Key) -> dict[str, Any]:
    """The `--json` form of a subordinate key (documented in README)."""
    return {
        "kind": KEY_KIND_NAMES.get(key.kind, "unspecified"),
        "name": key.name,
        "fingerprint": key.fingerprint,
        "issuer_fingerprint": key.issuer_fingerprint,
        "not_before": timestamp(key.not_before),
        "not_after": timestamp(key.not_after),
        "state": key_service_pb2.KeyState.Name(key.state).removeprefix("KEY_STATE_").lower(),
        "backend": key.backend,
        "algorithm": ALGORITHM_NAMES.get(key.algorithm, "unspecified"),
        "certificate_pem": key.certificate_pem,
        "signatures": key.signatures,
        "last_used": timestamp(key.last_used, key.HasField("last_used")),
    }


def cmd_keys_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    keys = [key_json(k) for k in client.list_keys(args.kind)]
    if args.json:
        print_json(keys)
        return 0
    header = ["KIND", "STATE", "FINGERPRINT", "NOT AFTER", "ISSUER", "BACKEND", "SIGNATURES"]
    header.append("LAST USED")
    rows = [
        [
            k["kind"],
            k["state"],
            k["fingerprint"],
            (k["not_after"] or "")[:19],
            k["issuer_fingerprint"][:16],
            k["backend"],
            str(k["signatures"]),
            (k["last_used"] or "never")[:19],
        ]
        for k in keys
    ]
    print(table(rows, header))
    return 0


def cmd_keys_rotate(client: KeyplaneClient, args: argparse.Namespace) -> int:
    key = key_json(client.rotate_key(args.kind))
    if args.json:
        print_json(key)
    else:
        print(f"rotated {key['kind']}: {key['fingerprint']} valid until {key['not_after']}")
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    keys = commands.add_parser(
        "keys",
        help="list and rotate subordinate keys",
        description=KEYS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = keys.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "list", parents=[common], help="list server TLS, intermediate and message-signing keys"
    )
    p.add_argument("--kind", choices=sorted(KEY_KINDS), help="only this kind")
    p.set_defaults(call=cmd_keys_list)
    p = verbs.add_parser("rotate", parents=[common], help="rotate one kind now")
    p.add_argument("kind", choices=sorted(KEY_KINDS))
    p.set_defaults(call=cmd_keys_rotate)
