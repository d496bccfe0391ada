"""The `keyplane` command line: `keyplane <noun> <verb>`, one module per noun, plus
commands that installed parts of keyplane register through the `keyplane.commands`
entry-point group (the server registers `serve` that way, so the CLI never imports the
server). Here: the parser, the connection options every noun shares, and how a failed
call is reported."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.credentials import (
    CredentialError,
    default_credentials_dir,
    default_server,
    load_credential,
)
from keyplane.clients.trust import TrustStateError

COMMAND_GROUP = "keyplane.commands"
PROG = "keyplane"

# What a command says to add when the server wants more than the command line gave:
# ErrorInfo reason -> (the flag, the hint). A command lists its own (set_defaults(hints=)).
Hints = Mapping[str, tuple[str, str]]
CONFIRM_HINTS: Hints = {"CONFIRMATION_REQUIRED": ("--yes", "add --yes to confirm")}


class CliError(Exception):
    """A problem with the command's own input; printed without a status name."""


def read_file(path: Path) -> bytes:
    """A file the command was given; CliError (not a traceback) if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def failure_line(exc: KeyplaneClientError, hints: Hints) -> str:
    """`keyplane: STATUS: message`, naming the flag to add if the server's message does
    not already."""
    message = exc.message
    flag, hint = hints.get(exc.reason, ("", ""))
    if flag and flag not in message:
        message = f"{message}; {hint}"
    return f"{PROG}: {exc.code.name}: {message}"


def connection_options() -> argparse.ArgumentParser:
    """The options every command that calls the server takes (a parent parser)."""
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


def build_parser() -> argparse.ArgumentParser:
    # Imported here: each noun's module imports this package for CliError and PROG.
    from keyplane.clients import agent
    from keyplane.clients.cli import (
        bundle,
        certs,
        identities,
        keys,
        roots,
        settings,
        signing,
        tokens,
        trust,
        trust_state,
        zones,
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="keyplane: a PKI control plane. Manage a server's key hierarchy, or run one.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = connection_options()
    nouns = (
        roots,
        keys,
        settings,
        trust_state,
        signing,
        bundle,
        tokens,
        certs,
        zones,
        identities,
        trust,
    )
    for noun in nouns:
        noun.register(commands, common)
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
        offline = getattr(args, "offline", None)
        if offline is not None and offline(args):
            return int(args.call(None, args))  # no server, no credential
        credentials_dir = args.credentials or default_credentials_dir()
        try:
            args.credential = load_credential(credentials_dir)
        except CredentialError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 2
        server = args.server or default_server(credentials_dir)
        with KeyplaneClient.connect(server, args.credential) as client:
            return int(args.call(client, args))
    except KeyplaneClientError as exc:
        print(failure_line(exc, getattr(args, "hints", {})), file=sys.stderr)
        return 1
    except (CliError, TrustStateError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
