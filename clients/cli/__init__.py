"""The `keyplane` command line: `keyplane <noun> <verb>`, one module per noun, plus
commands that installed parts of keyplane register through the `keyplane.commands`
entry-point group (the server registers `serve` that way, so the CLI never imports the
server). Here: the parser, the connection options every noun shares, and how a failed
call is reported."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, entry_points
from importlib.metadata import version as metadata_version
from pathlib import Path

import grpc

from keyplane.clients.cli.help import TOP_EPILOG, complete_help
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


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


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


def _add_connection_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--server",
        default=default,
        help="server HOST:PORT (mutual-TLS listener); default $KEYPLANE_SERVER, else the "
        "address noted in the credentials dir, else 127.0.0.1:7443",
    )
    parser.add_argument(
        "--credentials",
        type=Path,
        default=default,
        help="credential dir with admin.pem and ca.pem; default $KEYPLANE_CREDENTIALS, "
        "else ./var/admin (the local server's admin credential)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default, help="print machine-readable JSON"
    )


def connection_options() -> argparse.ArgumentParser:
    """The options every command that calls the server takes (a parent parser). They may
    also come before the command (`keyplane --server H:P roots list`): here they default
    to nothing at all, so that a value given before the command is kept."""
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common, argparse.SUPPRESS)
    return common


def version() -> str:
    try:
        return metadata_version("keyplane")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    # Imported here: each noun's module imports this package for CliError and PROG.
    from keyplane.clients import agent
    from keyplane.clients.cli import (
        audit,
        backup,
        bundle,
        certs,
        console,
        identities,
        keys,
        roots,
        rotation,
        settings,
        signing,
        status,
        tokens,
        trust,
        trust_state,
        zones,
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="keyplane: a PKI control plane. Manage a server's key hierarchy, or run one.",
        epilog=TOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    _add_connection_options(parser, None)
    parser.set_defaults(json=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = connection_options()
    nouns = (
        roots, keys, rotation, settings, trust_state, signing, bundle, tokens, certs, zones,
        identities, backup, audit, trust, status, console,
    )  # fmt: skip
    for noun in nouns:
        noun.register(commands, common)
    agent.register(commands)
    for entry in entry_points(group=COMMAND_GROUP):
        entry.load()(commands)
    complete_help(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "func"):  # a registered command runs on its own
            return int(args.func(args))
        return _call_server(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the command reads or writes
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the last line of defence: one line, never a traceback
        if os.environ.get("KEYPLANE_DEBUG"):
            raise
        print(
            f"{PROG}: unexpected error: {type(exc).__name__}: {exc} "
            "(set KEYPLANE_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 70


def _call_server(args: argparse.Namespace) -> int:
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
        hint = unreachable_hint(exc, args)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    except (CliError, TrustStateError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def unreachable_hint(exc: KeyplaneClientError, args: argparse.Namespace) -> str:
    """What to check when the call never reached a keyplane server."""
    if exc.code is not grpc.StatusCode.UNAVAILABLE:
        return ""
    credentials_dir = args.credentials or default_credentials_dir()
    server = args.server or default_server(credentials_dir)
    text = exc.message.lower()
    if "connection refused" in text or ("failed to connect" in text and "ssl" not in text):
        return (
            f"hint: nothing answers at {server}. Is the server running ('keyplane serve', "
            "or 'make run')? Point --server or $KEYPLANE_SERVER at its mutual-TLS listener."
        )
    if "ssl" in text or "handshake" in text or "certificate" in text:
        return (
            f"hint: {server} answered but the TLS handshake failed: is it a keyplane "
            f"server whose roots are in {credentials_dir / 'ca.pem'}, and is the "
            "credential in that dir live (not revoked or expired)?"
        )
    if "deadline" in text or "timeout" in text:
        return f"hint: {server} did not answer in time; is it overloaded or behind a firewall?"
    return ""


if __name__ == "__main__":
    sys.exit(main())
