"""`keyplane backup restore`: the server's offline command, registered into the CLI's
`backup` noun by entry point (it works on a stopped server's data dir, so it is the
server package's, and the CLI never imports the server)."""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import sys
from pathlib import Path

from keyplane.server.domain.restore import Restored, RestoreRefused, Unsealing, restore
from keyplane.server.store import Unrevoked

PROG = "keyplane backup restore"
RESTORE_HELP = """\
Restore a backup archive into a stopped server's data dir. The archive is checked and
restored into a new directory beside DIR (checksums, SQLite's integrity checks, both
databases opened, every live sealed key unsealed); only then does it take DIR's place,
and the data dir it replaces is kept as DIR.replaced-<time> until you remove it.
Refused, with nothing changed: a corrupt or truncated archive, a DIR a server has open,
and an archive older than DIR (revoked since) unless --force, with what would come back.

A pki.db without a database password is sealed with its key file (pki.db.key), which no
archive holds: restore uses DIR's own, or the one given with --key-file. A pki.db with a
password asks for it on a terminal, or reads it from --password-file.
"""


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    backup = commands.choices.get("backup")
    verbs = backup.get_default("backup_verbs") if backup is not None else None
    if verbs is None:  # the CLI has no `backup` noun: offer the verb on its own
        verbs = commands.add_parser("backup", help="restore a backup").add_subparsers(
            dest="verb", metavar="VERB", required=True
        )
    parser = verbs.add_parser(
        "restore",
        help="restore an archive into a stopped server's data dir",
        description=RESTORE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, help="the archive (from keyplane backup create)")
    parser.add_argument("--data-dir", type=Path, required=True, help="the server's data dir")
    parser.add_argument(
        "--force",
        action="store_true",
        help="restore an archive older than the data dir (what was revoked since comes back)",
    )
    parser.add_argument("--key-file", type=Path, help="pki.db.key for a pki.db without password")
    parser.add_argument("--password-file", type=Path, help="the archive's database password")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run_restore)


def _password_from(args: argparse.Namespace) -> bytes | None:
    if args.password_file is not None:
        try:
            return bytes(args.password_file.read_bytes().strip())
        except OSError as exc:
            raise RestoreRefused(f"cannot read {args.password_file}: {exc.strerror}") from None
    if sys.stdin.isatty():
        return getpass.getpass("the archive's database password: ").encode() or None
    return None


def _unrevoked_json(item: Unrevoked) -> dict[str, str]:
    return {
        "what": item.what,
        "target": item.target,
        "description": item.description,
        "revoked": item.revocation.revoked_at.isoformat(),
        "revoke_reason": item.revocation.reason,
    }


def _print_came_back(items: tuple[Unrevoked, ...], heading: str) -> None:
    if not items:
        return
    print(heading, file=sys.stderr)
    for item in items:
        print(
            f"  {item.what} {item.target}: {item.description} (revoked "
            f"{item.revocation.revoked_at:%Y-%m-%d %H:%M:%S}: {item.revocation.reason})",
            file=sys.stderr,
        )


def _report(done: Restored, as_json: bool) -> None:
    m = done.manifest
    if as_json:
        print(
            json.dumps(
                {
                    "data_dir": str(done.data_dir),
                    "replaced": str(done.replaced) if done.replaced else None,
                    "backup_created": m.created.isoformat(),
                    "trust_state_version": m.trust_state_version,
                    "revocation_sequence": m.revocation_sequence,
                    "keys": len(m.keys),
                    "tables": m.tables,
                    "came_back": [_unrevoked_json(i) for i in done.came_back],
                    "notes": list(done.notes),
                },
                indent=2,
            )
        )
        return
    print(
        f"restored {done.data_dir} from the backup of {m.created:%Y-%m-%d %H:%M:%S} UTC: "
        f"{len(m.keys)} keys, {m.tables.get('certificates', 0)} certificates, trust-state "
        f"version {m.trust_state_version}, revocation sequence {m.revocation_sequence}"
    )
    for note in done.notes:
        print(f"  {note}")
    if done.replaced is not None:
        print(f"the data dir it replaced is kept at {done.replaced}; remove it when done")
    _print_came_back(done.came_back, "came back from revoked (--force):")


def run_restore(args: argparse.Namespace) -> int:
    unsealing = Unsealing(key_file=args.key_file, password=lambda: _password_from(args))
    try:
        done = restore(
            args.file,
            args.data_dir,
            unsealing,
            datetime.datetime.now(datetime.UTC),
            force=args.force,
        )
    except RestoreRefused as exc:
        print(f"{PROG}: refused: {exc}", file=sys.stderr)
        _print_came_back(exc.came_back, "would come back from revoked:")
        print(f"{PROG}: {args.data_dir} is unchanged", file=sys.stderr)
        return 1
    _report(done, args.json)
    return 0
