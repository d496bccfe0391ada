"""What `--help` says beyond the options: a description for every command (its one-line
help, when it has no longer one) and examples, kept here in one table so that every
command's help reads alike. `tests/test_cli_help.py` walks the whole parser and fails on
a command without a description or an example."""

from __future__ import annotations

import argparse

TOP_EPILOG = """\
Connection options (--server, --credentials, --json) go before or after the command.
Defaults: $KEYPLANE_SERVER, else the address in <credentials>/endpoint.json, else
127.0.0.1:7443; $KEYPLANE_CREDENTIALS, else $KEYPLANE_DATA_DIR/admin, else ./var/admin.

Examples:
  keyplane serve --data-dir var          start a server (make run does this)
  keyplane roots list                    the root keys, with the local admin credential
  keyplane --server 10.0.0.5:7443 --credentials ~/kp-admin keys list
  keyplane COMMAND --help                what a command does, with examples
"""

# Command path -> example lines (each a command, then what it does).
EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {
    "roots": (("keyplane roots list", "the active, revoked and legacy roots"),),
    "roots list": (
        ("keyplane roots list", "names, fingerprints, states"),
        ("keyplane roots list --json | jq '.[].fingerprint'", "the fingerprints only"),
    ),
    "roots create": (
        ("keyplane roots create", "a second root (the algorithm of the server's config)"),
        ("keyplane roots create --algorithm ec-p384", "a P-384 root"),
    ),
    "roots show": (("keyplane roots show 3f9a1c2e", "a root by a prefix of its fingerprint"),),
    "roots coverage": (
        ("keyplane roots coverage", "how many components moved to the newest root, who has not"),
        ("keyplane roots coverage --json --limit 100", "the figures and the 100 slowest"),
    ),
    "roots revoke": (
        ("keyplane roots revoke 3f9a1c2e --dry-run", "what revoking it would revoke and strand"),
        (
            "keyplane roots revoke 3f9a1c2e --reason 'rotated to Root 1' --yes",
            "revoke the old root once every component has the new one",
        ),
        (
            "keyplane roots revoke 3f9a1c2e --reason 'key compromised' --yes --force",
            "revoke at once, however few have moved (audited as forced)",
        ),
    ),
    "rotation": (("keyplane rotation forecast", "the renewals expected in the next 72 hours"),),
    "rotation forecast": (
        ("keyplane rotation forecast", "renewals per hour for 3 days, and a rotation's burst"),
        ("keyplane rotation forecast --hours 336 --json", "two weeks, as JSON"),
    ),
    "roots legacy": (("keyplane roots legacy --json", "the legacy root's public key"),),
    "keys": (("keyplane keys list", "the subordinate keys and when they rotate"),),
    "keys list": (
        ("keyplane keys list", "every subordinate key"),
        ("keyplane keys list --kind intermediate-tls", "only the intermediates"),
    ),
    "keys rotate": (("keyplane keys rotate message-signing", "a new message-signing key now"),),
    "settings": (("keyplane settings list", "every setting"),),
    "settings list": (
        ("keyplane settings list", "every setting, protected values masked"),
        ("keyplane settings list --reveal", "with protected values (admin; audited)"),
    ),
    "settings get": (("keyplane settings get PKIClientTLSKeyValidityHours", "one setting"),),
    "settings set": (
        ("keyplane settings set PKIClientTLSKeyValidityHours 72", "agent certificates last 3 days"),
        (
            "keyplane settings set PKIClientTLSKeyValidityHours 72 --dry-run",
            "the renewal forecast before and after, nothing saved",
        ),
    ),
    "trust-state": (("keyplane trust-state show", "the signed trust state, verified"),),
    "trust-state show": (
        ("keyplane trust-state show", "version, roots, keys, revocations"),
        ("keyplane trust-state show --out trust.bin", "save it for offline verification"),
    ),
    "sign": (
        ("keyplane sign release.tar.gz", "writes release.tar.gz.sig"),
        ("keyplane sign a.conf b.conf c.conf", "several files, in batches"),
    ),
    "verify": (
        ("keyplane verify release.tar.gz release.tar.gz.sig", "against the server's trust state"),
        (
            "keyplane verify f f.sig --trust-state trust.bin --fingerprint 3f9a…(64 hex)",
            "offline, against a saved trust state (binary or JSON) signed by a pinned root",
        ),
    ),
    "bundle": (("keyplane bundle download --out bundle.pb", "the init bundle for new agents"),),
    "bundle download": (
        ("keyplane bundle download --out bundle.pb", "roots and addresses, no secret"),
    ),
    "tokens": (("keyplane tokens create --uses 10 --ttl 24h", "a token for ten enrollments"),),
    "tokens create": (
        ("keyplane tokens create", "one enrollment, valid the default time"),
        ("keyplane tokens create --role zone-server", "a token a zone server enrolls with"),
    ),
    "tokens list": (("keyplane tokens list --all", "spent, expired and revoked ones too"),),
    "tokens revoke": (("keyplane tokens revoke 7c1e09d2", "a token by the id tokens list shows"),),
    "certs": (("keyplane certs list --component agent", "the agents' certificates"),),
    "certs list": (
        ("keyplane certs list --component agent --limit 20", "the newest 20"),
        ("keyplane certs list --search meter-12", "by part of the name or a serial's start"),
    ),
    "certs issue": (
        (
            "keyplane certs issue csrs/*.csr --token $TOKEN --out-dir certs",
            "certificates for many CSRs at once",
        ),
    ),
    "certs revoke": (
        ("keyplane certs revoke 4a0c…(serial) --reason 'host retired'", "revoke one certificate"),
    ),
    "zones": (("keyplane zones list", "the live zone servers and when they were last seen"),),
    "zones list": (("keyplane zones list --all", "revoked zone servers too"),),
    "zones show": (("keyplane zones show eu-west-1", "one zone server"),),
    "zones revoke": (
        (
            "keyplane zones revoke eu-west-1 --reason 'host compromised' --yes",
            "revoke a zone, its intermediate and what it issued",
        ),
    ),
    "identities": (
        ("keyplane identities create alice@example.org --role operator --out alice", "a person"),
    ),
    "identities create": (
        (
            "keyplane identities create alice@example.org --role operator --out alice",
            "writes alice/admin.pem, ca.pem, endpoint.json",
        ),
        ("keyplane --credentials alice zones list", "then use it"),
    ),
    "identities list": (("keyplane identities list --all", "revoked and expired ones too"),),
    "identities revoke": (
        (
            "keyplane identities revoke alice@example.org --reason 'left the team' --yes",
            "every live credential of the name",
        ),
    ),
    "backup": (("keyplane backup create --out kp.backup", "a backup archive"),),
    "backup create": (("keyplane backup create --out kp-$(date +%F).backup", "a dated archive"),),
    "backup verify": (
        ("keyplane backup verify kp.backup", "check it and compare it with the live server"),
        ("keyplane backup verify kp.backup --offline", "check the archive alone"),
    ),
    "backup restore": (
        (
            "keyplane backup restore kp.backup --data-dir var --key-file pki.db.key",
            "into a stopped server's (empty) data dir",
        ),
    ),
    "audit": (("keyplane audit list --since 24h", "what happened in the last day"),),
    "audit list": (
        ("keyplane audit list --since 24h", "the last day's events"),
        ("keyplane audit list --action access.refused --limit 20", "recent refusals"),
    ),
    "audit verify": (("keyplane audit verify", "check the hash chain end to end"),),
    "trust": (("keyplane trust list", "peers, requests under way and their codes"),),
    "trust request": (
        (
            "keyplane trust request --peer pki-b.example.org:7444 --peer-fingerprint "
            "<B's root, 64 hex, from B's admin>",
            "ask server B for trust; compare the code shown with B's admin",
        ),
    ),
    "trust list": (("keyplane trust list --json", "requests, codes and trusted peers"),),
    "trust approve": (
        ("keyplane trust approve 5f2c…(request id)", "once both admins read the same code"),
    ),
    "trust reject": (
        ("keyplane trust reject 5f2c…(request id) --reason 'unexpected'", "refuse a request"),
    ),
    "trust revoke": (
        ("keyplane trust revoke pki-b.example.org --reason 'decommissioned'", "end a trust"),
    ),
    "trust history": (("keyplane trust history --limit 20", "the last 20 steps"),),
    "agent": (
        (
            "keyplane agent run --bundle bundle.pb --token $TOKEN --data-dir agent1",
            "enroll and run",
        ),
    ),
    "agent run": (
        (
            "keyplane agent run --bundle bundle.pb --token $TOKEN --data-dir agent1",
            "first start: enroll with a token from 'keyplane tokens create'",
        ),
        ("keyplane agent run --data-dir agent1", "later starts"),
    ),
    "agent status": (("keyplane agent status --data-dir agent1 --json", "what it holds"),),
    "agent verify": (
        ("keyplane agent verify f f.sig --data-dir agent1", "against the agent's trust state"),
    ),
    "serve": (
        ("keyplane serve --data-dir var", "start, initialising var on the first start"),
        ("keyplane serve --config /etc/keyplane/server.toml --workers 2", "two serving processes"),
        (
            "keyplane serve --data-dir var --console-listen 127.0.0.1:7445",
            "with the admin console (sign in: keyplane console login)",
        ),
    ),
    "console": (("keyplane console login", "a one-time sign-in link for your identity"),),
    "console login": (
        ("keyplane console login", "as the local admin credential"),
        ("keyplane console login --credentials ./alice", "as another identity"),
    ),
    "status": (
        ("keyplane status", "whether it serves, its backends, roots, expiries, zones, backup"),
        ("keyplane status --json --expiries 10", "for a script or a monitor"),
    ),
    "unlock": (("keyplane unlock --data-dir var", "asks for the password and unlocks"),),
    "zone": (
        (
            "keyplane zone serve --data-dir zone1 --bundle bundle.pb --token $TOKEN",
            "enroll and serve",
        ),
    ),
    "zone serve": (
        (
            "keyplane zone serve --data-dir zone1 --bundle bundle.pb --token $TOKEN "
            "--name eu-west-1 --listen 127.0.0.1:7543",
            "first start: enroll with a zone-server token",
        ),
        ("keyplane zone serve --data-dir zone1", "later starts"),
    ),
}


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
    return found


def command_tree(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """Every command under `parser`: (its path, its one-line help, its parser)."""
    tree = []
    for name, one_line, sub in _subcommands(parser):
        tree.append((" ".join((*path, name)), one_line, sub))
        tree.extend(command_tree(sub, (*path, name)))
    return tree


def _examples(lines: tuple[tuple[str, str], ...]) -> str:
    text = "Examples:\n" if len(lines) > 1 else "Example:\n"
    for command, what in lines:
        text += f"  {command}\n      {what}\n"
    return text


def complete_help(parser: argparse.ArgumentParser) -> None:
    """Give every command a description and its examples."""
    for path, one_line, sub in command_tree(parser):
        if not sub.description and one_line:
            sub.description = one_line[0].upper() + one_line[1:] + "."
        examples = EXAMPLES.get(path)
        if examples:
            sub.epilog = (sub.epilog + "\n\n" if sub.epilog else "") + _examples(examples)
            if sub.formatter_class is argparse.HelpFormatter:
                sub.formatter_class = ExamplesFormatter


class ExamplesFormatter(argparse.HelpFormatter):
    """Wraps prose as argparse does, and keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        filled = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines[1:]):
                filled.append("\n".join(indent + line for line in lines))
            else:
                filled.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(filled)
