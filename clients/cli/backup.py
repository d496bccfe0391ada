"""`keyplane backup create|verify`: archives of a server's databases over the API, and
checking one, alone or against the live inventory. (`restore` works on a stopped
server's data dir: the server package registers it.)"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from keyplane.clients.backup_archive import (
    ArchiveCheckError,
    CheckedArchive,
    Progress,
    check_archive,
)
from keyplane.clients.cli import CliError
from keyplane.clients.cli.output import print_json, table
from keyplane.clients.client import KeyplaneClient
from keyplane.v1 import backup_service_pb2

BACKUP_HELP = """\
Back up a server while it serves, check a backup, restore one. An archive holds a copy
of the state DB (keyplane.db) and of pki.db taken at one point, a manifest (every key's
fingerprint, backend and URI, the trust-state version, the revocation sequence, row
counts) and checksums. Private keys stay sealed; a pki.db without a database password is
sealed with its key file (pki.db.key), which is not in the archive: keep it apart.

examples:
  keyplane backup create --out keyplane-$(date +%F).tar
  keyplane backup verify keyplane-2026-11-29.tar           # and against the live server
  keyplane backup verify keyplane-2026-11-29.tar --offline
  keyplane backup restore keyplane-2026-11-29.tar --data-dir /var/lib/keyplane
"""


def _summary(checked: CheckedArchive) -> dict[str, Any]:
    m = checked.manifest
    tables = m.get("tables", {})
    return {
        "created": m.get("created"),
        "server": m.get("server"),
        "trust_state_version": m.get("trust_state_version"),
        "revocation_sequence": m.get("revocation_sequence"),
        "keys": len(m.get("keys", [])),
        "certificates": tables.get("certificates", 0),
        "revocations": tables.get("revocations", 0),
        "key_stores": [
            {"file": s.get("file"), "seal": s.get("seal"), "key_file": s.get("key_file")}
            for s in m.get("key_stores", [])
        ],
        "notes": list(m.get("notes", [])),
    }


def _summary_line(summary: dict[str, Any]) -> str:
    return (
        f"backup of {summary['server']} at {summary['created']}: {summary['keys']} keys, "
        f"{summary['certificates']} certificates, {summary['revocations']} revocations, "
        f"trust-state version {summary['trust_state_version']}, revocation sequence "
        f"{summary['revocation_sequence']}"
    )


def _checked(path: Path) -> CheckedArchive:
    try:
        return check_archive(path)
    except ArchiveCheckError as exc:
        raise CliError(f"{path} is refused: {exc}") from None


def cmd_backup_create(client: KeyplaneClient, args: argparse.Namespace) -> int:
    out: Path = args.out
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise CliError(f"cannot write {partial}: {exc.strerror}") from None
    digest = hashlib.sha256()
    sent_digest = ""
    progress: Progress | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            for message in client.create_backup():
                if progress is None:
                    progress = Progress(message.total_bytes, "backup", sys.stderr)
                f.write(message.chunk)
                digest.update(message.chunk)
                progress.advance(len(message.chunk))
                sent_digest = message.archive_sha256 or sent_digest
            f.flush()
            os.fsync(f.fileno())
        if not sent_digest:
            raise CliError("the server's stream ended before the archive did; try again")
        if sent_digest != digest.hexdigest():
            raise CliError("the archive arrived damaged (its SHA-256 differs); try again")
        checked = _checked(partial)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    summary = _summary(checked)
    size = out.stat().st_size
    if args.json:
        print_json({"file": str(out), "bytes": size, "sha256": sent_digest, **summary})
        return 0
    print(f"wrote {out} ({size} bytes, sha256 {sent_digest})")
    print(_summary_line(summary))
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0


def _key_json(key: backup_service_pb2.BackupKey) -> dict[str, Any]:
    return {
        "fingerprint": key.fingerprint,
        "kind": key.kind,
        "name": key.name,
        "state": key.state,
        "backend": key.backend,
        "key_uri": key.key_uri,
        "in_archive": key.in_archive,
    }


def _live_json(found: backup_service_pb2.VerifyBackupResponse) -> dict[str, Any]:
    return {
        "missing_from_backup": [_key_json(k) for k in found.missing_from_backup],
        "missing_from_live": [_key_json(k) for k in found.missing_from_live],
        "state_changed": [
            {**_key_json(c.key), "live_state": c.live_state} for c in found.state_changed
        ],
        "not_held": [{**_key_json(u.key), "reason": u.reason} for u in found.not_held],
        "trust_state_version": {
            "backup": found.backup_trust_state_version,
            "live": found.live_trust_state_version,
        },
        "revocation_sequence": {
            "backup": found.backup_revocation_sequence,
            "live": found.live_revocation_sequence,
        },
        "tables": {t.table: {"backup": t.backup_rows, "live": t.live_rows} for t in found.tables},
    }


def _print_keys(heading: str, rows: list[list[str]]) -> None:
    if not rows:
        print(f"{heading}: none")
        return
    print(f"{heading}:")
    for line in table(rows, ["KIND", "NAME", "FINGERPRINT", "STATE", "BACKEND"]).splitlines():
        print(f"  {line}")


def _print_live(live: dict[str, Any]) -> None:
    def row(k: dict[str, Any], state: str) -> list[str]:
        return [k["kind"], k["name"], k["fingerprint"], state, k["backend"]]

    trust, seq = live["trust_state_version"], live["revocation_sequence"]
    print(
        f"against the live server: trust-state version {trust['backup']} (live "
        f"{trust['live']}), revocation sequence {seq['backup']} (live {seq['live']})"
    )
    _print_keys(
        "keys live that the backup lacks", [row(k, k["state"]) for k in live["missing_from_backup"]]
    )
    _print_keys(
        "keys in the backup that live lacks",
        [row(k, k["state"]) for k in live["missing_from_live"]],
    )
    _print_keys(
        "keys whose state changed (backup -> live)",
        [row(k, f"{k['state']} -> {k['live_state']}") for k in live["state_changed"]],
    )
    unheld = live["not_held"]
    if unheld:
        print("keys their backend no longer holds:")
        for k in unheld:
            print(f"  {k['kind']} {k['name']} {k['fingerprint']} ({k['key_uri']}): {k['reason']}")
    else:
        print("keys their backend no longer holds: none")
    changed = [
        f"{t} {n['backup']} (live {n['live']})"
        for t, n in live["tables"].items()
        if n["backup"] != n["live"]
    ]
    print(f"rows that differ: {', '.join(changed) if changed else 'none'}")


def cmd_backup_verify(client: KeyplaneClient | None, args: argparse.Namespace) -> int:
    checked = _checked(args.file)
    summary = _summary(checked)
    live = None
    if client is not None:
        live = _live_json(client.verify_backup(checked.manifest_bytes))
    if args.json:
        print_json({"file": str(args.file), "intact": True, "backup": summary, "live": live})
        return 0
    members = len(checked.manifest["members"])
    print(f"{args.file}: intact ({members} databases, checksums and SQLite's integrity check)")
    print(_summary_line(summary))
    if live is not None:
        _print_live(live)
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    backup = commands.add_parser(
        "backup",
        help="back up, check and restore a server's databases",
        description=BACKUP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = backup.add_subparsers(dest="verb", metavar="VERB", required=True)
    # The server package adds `restore` here (keyplane.commands entry point).
    backup.set_defaults(backup_verbs=verbs)
    p = verbs.add_parser(
        "create",
        parents=[common],
        help="stream a backup archive from the server (admin)",
        description="Take a backup while the server serves: both databases at one point, "
        "in one archive (mode 0600). A progress bar on a terminal; plain lines otherwise.",
    )
    p.add_argument("--out", type=Path, required=True, help="the archive file to write")
    p.set_defaults(call=cmd_backup_create)
    p = verbs.add_parser(
        "verify",
        parents=[common],
        help="check an archive, and compare it with the live inventory",
        description="Check the archive's checksums and SQLite's integrity check of each "
        "database; then, unless --offline, compare its manifest with the live server: keys "
        "the backup lacks, keys live lacks, state changes, and keys whose backend (an HSM's "
        "token, by URI) no longer holds them. Admin or auditor.",
    )
    p.add_argument("file", type=Path, help="the archive")
    p.add_argument(
        "--offline",
        dest="no_server",
        action="store_true",
        help="only the checks that need no server (no credential either)",
    )
    p.set_defaults(call=cmd_backup_verify, offline=lambda a: a.no_server)
