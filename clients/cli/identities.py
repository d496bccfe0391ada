"""`keyplane identities create|list|revoke`: people's credentials (admin, operator,
auditor). `create` makes the key here and sends only a CSR, so the private key never
travels; it writes a credential dir that `--credentials DIR` reads."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyplane.clients.cli import CliError
from keyplane.clients.cli.certs import REVOKE_HINTS
from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import (
    IDENTITY_ROLE_NAMES,
    IDENTITY_ROLES,
    KeyplaneClient,
    KeyplaneClientError,
)
from keyplane.clients.credentials import (
    CA_FILE,
    CREDENTIAL_FILE,
    ENDPOINT_FILE,
    default_credentials_dir,
    default_server,
)
from keyplane.v1 import identity_service_pb2 as pb

IDENTITIES_HELP = """\
People's identities: a client certificate from the newest root with a role, named by
its common name. Roles: admin (everything, and alone: roots, keys, trust, settings,
backups, identities), operator (tokens, certificates, zones, bundles; reads keys and
settings), auditor (reads everything, changes nothing). Creating and revoking needs
admin; listing any of the three.
"""

CREATE_HELP = """\
Create an identity: make a P-256 key here, have the server certify it (valid 90 days,
role as a URI SAN), and write DIR/admin.pem (certificate then key, mode 0600),
DIR/ca.pem (the roots) and DIR/endpoint.json (the server's address), the credential
dir that --credentials reads. The key never leaves this machine. An existing
credential in DIR is never overwritten; a name a live identity has is refused.

example:
  keyplane identities create alice@example.org --role operator --out ./alice
  keyplane certs list --credentials ./alice
"""

LIST_HELP = """\
List the live identities: name, role, serial, validity end. --all adds revoked and
expired ones; --json gives every field.

example:
  keyplane identities list --all
"""

REVOKE_HELP = """\
Revoke an identity for good: every live credential of the name, published in the
trust state before this command returns, so its next call is refused. Needs --reason
(kept in the audit log) and --yes; revoking the credential this command calls with
needs --force as well, since you lose access with it.

example:
  keyplane identities revoke alice@example.org --reason "left the team" --yes
"""

_STATES = {
    pb.IDENTITY_STATE_LIVE: "live",
    pb.IDENTITY_STATE_EXPIRED: "expired",
    pb.IDENTITY_STATE_REVOKED: "revoked",
}


def identity_json(identity: pb.Identity) -> dict[str, Any]:
    """The `--json` form of an identity (documented in README)."""
    return {
        "name": identity.name,
        "role": IDENTITY_ROLE_NAMES.get(identity.role, "unspecified"),
        "state": _STATES.get(identity.state, "unspecified"),
        "serial": identity.serial,
        "fingerprint": identity.fingerprint,
        "issuer_fingerprint": identity.issuer_fingerprint,
        "issued": timestamp(identity.issue_time, identity.HasField("issue_time")),
        "not_after": timestamp(identity.not_after, identity.HasField("not_after")),
        "revoked": timestamp(identity.revoke_time, identity.HasField("revoke_time")),
        "revoke_reason": identity.revoke_reason or None,
    }


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, created with `mode` (never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def cmd_identities_create(client: KeyplaneClient, args: argparse.Namespace) -> int:
    out: Path = args.out
    if (out / CREDENTIAL_FILE).exists():
        raise CliError(
            f"{out / CREDENTIAL_FILE} exists already; it is never overwritten: choose "
            "another --out dir"
        )
    made = not out.exists()
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise CliError(f"cannot write to {out}: permission denied")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.name)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    try:
        created = client.create_identity(args.name, args.role, csr)
    except KeyplaneClientError:
        if made:  # refused: leave no trace of the attempt
            out.rmdir()
        raise
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server = args.server or default_server(args.credentials or default_credentials_dir())
    try:
        _write_new(out / CREDENTIAL_FILE, created.certificate_pem.encode() + key_pem, 0o600)
        (out / CA_FILE).write_text(created.roots_pem)
        if not (out / ENDPOINT_FILE).exists():
            (out / ENDPOINT_FILE).write_text(json.dumps({"listen": server}, indent=2))
    except OSError as exc:
        raise CliError(
            f"identity {args.name} was created (serial {created.identity.serial}) but its "
            f"credential could not be written to {out} ({exc.strerror}); revoke it with "
            "'keyplane identities revoke' and create it again"
        ) from None
    if args.json:
        print_json({**identity_json(created.identity), "credentials_dir": str(out)})
    else:
        print(
            f"created {args.role} {args.name} (serial {created.identity.serial}); its "
            f"credential is in {out}: use it with --credentials {out}"
        )
    return 0


def cmd_identities_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    found = [identity_json(i) for i in client.list_identities(include_revoked=args.all)]
    if args.json:
        print_json(found)
        return 0
    header = ["NAME", "ROLE", "STATE", "SERIAL", "NOT AFTER"]
    rows = [
        [i["name"], i["role"], i["state"], i["serial"], (i["not_after"] or "")[:19]] for i in found
    ]
    print(table(rows, header))
    return 0


def cmd_identities_revoke(client: KeyplaneClient, args: argparse.Namespace) -> int:
    revoked = [
        identity_json(i)
        for i in client.revoke_identity(args.name, args.reason, args.yes, args.force)
    ]
    if args.json:
        print_json(revoked)
    else:
        serials = ", ".join(i["serial"] for i in revoked)
        print(f"revoked {args.name} (certificate {serials}): {args.reason}")
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    identities = commands.add_parser(
        "identities",
        help="people's credentials: create, list and revoke admins, operators, auditors",
        description=IDENTITIES_HELP,
    )
    verbs = identities.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "create",
        parents=[common],
        help="create an identity and write its credential dir",
        description=CREATE_HELP,
        formatter_class=raw,
    )
    p.add_argument("name", help="the name (its certificate's CN), e.g. alice@example.org")
    p.add_argument("--role", required=True, choices=sorted(IDENTITY_ROLES))
    p.add_argument(
        "--out", type=Path, required=True, help="the credential dir to write (made 0700)"
    )
    p.set_defaults(call=cmd_identities_create)
    p = verbs.add_parser(
        "list",
        parents=[common],
        help="the live identities (--all: revoked and expired ones too)",
        description=LIST_HELP,
        formatter_class=raw,
    )
    p.add_argument("--all", action="store_true", help="also list revoked and expired identities")
    p.set_defaults(call=cmd_identities_list)
    p = verbs.add_parser(
        "revoke",
        parents=[common],
        help="revoke an identity for good",
        description=REVOKE_HELP,
        formatter_class=raw,
    )
    p.add_argument("name", help="the live identity's name")
    p.add_argument("--reason", required=True, help="why; kept in the audit log")
    p.add_argument("--yes", action="store_true", help="confirm: the identity is revoked")
    p.add_argument(
        "--force",
        action="store_true",
        help="confirm revoking the very credential this command calls with (with --yes)",
    )
    p.set_defaults(call=cmd_identities_revoke, hints=REVOKE_HINTS)
