"""`keyplane roots list|create|show|coverage|revoke|legacy`: the server's root keys."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyplane.clients.cli import CliError, positive_int, rotation
from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import ALGORITHM_NAMES, ALGORITHMS, KeyplaneClient
from keyplane.v1 import root_key_service_pb2, trust_state_pb2

ROOTS_HELP = """\
Manage this server's root keys. At most two roots are active at a time. To rotate:
create a new root (every subordinate is re-issued under it), watch every component
move to it ('roots coverage'), see what revoking the old one would do ('roots revoke
FP --dry-run'), then revoke it. Revocation is permanent and destroys the private key;
it is refused while fewer live components than PKIRootRevocationMinCoverage (0.99)
would keep a chain, unless --force (a compromised key; audited as forced).
"""


def root_json(root: root_key_service_pb2.RootKey) -> dict[str, Any]:
    """The `--json` form of a root key (documented in README)."""
    revoked = root.state == root_key_service_pb2.ROOT_KEY_STATE_REVOKED
    return {
        "name": root.name,
        "number": root.number,
        "fingerprint": root.fingerprint,
        "algorithm": ALGORITHM_NAMES.get(root.algorithm, "unspecified"),
        "backend": root.backend,
        "key_uri": root.key_uri,
        "state": "revoked" if revoked else "active",
        "created": timestamp(root.create_time),
        "revoked": timestamp(root.revoke_time, root.HasField("revoke_time")),
        "revoked_by": root.revoked_by or None,
        "revoke_reason": root.revoke_reason or None,
        "certificate_pem": root.certificate_pem,
    }


def legacy_json(legacy: root_key_service_pb2.LegacyRootKey) -> dict[str, Any]:
    return {
        "name": legacy.name,
        "fingerprint": legacy.fingerprint,
        "algorithm": ALGORITHM_NAMES.get(legacy.algorithm, "unspecified"),
        "created": timestamp(legacy.create_time),
        "public_key_pem": legacy.public_key_pem,
    }


def _root_rows(roots: Sequence[root_key_service_pb2.RootKey]) -> list[list[str]]:
    return [
        [
            r["name"],
            r["state"],
            r["fingerprint"],
            r["algorithm"],
            r["backend"],
            (r["revoked"] or r["created"] or "")[:19],
        ]
        for r in map(root_json, roots)
    ]


def _print_root(root: root_key_service_pb2.RootKey) -> None:
    data = root_json(root)
    for key in (
        "name",
        "state",
        "fingerprint",
        "algorithm",
        "backend",
        "key_uri",
        "created",
        "revoked",
        "revoked_by",
        "revoke_reason",
    ):
        if data[key] is not None:
            print(f"{key + ':':15}{data[key]}")
    print(data["certificate_pem"], end="")


def cmd_roots_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    listing = client.list_root_keys()
    coverage = rotation.coverage_json(client.get_root_coverage())
    under = {r["fingerprint"]: r["components"]["total"] for r in coverage["roots"]}
    live = coverage["live"]["total"]
    peers: list[dict[str, Any]] = [
        {
            "server": p.server_fqdn,
            "trust_state_version": p.trust_state_version,
            "roots": [
                {"name": r.name, "fingerprint": r.fingerprint, "certificate_pem": _pem(r)}
                for r in p.roots
            ],
        }
        for p in listing.peers
    ]
    if args.json:
        print_json(
            {
                "active": [root_json(r) for r in listing.active],
                "revoked": [root_json(r) for r in listing.revoked],
                "legacy": legacy_json(listing.legacy),
                "peers": peers,
                "coverage": coverage,
            }
        )
        return 0
    header = ["NAME", "STATE", "FINGERPRINT", "ALGORITHM", "BACKEND", "SINCE", "COMPONENTS"]
    rows = [
        [*row, f"{under[fp]} of {live}" if fp in under else ""]
        for row, fp in zip(
            _root_rows(list(listing.active) + list(listing.revoked)),
            [r.fingerprint for r in [*listing.active, *listing.revoked]],
            strict=True,
        )
    ]
    legacy = legacy_json(listing.legacy)
    rows.append(
        [
            legacy["name"],
            "legacy",
            legacy["fingerprint"],
            legacy["algorithm"],
            "software",
            (legacy["created"] or "")[:19],
            "",
        ]
    )
    print(table(rows, header))
    for peer in peers:
        # A trusted peer's roots, apart: this server trusts them, it does not hold them.
        print(f"\npeer {peer['server']} (trusted; its trust state v{peer['trust_state_version']}):")
        print(
            table(
                [[r["name"], "peer", r["fingerprint"]] for r in peer["roots"]],
                ["NAME", "STATE", "FINGERPRINT"],
            )
        )
    return 0


def _pem(root: trust_state_pb2.TrustedCertificate) -> str:
    cert = x509.load_der_x509_certificate(root.certificate_der)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def cmd_roots_create(client: KeyplaneClient, args: argparse.Namespace) -> int:
    root = client.create_root_key(args.algorithm)
    if args.json:
        print_json(root_json(root))
    else:
        print(f"created {root.name} sha256:{root.fingerprint} ({root.backend})")
    return 0


def cmd_roots_show(client: KeyplaneClient, args: argparse.Namespace) -> int:
    root = client.get_root_key(args.fingerprint)
    if args.json:
        print_json(root_json(root))
    else:
        _print_root(root)
    return 0


def cmd_roots_revoke(client: KeyplaneClient, args: argparse.Namespace) -> int:
    if args.dry_run and (args.yes or args.force):
        raise CliError("--dry-run changes nothing: leave out --yes and --force")
    if args.force and not (args.reason or "").strip():
        raise CliError("--force needs --reason (why the root cannot wait: it is audited)")
    answer = client.revoke_root(
        args.fingerprint, args.reason or "", args.yes, dry_run=args.dry_run, force=args.force
    )
    plan = rotation.plan_json(answer.plan)
    if args.json:
        print_json({**root_json(answer.root_key), "plan": plan})
    elif args.dry_run:
        rotation.print_plan(plan)
    else:
        forced = " (forced)" if plan["verdict"] == "forced" else ""
        root = answer.root_key
        print(f"revoked {root.name} sha256:{root.fingerprint}{forced}: {root.revoke_reason}")
        rotation.print_plan(plan)
    return 0


def cmd_roots_legacy(client: KeyplaneClient, args: argparse.Namespace) -> int:
    legacy = client.get_legacy_root_key()
    if args.json:
        print_json(legacy_json(legacy))
    else:
        print(f"{legacy.name} sha256:{legacy.fingerprint}")
        print(legacy.public_key_pem, end="")
    return 0


FINGERPRINT_HELP = (
    "the root's fingerprint: 64 hex digits (optionally prefixed sha256:), or an "
    "unambiguous prefix of 8 or more, as 'roots list' shows"
)


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    roots = commands.add_parser(
        "roots",
        help="manage root keys",
        description=ROOTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = roots.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("list", parents=[common], help="list active, revoked and legacy roots")
    p.set_defaults(call=cmd_roots_list)
    p = verbs.add_parser(
        "create", parents=[common], help="create a new root (at most two may be active)"
    )
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), help="default: server config")
    p.set_defaults(call=cmd_roots_create)
    p = verbs.add_parser("show", parents=[common], help="show one root and its certificate")
    p.add_argument("fingerprint", help=FINGERPRINT_HELP)
    p.set_defaults(call=cmd_roots_show)
    p = verbs.add_parser(
        "coverage",
        parents=[common],
        help="how many live components have moved to the newest root, and who has not",
    )
    p.add_argument(
        "--limit", type=positive_int, help="stragglers to list, slowest first (default 20)"
    )
    p.set_defaults(call=rotation.cmd_roots_coverage)
    p = verbs.add_parser(
        "revoke",
        parents=[common],
        help="revoke a root for good (destroys its private key and revokes what it issued)",
    )
    p.add_argument("fingerprint", help=FINGERPRINT_HELP)
    p.add_argument("--reason", help="why; kept in the audit log (needed unless --dry-run)")
    p.add_argument("--yes", action="store_true", help="confirm: revocation is permanent")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="change nothing: show what the revocation would revoke and strand",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="revoke although too few components have moved (a compromised key; audited)",
    )
    p.set_defaults(call=cmd_roots_revoke)
    p = verbs.add_parser("legacy", parents=[common], help="show the legacy root's public key")
    p.set_defaults(call=cmd_roots_legacy)
