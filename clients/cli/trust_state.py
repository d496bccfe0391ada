"""`keyplane trust-state show`: the signed trust state, fetched and verified against the
credential's roots."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Any

from cryptography import x509

from keyplane.clients.cli.output import print_json, timestamp
from keyplane.clients.client import KeyplaneClient
from keyplane.clients.trust import TrustState, follow, key_fingerprint


def trust_json(state: TrustState) -> dict[str, Any]:
    body = state.body

    def certs(entries: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": c.name,
                "fingerprint": c.fingerprint,
                "state": c.state,
                "issuer_fingerprint": c.issuer_fingerprint or None,
            }
            for c in entries
        ]

    return {
        "version": body.version,
        "issued": timestamp(body.issue_time),
        "server": body.server_fqdn,
        "roots": certs(body.roots),
        "revoked_roots": list(body.revoked_root_fingerprints),
        "intermediates": certs(body.intermediates),
        "message_signing": certs(body.message_signing),
        "server_tls": certs(body.server_tls),
        "revoked_keys": list(body.revoked_key_fingerprints),
        "revoked_serials": list(body.revoked_serials),
        "client_settings": dict(body.client_settings),
        "peers": [
            {
                "server": p.fqdn,
                "listen": p.listen,
                "bootstrap_listen": p.bootstrap_listen,
                "roots": certs(p.roots),
                "revoked_roots": list(p.revoked_root_fingerprints),
                "intermediates": certs(p.intermediates),
                "revoked_keys": list(p.revoked_key_fingerprints),
                "revoked_serials": list(p.revoked_serials),
                "trust_state_version": p.trust_state_version,
            }
            for p in body.peers
        ],
        "signed_by": [s.root_fingerprint for s in state.signed.signatures],
        # The document itself, so that this JSON can be given to --trust-state too.
        "signed": base64.b64encode(state.serialize()).decode(),
    }


def fetch_trust_state(client: KeyplaneClient, credential_roots: bytes) -> TrustState:
    """The latest trust state, verified against the roots in the credential's ca.pem."""
    pinned = [key_fingerprint(c) for c in x509.load_pem_x509_certificates(credential_roots)]
    return follow(None, client.get_trust_state(0), pinned)


def cmd_trust_state_show(client: KeyplaneClient, args: argparse.Namespace) -> int:
    state = fetch_trust_state(client, args.credential.root_certificates_pem)
    if args.out:
        args.out.write_bytes(state.serialize())
    if args.json:
        print_json(trust_json(state))
    elif not args.out:
        data = trust_json(state)
        print(f"version {data['version']} issued {data['issued']} by {data['server']}")
        for key in ("roots", "intermediates", "message_signing", "server_tls"):
            for c in data[key]:
                print(f"  {key:16} {c['state']:9} {c['fingerprint']}  {c['name']}")
        print(
            f"  revoked roots: {len(data['revoked_roots'])}, keys: {len(data['revoked_keys'])}, "
            f"serials: {len(data['revoked_serials'])}"
        )
        for peer in data["peers"]:
            print(f"  peer {peer['server']} (its v{peer['trust_state_version']}):")
            for c in peer["roots"]:
                print(f"    {'roots':14} {c['state']:9} {c['fingerprint']}  {c['name']}")
    else:
        print(f"wrote trust state version {state.version} to {args.out}")
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    trust = commands.add_parser("trust-state", help="the signed trust state components follow")
    verbs = trust.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "show",
        parents=[common],
        help="fetch the latest trust state, verify it against ca.pem, and show it",
    )
    p.add_argument("--out", type=Path, help="also write the signed trust state to this file")
    p.set_defaults(call=cmd_trust_state_show)
