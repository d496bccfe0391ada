"""`keyplane console login`: a one-time sign-in link to the admin console for the
identity of the credential it runs with."""

from __future__ import annotations

import argparse

from keyplane.clients.cli.output import print_json, timestamp
from keyplane.clients.client import KeyplaneClient

CONSOLE_HELP = """\
The admin console, served by the server itself (keyplane serve --console-listen
HOST:PORT). It has no passwords: 'login' prints a one-time link for your identity.
"""

LOGIN_HELP = """\
Print a one-time link that signs the identity of this command's credential (admin,
operator or auditor) in to the admin console: open it in a browser within five minutes;
it works once. The console then shows and allows what that identity's role may do. The
session ends when you sign out, after 8 hours, after 30 minutes unused, or as soon as
the identity is revoked. The link is a secret until used: do not paste it anywhere else.
"""


def cmd_console_login(client: KeyplaneClient, args: argparse.Namespace) -> int:
    link = client.create_sign_in_link()
    expires = timestamp(link.expire_time, link.HasField("expire_time"))
    if args.json:
        print_json(
            {"url": link.url, "expires": expires, "name": link.name, "roles": list(link.roles)}
        )
        return 0
    print(f"sign in to the console as {link.name} ({', '.join(link.roles)}); this link")
    print(f"works once, until {(expires or '')[:19].replace('T', ' ')} UTC:")
    print(link.url)
    return 0


def register(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    console = commands.add_parser(
        "console", help="the admin console: a one-time sign-in link", description=CONSOLE_HELP
    )
    verbs = console.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "login",
        parents=[common],
        help="print a one-time sign-in link for your identity",
        description=LOGIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(call=cmd_console_login)
