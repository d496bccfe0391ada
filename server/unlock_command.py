"""`keyplane unlock`: give a locked server its database password over the Unix socket in
its data dir. Registered into the keyplane CLI by the server's entry point, as `serve` is."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

import grpc

from keyplane.server.locked import UNLOCK_SOCKET, unlock_socket
from keyplane.v1 import unlock_service_pb2, unlock_service_pb2_grpc

# Longer than the slowest answer: the delay after many failures, and the start itself.
UNLOCK_TIMEOUT_SECONDS = 120.0

UNLOCK_HELP = f"""\
Give a locked keyplane server its database password (PKIDatabasePassword). A server
whose pki.db is protected by a password, started without --password-file or
--password-env, opens no listener; it waits on {UNLOCK_SOCKET} in its data dir (mode
0600: only its own user can unlock it). The password is read without echo from the
terminal, or as one line from standard input. A wrong password is refused, and each
further failure is answered later.
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "unlock",
        help="give a locked server its database password",
        description=UNLOCK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("KEYPLANE_DATA_DIR") or "var"),
        help="the locked server's data dir (default $KEYPLANE_DATA_DIR, else ./var)",
    )
    parser.set_defaults(func=run_unlock)


def read_password() -> str:
    """From the terminal without echo, else one line of standard input."""
    if sys.stdin.isatty():
        return getpass.getpass("pki.db password: ")
    return sys.stdin.readline().rstrip("\r\n")


def run_unlock(args: argparse.Namespace) -> int:
    path = unlock_socket(args.data_dir)
    if not path.exists():
        print(
            f"keyplane unlock: no server is waiting to be unlocked in {args.data_dir} (no "
            f"{UNLOCK_SOCKET}): it is not running, or it is unlocked already",
            file=sys.stderr,
        )
        return 1
    password = read_password()
    if not password:
        print("keyplane unlock: no password given", file=sys.stderr)
        return 2
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stub = unlock_service_pb2_grpc.UnlockServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            response = stub.Unlock(
                unlock_service_pb2.UnlockRequest(password=password),
                timeout=UNLOCK_TIMEOUT_SECONDS,
            )
        except grpc.RpcError as exc:
            print(f"keyplane: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(
        f"unlocked: listening on {response.listen} (mutual TLS) and "
        f"{response.bootstrap_listen} (bootstrap)"
    )
    return 0
