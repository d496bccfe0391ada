"""The CLI as a platform engineer meets it: help with examples for every command,
`--version`, connection options before or after the command, fingerprint prefixes, a
hint when nothing answers, the trust state as binary or JSON, and no traceback from any
command given bad input."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from keyplane.clients.cli import build_parser, main
from keyplane.clients.cli.help import command_tree
from keyplane.server.domain.inputs import resolve_fingerprint
from keyplane.server.errors import InvalidArgument, NotFound
from tests.serverkit import KEYPLANE, RunningServer, running_server

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("cli") / "data") as running:
        yield running


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the real CLI entry point in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as exc:  # argparse's own errors and --help
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


def connect(server: RunningServer) -> tuple[str, ...]:
    return ("--server", server.listen, "--credentials", str(server.admin_dir))


# -- help ----------------------------------------------------------------------------


def test_every_command_has_a_description_and_an_example() -> None:
    tree = command_tree(build_parser())
    assert len(tree) > 40
    missing = []
    for path, _, parser in tree:
        text = parser.format_help()
        if not parser.description or "Example" not in text:
            missing.append(path)
    assert not missing, f"commands without a description or an example: {missing}"


def test_version_and_top_level_help() -> None:
    version = subprocess.run(
        [KEYPLANE, "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert re.fullmatch(r"keyplane \d+\.\d+\.\d+\S*\n", version.stdout), version.stdout
    status, out, _ = cli("--help")
    assert status == 0
    assert "before or after the command" in out and "Examples:" in out


# -- connection options anywhere --------------------------------------------------------


def test_connection_options_before_or_after_the_command(server: RunningServer) -> None:
    before = cli(*connect(server), "--json", "roots", "list")
    after = cli("roots", "list", "--json", *connect(server))
    mixed = cli("--json", "roots", "list", *connect(server))
    assert before[0] == after[0] == mixed[0] == 0, (before[2], after[2], mixed[2])
    assert json.loads(before[1]) == json.loads(after[1]) == json.loads(mixed[1])
    assert json.loads(before[1])["active"]
    # A value given after the command wins over one given before it.
    status, _, err = cli("--server", "127.0.0.1:1", "roots", "list", *connect(server))
    assert status == 0, err


# -- fingerprint prefixes ---------------------------------------------------------------


def test_roots_are_found_by_an_unambiguous_prefix_of_eight_or_more(
    server: RunningServer,
) -> None:
    status, out, err = cli(*connect(server), "--json", "roots", "list")
    assert status == 0, err
    fingerprint = json.loads(out)["active"][0]["fingerprint"]
    for prefix in (fingerprint[:8], f"sha256:{fingerprint[:12]}", fingerprint.upper()[:20]):
        status, out, err = cli(*connect(server), "--json", "roots", "show", prefix)
        assert status == 0, err
        assert json.loads(out)["fingerprint"] == fingerprint
    status, _, err = cli(*connect(server), "roots", "show", fingerprint[:7])
    assert status == 1 and "INVALID_ARGUMENT" in err and "at least 8" in err
    unknown = "0" * 8 if not fingerprint.startswith("0" * 8) else "f" * 8
    status, _, err = cli(*connect(server), "roots", "show", unknown)
    assert status == 1 and "NOT_FOUND" in err and unknown in err
    # Revoking by a prefix needs two roots; the only one is refused, by prefix too.
    status, _, err = cli(
        *connect(server), "roots", "revoke", fingerprint[:10], "--reason", "test", "--yes"
    )
    assert status == 1 and "FAILED_PRECONDITION" in err and "only active root" in err


def test_an_ambiguous_prefix_lists_the_matches() -> None:
    known = ["ab12cd34" + "0" * 56, "ab12cd34" + "1" * 56, "ff" * 32]
    with pytest.raises(InvalidArgument) as ambiguous:
        resolve_fingerprint("ab12cd34", known, "root key")
    assert known[0] in str(ambiguous.value) and known[1] in str(ambiguous.value)
    assert resolve_fingerprint("ab12cd340", known, "root key") == known[0]
    assert resolve_fingerprint("sha256:" + "FF" * 32, known, "root key") == "ff" * 32
    with pytest.raises(NotFound):
        resolve_fingerprint("12345678", known, "root key")
    for bad in ("ab12cd3", "ab12cd34zz", "", "sha256:", "ab" * 33):
        with pytest.raises(InvalidArgument):
            resolve_fingerprint(bad, known, "root key")


# -- when nothing answers ----------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_hint_when_nothing_answers(server: RunningServer) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    result = subprocess.run(
        [KEYPLANE, "roots", "list", "--server", address, "--credentials", str(server.admin_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("keyplane: UNAVAILABLE:")
    assert f"hint: nothing answers at {address}. Is the server running" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_hint_when_the_server_is_not_the_credentials_one(
    server: RunningServer, tmp_path: Path
) -> None:
    with running_server(tmp_path / "other") as other:
        # The other server's listener, with this server's credential: its roots differ.
        status, _, err = cli("roots", "list", "--server", other.listen, *connect(server)[2:])
    assert status == 1 and "UNAVAILABLE" in err
    assert "TLS handshake failed" in err and "ca.pem" in err


# -- the trust state, binary or JSON ------------------------------------------------------


def test_verify_takes_the_trust_state_as_binary_or_as_json(
    server: RunningServer, tmp_path: Path
) -> None:
    document = tmp_path / "release.txt"
    document.write_text("release 1\n")
    status, _, err = cli(*connect(server), "sign", str(document))
    assert status == 0, err
    binary = tmp_path / "trust.bin"
    status, _, err = cli(*connect(server), "trust-state", "show", "--out", str(binary))
    assert status == 0, err
    status, out, err = cli(*connect(server), "--json", "trust-state", "show")
    assert status == 0, err
    as_json = tmp_path / "trust.json"
    as_json.write_text(out)
    root = json.loads(out)["roots"][0]["fingerprint"]
    signature = f"{document}.sig"
    for form in (binary, as_json):
        status, out, err = cli(
            "--json", "verify", str(document), signature, "--trust-state", str(form),
            "--fingerprint", root,
        )  # fmt: skip
        assert status == 0, (form, err)
        assert json.loads(out)["valid"] is True
    garbage = tmp_path / "garbage.json"
    for content in (b"{not json", b'{"version": 3}', b"\x00\x01garbage", b"", b'{"signed": "!!"}'):
        garbage.write_bytes(content)
        status, _, err = cli("verify", str(document), signature, "--trust-state", str(garbage))
        assert status == 1, content
        assert err.startswith(f"keyplane: {garbage}: the trust state"), err
        assert "Traceback" not in err and "unexpected error" not in err


# -- no traceback, whatever the input -----------------------------------------------------


def bad_inputs(server: RunningServer, tmp: Path) -> list[tuple[str, ...]]:
    missing = str(tmp / "missing")
    junk = tmp / "junk"
    junk.write_bytes(b"\x00garbage\xff" * 10)
    c = connect(server)
    return [
        ("roots",),
        ("roots", "show", *c),
        ("roots", "show", "nothex!!", *c),
        ("roots", "revoke", "ab" * 32, "--reason", "", "--yes", *c),
        ("roots", "create", "--algorithm", "dsa-1024", *c),
        ("keys", "rotate", "root", *c),
        ("keys", "list", "--kind", "nope", *c),
        ("settings", "get", "NoSuchSetting", *c),
        ("settings", "set", "PKIClientTLSKeyValidityHours", "-5", *c),
        ("settings", "set", "PKIClientTLSKeyValidityHours", "a" * 5000, *c),
        ("trust-state", "show", "--out", "/proc/nope/trust.bin", *c),
        ("sign", missing, *c),
        ("verify", missing, missing, *c),
        ("verify", str(junk), str(junk), "--trust-state", str(junk)),
        ("bundle", "download", "--out", "/proc/nope/bundle.pb", *c),
        ("tokens", "create", "--uses", "0", *c),
        ("tokens", "create", "--ttl", "forever", *c),
        ("tokens", "revoke", "no-such-token", *c),
        ("certs", "list", "--limit", "-1", *c),
        ("certs", "issue", str(junk), "--token", "x", *c),
        ("certs", "issue", missing, "--token", "x", *c),
        ("certs", "revoke", "zz", "--reason", "r", *c),
        ("zones", "show", "no-such-zone", *c),
        ("zones", "revoke", "no-such-zone", "--reason", "r", "--yes", *c),
        ("identities", "create", "bad\nname", "--role", "operator", "--out", missing, *c),
        ("identities", "revoke", "nobody@example.org", "--reason", "r", "--yes", *c),
        ("backup", "verify", missing, *c),
        ("backup", "verify", str(junk), "--offline"),
        ("backup", "create", "--out", "/proc/nope/kp.backup", *c),
        ("backup", "restore", str(junk), "--data-dir", str(tmp / "restored")),
        ("audit", "list", "--since", "yesterday-ish", *c),
        ("agent", "status", "--data-dir", missing),
        ("agent", "verify", str(junk), str(junk), "--data-dir", missing),
        ("agent", "run", "--data-dir", str(tmp / "agent"), "--bundle", str(junk)),
        ("serve", "--data-dir", str(tmp / "srv"), "--config", str(junk)),
        ("serve", "--data-dir", str(tmp / "srv"), "--workers", "0"),
        ("serve", "--data-dir", str(tmp / "srv"), "--listen", "not-an-address"),
        ("unlock", "--data-dir", missing),
        ("zone", "serve", "--data-dir", str(tmp / "zone"), "--bundle", str(junk)),
        ("zone", "serve", "--data-dir", str(tmp / "zone")),
        ("zone", "serve", "--data-dir", str(tmp / "zone"), "--config", str(junk)),
        ("roots", "list", "--credentials", missing),
        ("roots", "list", "--credentials", str(junk)),
        ("roots", "list", "--server", "::::nonsense", "--credentials", str(server.admin_dir)),
    ]


def test_no_command_prints_a_traceback_for_bad_input(server: RunningServer, tmp_path: Path) -> None:
    for argv in bad_inputs(server, tmp_path):
        status, out, err = cli(*argv)
        assert status != 0, (argv, out)
        assert err.strip(), argv
        assert "Traceback" not in err + out, (argv, err)
        assert "unexpected error" not in err, (argv, err)
        # What it says last is the one line (log records, a warning, may come before).
        last = err.strip().splitlines()[-1]
        assert last.startswith("keyplane") or err.startswith("usage: keyplane"), (argv, err)


# -- make run and the tour ---------------------------------------------------------------


def test_the_server_says_what_to_run_next(server: RunningServer, tmp_path: Path) -> None:
    from tests.serverkit import ServerProcess

    process = ServerProcess(tmp_path / "data")
    try:
        # The endpoint note is written as it starts serving; its lines follow.
        deadline = time.monotonic() + 30
        while "next, in another shell:" not in process.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "next, in another shell:" in process.output()
        assert f"--credentials {tmp_path / 'data' / 'admin'} roots list" in process.output()
    finally:
        assert process.stop() == 0


def test_the_tour_files_are_ignored_by_git() -> None:
    tour = [
        "var/keyplane.db", "var-zone/zone.db", "var-agent/agent.key", "var-hsm/pki.db",
        "keyplane-init.dat", "trust.bin", "trust.json", "hsm-pin", "keyplane.toml",
        "release.tar.sig", "kp.backup",
    ]  # fmt: skip
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *tour],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sorted(result.stdout.split()) == sorted(tour), result.stdout + result.stderr
    kept = subprocess.run(
        ["git", "check-ignore", "--no-index", "README.md", "server/app.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert kept.stdout == ""
