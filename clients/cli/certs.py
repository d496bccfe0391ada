"""`keyplane certs list|issue|revoke`: the certificates the server and its zones issued."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from keyplane.clients.cli import CONFIRM_HINTS, PROG, positive_int, read_file
from keyplane.clients.cli.output import print_json, table, timestamp
from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.v1 import certificate_service_pb2

# The server's limit per EnrollBatch call.
ENROLL_BATCH = 1000

REVOKE_HELP = """\
Revoke one certificate for good. The revocation is published in the trust state before
this command returns; the holder's next call is refused, and an agent stops and must
enroll again with a new token. A person's credential (admin, operator, auditor) needs
--yes; the credential this command calls with needs --force as well, since you lose
access with it. A zone server's certificates go with the zone: 'keyplane zones revoke'.

examples:
  keyplane certs revoke 5d0c9a61e7f14b2f8a3c6e1d2b4f7a90 --reason "lost laptop"
  keyplane certs revoke <an operator's serial> --reason "left the team" --yes
"""
REVOKE_HINTS = {
    **CONFIRM_HINTS,
    "REVOKES_CALLER": ("--force", "add --force to revoke the credential you are calling with"),
}


def cert_json(cert: certificate_service_pb2.CertificateRecord) -> dict[str, Any]:
    return {
        "serial": cert.serial,
        "subject": cert.subject,
        "fingerprint": cert.fingerprint,
        "issuer_fingerprint": cert.issuer_fingerprint,
        "component": cert.component,
        "issued": timestamp(cert.issue_time),
        "not_after": timestamp(cert.not_after),
        "revoked": timestamp(cert.revoke_time, cert.HasField("revoke_time")),
        "revoke_reason": cert.revoke_reason or None,
    }


def cmd_certs_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    found = [
        cert_json(c)
        for c in client.list_certificates(args.component or "", args.limit, args.search or "")
    ]
    if args.json:
        print_json(found)
        return 0
    header = ["SERIAL", "COMPONENT", "SUBJECT", "NOT AFTER", "REVOKED"]
    rows = [
        [
            c["serial"],
            c["component"],
            c["subject"],
            (c["not_after"] or "")[:19],
            (c["revoked"] or "")[:19],
        ]
        for c in found
    ]
    print(table(rows, header))
    return 0


def cmd_certs_issue(client: KeyplaneClient, args: argparse.Namespace) -> int:
    files: list[Path] = args.csr
    csrs = [read_file(path) for path in files]
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    roots = (args.out_dir or files[0].parent) / "roots.pem"
    report: list[dict[str, object]] = []
    for start in range(0, len(csrs), ENROLL_BATCH):
        try:
            issued = client.enroll_batch(csrs[start : start + ENROLL_BATCH], args.token)
        except KeyplaneClientError:
            if report:  # earlier calls were issued: say what is where before failing
                print(
                    f"{PROG}: {len(report)} certificates were issued and written before this "
                    f"call failed; CSRs from {files[start]} on were not issued",
                    file=sys.stderr,
                )
            raise
        # Written after each call: a later call's failure loses nothing issued.
        for path, cert in zip(files[start : start + ENROLL_BATCH], issued, strict=True):
            out = (args.out_dir or path.parent) / (path.stem + ".crt")
            out.write_text(cert.certificate_chain_pem)
            report.append(
                {
                    "csr": str(path),
                    "certificate_file": str(out),
                    "serial": cert.serial,
                    "not_after": timestamp(cert.not_after),
                }
            )
        roots.write_text(issued[0].roots_pem)
        if len(csrs) > ENROLL_BATCH:
            print(f"issued {len(report)}/{len(csrs)}", file=sys.stderr)
    if args.json:
        print_json({"certificates": report, "roots_file": str(roots)})
    else:
        for entry in report:
            print(f"issued {entry['certificate_file']} (serial {entry['serial']})")
        print(f"wrote the roots to trust servers by to {roots}")
    return 0


def cmd_certs_revoke(client: KeyplaneClient, args: argparse.Namespace) -> int:
    cert = cert_json(
        client.revoke_certificate(args.serial, args.reason or "", args.yes, args.force)
    )
    if args.json:
        print_json(cert)
    else:
        print(f"revoked {cert['serial']} ({cert['subject']})")
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    certificates = commands.add_parser("certs", help="issued certificates")
    verbs = certificates.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("list", parents=[common], help="issued certificates, newest first")
    p.add_argument("--component", choices=["agent", "zone-server", "admin", "operator", "auditor"])
    p.add_argument("--limit", type=positive_int, default=1000, help="at most this many")
    p.add_argument(
        "--search",
        metavar="TEXT",
        help="only certificates whose serial starts with TEXT or whose subject contains it "
        "(any case), e.g. --search meter-12",
    )
    p.set_defaults(call=cmd_certs_list)
    issue_help = (
        "issue agent certificates for CSR files in bulk (EnrollBatch, up to 1,000 per "
        "call; all or nothing per call): writes STEM.crt (chain) per CSR and roots.pem"
    )
    p = verbs.add_parser("issue", parents=[common], help=issue_help, description=issue_help)
    p.add_argument("csr", type=Path, nargs="+", help="PKCS#10 CSR files, PEM or DER")
    p.add_argument(
        "--token",
        required=True,
        help="an agent token with a use per CSR ('keyplane tokens create --uses N')",
    )
    p.add_argument("--out-dir", type=Path, help="where to write (default: beside each CSR)")
    p.set_defaults(call=cmd_certs_issue)
    p = verbs.add_parser(
        "revoke",
        parents=[common],
        help="revoke one certificate",
        description=REVOKE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("serial", help="serial number in hex, as 'certs list' shows")
    p.add_argument("--reason", help="why (kept in the audit log)")
    p.add_argument("--yes", action="store_true", help="confirm revoking a person's credential")
    p.add_argument(
        "--force",
        action="store_true",
        help="confirm revoking the very credential this command calls with (with --yes)",
    )
    p.set_defaults(call=cmd_certs_revoke, hints=REVOKE_HINTS)
