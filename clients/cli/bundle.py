"""`keyplane bundle download`: the init bundle new components start from (or the
legacy public key file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from keyplane.clients.bundle import load_bundle
from keyplane.clients.cli.output import print_json
from keyplane.clients.client import KeyplaneClient


def cmd_bundle_download(client: KeyplaneClient, args: argparse.Namespace) -> int:
    if args.legacy:
        legacy = client.get_legacy_public_key()
        out = args.out or Path("keyplane.pub")
        out.write_text(legacy.public_key_pem)
        message = f"wrote the legacy public key (sha256:{legacy.fingerprint}) to {out}"
    else:
        bundle = client.get_init_bundle()
        out = args.out or Path("keyplane-init.dat")
        out.write_bytes(bundle.SerializeToString())
        body = load_bundle(out.read_bytes())
        servers = ", ".join(f"{s.name} {s.bootstrap_listen}" for s in body.body.servers)
        message = f"wrote {out}: roots {', '.join(body.root_fingerprints)}; servers {servers}"
    if args.json:
        print_json({"file": str(out)})
    else:
        print(message)
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    bundle = commands.add_parser("bundle", help="init bundles for new components")
    verbs = bundle.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "download",
        parents=[common],
        help="write the init bundle (root certificates, server addresses; never a secret)",
    )
    p.add_argument(
        "--out", type=Path, help="default keyplane-init.dat (keyplane.pub with --legacy)"
    )
    p.add_argument(
        "--legacy",
        action="store_true",
        help="the legacy root's public key file instead (needs EnableLegacyProtocol=true)",
    )
    p.set_defaults(call=cmd_bundle_download)
