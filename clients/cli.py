"""The `keyplane` command line: `keyplane <noun> <verb>`, plus commands that installed
parts of keyplane register through the `keyplane.commands` entry-point group (the server
registers `serve` that way, so this module never imports the server)."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from cryptography import x509
from google.protobuf import timestamp_pb2

from keyplane.clients import agent
from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import (
    ALGORITHM_NAMES,
    ALGORITHMS,
    KEY_KIND_NAMES,
    KEY_KINDS,
    KeyplaneClient,
    KeyplaneClientError,
)
from keyplane.clients.credentials import (
    CredentialError,
    default_credentials_dir,
    default_server,
    load_credential,
)
from keyplane.clients.trust import TrustState, TrustStateError, follow, key_fingerprint
from keyplane.clients.trust import load as load_trust_state
from keyplane.clients.verify import MessageVerificationError, verify_message
from keyplane.v1 import (
    certificate_service_pb2,
    key_service_pb2,
    message_signing_service_pb2,
    root_key_service_pb2,
    settings_service_pb2,
)

COMMAND_GROUP = "keyplane.commands"
PROG = "keyplane"
# The server's limits per SignMessages and EnrollBatch call.
SIGN_BATCH = 1000
SIGN_BATCH_BYTES = 4 * 1024 * 1024
ENROLL_BATCH = 1000

KEYS_HELP = """\
Subordinate keys: the server's TLS key, the intermediate TLS key (signs client
certificates) and the message-signing key. Each rotates by itself when it enters its
renewal window (settings PKI<Kind>KeyValidityHours / PKI<Kind>KeyRenewalWindowHours):
the new key is published in the trust state before it is used, and the old one stays
trusted until it expires. Kinds: server-tls, intermediate-tls, message-signing.
"""

SETTINGS_HELP = """\
Settings, global (every server) or local (this server). Rotation settings:
PKI<Kind>KeyValidityHours and PKI<Kind>KeyRenewalWindowHours for Kind in ClientTLS
(168/4), IntermediateTLS, ServerTLS and MessageSigning (720/72). A renewal window must
be shorter than its validity. Protected values are masked unless --reveal (audited).
"""

ROOTS_HELP = """\
Manage this server's root keys. At most two roots are active at a time. To rotate:
create a new root (every subordinate is re-issued under it), let every component pick
it up, then revoke the old one. Revocation is permanent and destroys the private key.
"""


def _time(ts: timestamp_pb2.Timestamp, present: bool = True) -> str | None:
    if not present:
        return None
    return ts.ToDatetime(tzinfo=datetime.UTC).isoformat().replace("+00:00", "Z")


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
        "created": _time(root.create_time),
        "revoked": _time(root.revoke_time, root.HasField("revoke_time")),
        "revoked_by": root.revoked_by or None,
        "revoke_reason": root.revoke_reason or None,
        "certificate_pem": root.certificate_pem,
    }


def legacy_json(legacy: root_key_service_pb2.LegacyRootKey) -> dict[str, Any]:
    return {
        "name": legacy.name,
        "fingerprint": legacy.fingerprint,
        "algorithm": ALGORITHM_NAMES.get(legacy.algorithm, "unspecified"),
        "created": _time(legacy.create_time),
        "public_key_pem": legacy.public_key_pem,
    }


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


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


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


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
    if args.json:
        _print_json(
            {
                "active": [root_json(r) for r in listing.active],
                "revoked": [root_json(r) for r in listing.revoked],
                "legacy": legacy_json(listing.legacy),
            }
        )
        return 0
    header = ["NAME", "STATE", "FINGERPRINT", "ALGORITHM", "BACKEND", "SINCE"]
    rows = _root_rows(list(listing.active) + list(listing.revoked))
    legacy = legacy_json(listing.legacy)
    rows.append(
        [
            legacy["name"],
            "legacy",
            legacy["fingerprint"],
            legacy["algorithm"],
            "software",
            (legacy["created"] or "")[:19],
        ]
    )
    print(_table(rows, header))
    return 0


def cmd_roots_create(client: KeyplaneClient, args: argparse.Namespace) -> int:
    root = client.create_root_key(args.algorithm)
    if args.json:
        _print_json(root_json(root))
    else:
        print(f"created {root.name} sha256:{root.fingerprint} ({root.backend})")
    return 0


def cmd_roots_show(client: KeyplaneClient, args: argparse.Namespace) -> int:
    root = client.get_root_key(args.fingerprint)
    if args.json:
        _print_json(root_json(root))
    else:
        _print_root(root)
    return 0


def cmd_roots_revoke(client: KeyplaneClient, args: argparse.Namespace) -> int:
    root = client.revoke_root_key(args.fingerprint, args.reason, args.yes)
    if args.json:
        _print_json(root_json(root))
    else:
        print(f"revoked {root.name} sha256:{root.fingerprint}: {root.revoke_reason}")
    return 0


def cmd_roots_legacy(client: KeyplaneClient, args: argparse.Namespace) -> int:
    legacy = client.get_legacy_root_key()
    if args.json:
        _print_json(legacy_json(legacy))
    else:
        print(f"{legacy.name} sha256:{legacy.fingerprint}")
        print(legacy.public_key_pem, end="")
    return 0


def _key_json(key: key_service_pb2.Key) -> dict[str, Any]:
    """The `--json` form of a subordinate key (documented in README)."""
    return {
        "kind": KEY_KIND_NAMES.get(key.kind, "unspecified"),
        "name": key.name,
        "fingerprint": key.fingerprint,
        "issuer_fingerprint": key.issuer_fingerprint,
        "not_before": _time(key.not_before),
        "not_after": _time(key.not_after),
        "state": key_service_pb2.KeyState.Name(key.state).removeprefix("KEY_STATE_").lower(),
        "backend": key.backend,
        "algorithm": ALGORITHM_NAMES.get(key.algorithm, "unspecified"),
        "certificate_pem": key.certificate_pem,
    }


def cmd_keys_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    keys = [_key_json(k) for k in client.list_keys(args.kind)]
    if args.json:
        _print_json(keys)
        return 0
    header = ["KIND", "STATE", "FINGERPRINT", "NOT AFTER", "ISSUER", "BACKEND"]
    rows = [
        [
            k["kind"],
            k["state"],
            k["fingerprint"],
            (k["not_after"] or "")[:19],
            k["issuer_fingerprint"][:16],
            k["backend"],
        ]
        for k in keys
    ]
    print(_table(rows, header))
    return 0


def cmd_keys_rotate(client: KeyplaneClient, args: argparse.Namespace) -> int:
    key = _key_json(client.rotate_key(args.kind))
    if args.json:
        _print_json(key)
    else:
        print(f"rotated {key['kind']}: {key['fingerprint']} valid until {key['not_after']}")
    return 0


def _setting_json(setting: settings_service_pb2.Setting) -> dict[str, Any]:
    return {
        "name": setting.name,
        "value": setting.value,
        "type": settings_service_pb2.SettingType.Name(setting.type)
        .removeprefix("SETTING_TYPE_")
        .lower(),
        "affects": setting.affects,
        "scope": setting.scope,
        "default": setting.is_default,
        "description": setting.description,
        "updated": _time(setting.update_time, setting.HasField("update_time")),
        "updated_by": setting.updated_by or None,
    }


def cmd_settings_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    settings = [_setting_json(s) for s in client.list_settings(args.reveal)]
    if args.json:
        _print_json(settings)
        return 0
    header = ["NAME", "VALUE", "TYPE", "AFFECTS", "SCOPE", "DEFAULT"]
    rows = [
        [s["name"], s["value"], s["type"], s["affects"], s["scope"], "yes" if s["default"] else ""]
        for s in settings
    ]
    print(_table(rows, header))
    return 0


def cmd_settings_get(client: KeyplaneClient, args: argparse.Namespace) -> int:
    setting = _setting_json(client.get_setting(args.name, args.reveal))
    if args.json:
        _print_json(setting)
    else:
        print(setting["value"])
    return 0


def cmd_settings_set(client: KeyplaneClient, args: argparse.Namespace) -> int:
    setting = _setting_json(client.update_setting(args.name, args.value))
    if args.json:
        _print_json(setting)
    else:
        print(f"{setting['name']} = {setting['value']}")
    return 0


def _trust_json(state: TrustState) -> dict[str, Any]:
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
        "issued": _time(body.issue_time),
        "server": body.server_fqdn,
        "roots": certs(body.roots),
        "revoked_roots": list(body.revoked_root_fingerprints),
        "intermediates": certs(body.intermediates),
        "message_signing": certs(body.message_signing),
        "server_tls": certs(body.server_tls),
        "revoked_keys": list(body.revoked_key_fingerprints),
        "revoked_serials": list(body.revoked_serials),
        "client_settings": dict(body.client_settings),
        "signed_by": [s.root_fingerprint for s in state.signed.signatures],
    }


def _fetch_trust_state(client: KeyplaneClient, credential_roots: bytes) -> TrustState:
    """The latest trust state, verified against the roots in the credential's ca.pem."""
    pinned = [key_fingerprint(c) for c in x509.load_pem_x509_certificates(credential_roots)]
    return follow(None, client.get_trust_state(0), pinned)


def cmd_trust_state_show(client: KeyplaneClient, args: argparse.Namespace) -> int:
    state = _fetch_trust_state(client, args.credential.root_certificates_pem)
    if args.out:
        args.out.write_bytes(state.serialize())
    if args.json:
        _print_json(_trust_json(state))
    elif not args.out:
        data = _trust_json(state)
        print(f"version {data['version']} issued {data['issued']} by {data['server']}")
        for key in ("roots", "intermediates", "message_signing", "server_tls"):
            for c in data[key]:
                print(f"  {key:16} {c['state']:9} {c['fingerprint']}  {c['name']}")
        print(
            f"  revoked roots: {len(data['revoked_roots'])}, keys: {len(data['revoked_keys'])}, "
            f"serials: {len(data['revoked_serials'])}"
        )
    else:
        print(f"wrote trust state version {state.version} to {args.out}")
    return 0


def cmd_sign(client: KeyplaneClient, args: argparse.Namespace) -> int:
    files: list[Path] = args.file
    if args.out and len(files) > 1:
        raise CliError("--out names one signature file; with several files, leave it out")
    signed: list[message_signing_service_pb2.SignedMessage] = []
    if len(files) == 1:
        signed.append(client.sign_message(_read_payload(files[0])))
    else:
        # SignMessages: up to 1,000 payloads and 4 MiB per call.
        batch: list[bytes] = []
        for path in files:
            payload = _read_payload(path)
            if batch and (
                len(batch) == SIGN_BATCH or sum(map(len, batch)) + len(payload) > (SIGN_BATCH_BYTES)
            ):
                signed.extend(client.sign_messages(batch))
                batch = []
            batch.append(payload)
        signed.extend(client.sign_messages(batch))
    report = []
    for path, one in zip(files, signed, strict=True):
        out = args.out or path.with_name(path.name + ".sig")
        out.write_bytes(one.SerializeToString())
        content = message_signing_service_pb2.MessageSignatureContent.FromString(one.content)
        report.append(
            {
                "file": str(path),
                "signature_file": str(out),
                "signer_fingerprint": content.signer_fingerprint,
                "algorithm": one.algorithm,
                "signed_at": _time(content.signed_at),
                "trust_state_version": content.trust_state_version,
            }
        )
    if args.json:
        _print_json(report[0] if len(report) == 1 else report)
    else:
        for entry in report:
            print(
                f"signed {entry['file']} -> {entry['signature_file']} "
                f"(key {str(entry['signer_fingerprint'])[:16]}…)"
            )
    return 0


def _read_payload(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def run_verify(args: argparse.Namespace, client: KeyplaneClient | None) -> int:
    payload = _read_payload(args.file)
    try:
        signed = message_signing_service_pb2.SignedMessage.FromString(_read_payload(args.signature))
    except Exception:  # protobuf's DecodeError
        raise CliError(f"{args.signature} is not a keyplane signature file") from None
    pins = [args.fingerprint] if args.fingerprint else []
    try:
        if args.trust_state:
            state = load_trust_state(_read_payload(args.trust_state), pins)
        else:
            assert client is not None  # noqa: S101 - main() connects when no file is given
            state = _fetch_trust_state(client, args.credential.root_certificates_pem)
        verified = verify_message(payload, signed, state)
    except (MessageVerificationError, TrustStateError) as exc:
        print(f"{PROG}: signature rejected: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(
            {
                "valid": True,
                "signer_fingerprint": verified.signer_fingerprint,
                "root_fingerprint": verified.root_fingerprint,
                "signed_at": verified.signed_at.isoformat(),
                "trust_state_version": state.version,
            }
        )
    else:
        print(
            f"OK: signed by {verified.signer_subject} at {verified.signed_at.isoformat()} "
            f"(root {verified.root_fingerprint[:16]}…, trust state v{state.version})"
        )
    return 0


def parse_duration(text: str) -> int:
    """Seconds in '90s', '30m', '24h', '7d' or a plain number of seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 30m, 24h, 7d)")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


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
        _print_json({"file": str(out)})
    else:
        print(message)
    return 0


def cmd_tokens_create(client: KeyplaneClient, args: argparse.Namespace) -> int:
    token = client.create_enrollment_token(args.uses, args.ttl, args.role)
    if args.json:
        _print_json(
            {
                "token": token.token,
                "token_id": token.token_id,
                "role": token.role,
                "uses": token.uses,
                "expires": _time(token.expire_time),
            }
        )
    else:
        print(token.token)
    return 0


def _cert_json(cert: certificate_service_pb2.CertificateRecord) -> dict[str, Any]:
    return {
        "serial": cert.serial,
        "subject": cert.subject,
        "fingerprint": cert.fingerprint,
        "issuer_fingerprint": cert.issuer_fingerprint,
        "component": cert.component,
        "issued": _time(cert.issue_time),
        "not_after": _time(cert.not_after),
        "revoked": _time(cert.revoke_time, cert.HasField("revoke_time")),
        "revoke_reason": cert.revoke_reason or None,
    }


def cmd_certs_list(client: KeyplaneClient, args: argparse.Namespace) -> int:
    found = [_cert_json(c) for c in client.list_certificates(args.component or "", args.limit)]
    if args.json:
        _print_json(found)
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
    print(_table(rows, header))
    return 0


def cmd_certs_issue(client: KeyplaneClient, args: argparse.Namespace) -> int:
    files: list[Path] = args.csr
    csrs = [_read_payload(path) for path in files]
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
                    "not_after": _time(cert.not_after),
                }
            )
        roots.write_text(issued[0].roots_pem)
        if len(csrs) > ENROLL_BATCH:
            print(f"issued {len(report)}/{len(csrs)}", file=sys.stderr)
    if args.json:
        _print_json({"certificates": report, "roots_file": str(roots)})
    else:
        for entry in report:
            print(f"issued {entry['certificate_file']} (serial {entry['serial']})")
        print(f"wrote the roots to trust servers by to {roots}")
    return 0


def cmd_certs_revoke(client: KeyplaneClient, args: argparse.Namespace) -> int:
    cert = _cert_json(client.revoke_certificate(args.serial, args.reason or ""))
    if args.json:
        _print_json(cert)
    else:
        print(f"revoked {cert['serial']} ({cert['subject']})")
    return 0


class CliError(Exception):
    """A problem with the command's own input; printed without a status name."""


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        help="server HOST:PORT (mutual-TLS listener); default $KEYPLANE_SERVER, else the "
        "address noted in the credentials dir, else 127.0.0.1:7443",
    )
    common.add_argument(
        "--credentials",
        type=Path,
        help="credential dir with admin.pem and ca.pem; default $KEYPLANE_CREDENTIALS, "
        "else ./var/admin (the local server's admin credential)",
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return common


Command = Callable[[KeyplaneClient, argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="keyplane: a PKI control plane. Manage a server's key hierarchy, or run one.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _connection_options()

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
    p.add_argument("fingerprint", help="64 hex digits, optionally prefixed sha256:")
    p.set_defaults(call=cmd_roots_show)
    p = verbs.add_parser(
        "revoke",
        parents=[common],
        help="revoke a root for good (destroys its private key and revokes what it issued)",
    )
    p.add_argument("fingerprint", help="64 hex digits, optionally prefixed sha256:")
    p.add_argument("--reason", required=True, help="why; kept in the audit log")
    p.add_argument("--yes", action="store_true", help="confirm: revocation is permanent")
    p.set_defaults(call=cmd_roots_revoke)
    p = verbs.add_parser("legacy", parents=[common], help="show the legacy root's public key")
    p.set_defaults(call=cmd_roots_legacy)

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

    settings = commands.add_parser(
        "settings",
        help="read and change settings",
        description=SETTINGS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = settings.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("list", parents=[common], help="every setting and its value")
    p.add_argument("--reveal", action="store_true", help="show protected values (audited)")
    p.set_defaults(call=cmd_settings_list)
    p = verbs.add_parser("get", parents=[common], help="one setting's value")
    p.add_argument("name")
    p.add_argument("--reveal", action="store_true", help="show a protected value (audited)")
    p.set_defaults(call=cmd_settings_get)
    p = verbs.add_parser("set", parents=[common], help="change a setting")
    p.add_argument("name")
    p.add_argument("value")
    p.set_defaults(call=cmd_settings_set)

    trust = commands.add_parser("trust-state", help="the signed trust state components follow")
    verbs = trust.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "show",
        parents=[common],
        help="fetch the latest trust state, verify it against ca.pem, and show it",
    )
    p.add_argument("--out", type=Path, help="also write the signed trust state to this file")
    p.set_defaults(call=cmd_trust_state_show)

    sign_help = (
        "sign files (each at most 4 MiB) with the message-signing key; several files "
        "are signed in batches (SignMessages), up to 1,000 and 4 MiB per call"
    )
    p = commands.add_parser("sign", parents=[common], help=sign_help, description=sign_help)
    p.add_argument("file", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="signature file, for one FILE (default FILE.sig)")
    p.set_defaults(call=cmd_sign)

    p = commands.add_parser(
        "verify",
        parents=[common],
        help="verify a signed file against a trust state (offline with --trust-state)",
    )
    p.add_argument("file", type=Path)
    p.add_argument("signature", type=Path)
    p.add_argument(
        "--trust-state",
        type=Path,
        help="a trust state written by 'keyplane trust-state show --out'; without it the "
        "latest is fetched from the server",
    )
    p.add_argument("--fingerprint", help="require the trust state to be signed by this root")
    p.set_defaults(call=None, verify=True)

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

    certificates = commands.add_parser("certs", help="issued certificates")
    verbs = certificates.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("list", parents=[common], help="issued certificates, newest first")
    p.add_argument("--component", choices=["agent", "zone-server", "admin"])
    p.add_argument("--limit", type=int, default=1000)
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
    p = verbs.add_parser("revoke", parents=[common], help="revoke one certificate")
    p.add_argument("serial", help="serial number in hex, as 'certs list' shows")
    p.add_argument("--reason", help="why (kept in the audit log)")
    p.set_defaults(call=cmd_certs_revoke)

    agent.register(commands)

    for entry in entry_points(group=COMMAND_GROUP):
        entry.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "func"):  # a registered command runs on its own
        return int(args.func(args))
    try:
        if getattr(args, "verify", False) and args.trust_state:
            return run_verify(args, None)  # offline: no server, no credential
        credentials_dir = args.credentials or default_credentials_dir()
        try:
            args.credential = load_credential(credentials_dir)
        except CredentialError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 2
        server = args.server or default_server(credentials_dir)
        with KeyplaneClient.connect(server, args.credential) as client:
            if getattr(args, "verify", False):
                return run_verify(args, client)
            return int(args.call(client, args))
    except KeyplaneClientError as exc:
        print(f"{PROG}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    except (CliError, TrustStateError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
