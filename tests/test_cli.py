"""The keyplane CLI against a real `keyplane serve` subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverkit import FQDN, KEYPLANE, ServerProcess, run_cli


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data")
    yield process
    assert process.stop() == 0


def cli_json(data_dir: Path, *args: str) -> object:
    result = run_cli(*args, "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_serve_prints_address_and_root_and_restarts_without_creating(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data)
    listing = cli_json(data, "roots", "list")
    assert first.stop() == 0
    output = first.output()
    assert "listening on 127.0.0.1:" in output
    root = listing["active"][0]  # type: ignore[index]
    assert f"sha256:{root['fingerprint']}" in output
    assert "created root" in output

    second = ServerProcess(data)
    again = cli_json(data, "roots", "list")
    assert second.stop() == 0
    assert again == listing
    # Both runs log to one file: only the first initialised anything.
    assert second.output().count("initialised") == 1
    assert second.output().count("listening on") == 2


def test_roots_rotation_through_the_cli(served: ServerProcess) -> None:
    data = served.data_dir
    listing = cli_json(data, "roots", "list")
    assert isinstance(listing, dict)
    assert [r["name"] for r in listing["active"]] == [f"{FQDN} Root 0"]
    assert listing["legacy"]["name"] == "legacy-root"
    old = listing["active"][0]
    assert set(old) >= {
        "name",
        "number",
        "fingerprint",
        "algorithm",
        "backend",
        "key_uri",
        "state",
        "created",
        "certificate_pem",
    }

    created = cli_json(data, "roots", "create")
    assert isinstance(created, dict) and created["name"] == f"{FQDN} Root 1"

    refused = run_cli("roots", "create", data_dir=data)
    assert refused.returncode != 0
    assert refused.stderr.startswith("keyplane: FAILED_PRECONDITION: ")

    unconfirmed = run_cli(
        "roots", "revoke", old["fingerprint"], "--reason", "rotate", data_dir=data
    )
    assert unconfirmed.returncode != 0 and "--yes" in unconfirmed.stderr

    revoked = cli_json(data, "roots", "revoke", old["fingerprint"], "--reason", "rotate", "--yes")
    assert isinstance(revoked, dict) and revoked["state"] == "revoked"
    assert revoked["revoke_reason"] == "rotate"

    shown = cli_json(data, "roots", "show", "sha256:" + old["fingerprint"])
    assert isinstance(shown, dict) and shown["state"] == "revoked"
    after = cli_json(data, "roots", "list")
    assert isinstance(after, dict)
    assert [r["fingerprint"] for r in after["revoked"]] == [old["fingerprint"]]

    table = run_cli("roots", "list", data_dir=data)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "STATE", "FINGERPRINT"]
    assert "revoked" in table.stdout and "legacy" in table.stdout

    legacy = cli_json(data, "roots", "legacy")
    assert isinstance(legacy, dict)
    assert legacy["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")


def test_cli_errors_name_the_status_and_exit_non_zero(served: ServerProcess) -> None:
    bad = run_cli("roots", "show", "xyz", data_dir=served.data_dir)
    assert bad.returncode == 1
    assert bad.stderr.startswith("keyplane: INVALID_ARGUMENT: a fingerprint is 64 hex digits")
    missing = run_cli("roots", "show", "ab" * 32, data_dir=served.data_dir)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_cli_without_a_credential_says_how_to_get_one(tmp_path: Path) -> None:
    result = run_cli("roots", "list", data_dir=tmp_path / "nowhere")
    assert result.returncode == 2
    assert "start the server once" in result.stderr and "--credentials" in result.stderr


def test_explicit_server_and_credentials_flags(served: ServerProcess, tmp_path: Path) -> None:
    result = run_cli(
        "roots",
        "list",
        "--json",
        "--server",
        served.listen,
        "--credentials",
        str(served.data_dir / "admin"),
        data_dir=tmp_path / "elsewhere",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["active"]


def test_help_explains_the_commands() -> None:
    import subprocess

    top = subprocess.run([KEYPLANE, "--help"], capture_output=True, text=True, check=True)
    assert "roots" in top.stdout and "serve" in top.stdout
    roots = subprocess.run(
        [KEYPLANE, "roots", "--help"], capture_output=True, text=True, check=True
    )
    assert "At most two roots are active" in roots.stdout
    serve = subprocess.run(
        [KEYPLANE, "serve", "--help"], capture_output=True, text=True, check=True
    )
    assert "--bootstrap-listen" in serve.stdout and "admin credential" in serve.stdout


def test_serve_refuses_a_bad_config_with_a_clear_message(tmp_path: Path) -> None:
    import subprocess

    config = tmp_path / "keyplane.toml"
    config.write_text('listen = "nowhere"\n')
    result = subprocess.run(
        [KEYPLANE, "serve", "--config", str(config), "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "listen must be HOST:PORT" in result.stderr
    config.write_text('[key_backends]\nroot = "pkcs11"\n')
    result = subprocess.run(
        [KEYPLANE, "serve", "--config", str(config), "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "no [backends.pkcs11] table" in result.stderr
    assert not (tmp_path / "d" / "keyplane.db").exists()


def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    process = ServerProcess(tmp_path / "data")
    assert process.stop(signal.SIGINT) == 0


def test_keys_settings_trust_state_sign_and_verify_through_the_cli(
    served: ServerProcess, tmp_path: Path
) -> None:
    data = served.data_dir
    keys = cli_json(data, "keys", "list")
    assert isinstance(keys, list)
    assert sorted(k["kind"] for k in keys) == ["intermediate-tls", "message-signing", "server-tls"]
    assert {k["state"] for k in keys} == {"active"}
    assert all(
        set(k) >= {"fingerprint", "issuer_fingerprint", "not_before", "not_after", "backend"}
        for k in keys
    )
    rotated = cli_json(data, "keys", "rotate", "message-signing")
    assert isinstance(rotated, dict) and rotated["state"] == "active"
    only = cli_json(data, "keys", "list", "--kind", "message-signing")
    assert isinstance(only, list)
    assert [k["state"] for k in only] == ["active", "retired"]

    setting = cli_json(data, "settings", "set", "PKIMessageSigningKeyRenewalWindowHours", "48")
    assert isinstance(setting, dict) and setting["value"] == "48"
    got = run_cli("settings", "get", "PKIMessageSigningKeyRenewalWindowHours", data_dir=data)
    assert got.stdout.strip() == "48"
    bad = run_cli("settings", "set", "PKIMessageSigningKeyRenewalWindowHours", "0", data_dir=data)
    assert bad.returncode == 1 and bad.stderr.startswith("keyplane: INVALID_ARGUMENT:")

    trust_file = tmp_path / "trust.bin"
    shown = cli_json(data, "trust-state", "show", "--out", str(trust_file))
    assert isinstance(shown, dict) and shown["version"] >= 1
    assert trust_file.stat().st_size > 0

    payload = tmp_path / "policy.json"
    payload.write_text('{"allow": ["agent"]}\n')
    signed = run_cli("sign", str(payload), data_dir=data)
    assert signed.returncode == 0, signed.stderr
    signature = tmp_path / "policy.json.sig"
    assert signature.exists()
    fingerprint = shown["roots"][0]["fingerprint"]
    # Offline: no server, no credential.
    offline = run_cli(
        "verify",
        str(payload),
        str(signature),
        "--trust-state",
        str(trust_file),
        "--fingerprint",
        fingerprint,
        data_dir=tmp_path / "no-credentials",
    )
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.startswith("OK: signed by")
    online = run_cli("verify", str(payload), str(signature), "--json", data_dir=data)
    assert online.returncode == 0 and json.loads(online.stdout)["valid"] is True

    payload.write_text('{"allow": ["everyone"]}\n')
    tampered = run_cli(
        "verify",
        str(payload),
        str(signature),
        "--trust-state",
        str(trust_file),
        data_dir=tmp_path / "no-credentials",
    )
    assert tampered.returncode == 1
    assert "signature rejected: the payload does not match its signature" in tampered.stderr
    wrong_pin = run_cli(
        "verify",
        str(payload),
        str(signature),
        "--trust-state",
        str(trust_file),
        "--fingerprint",
        "ab" * 32,
        data_dir=tmp_path / "no-credentials",
    )
    assert wrong_pin.returncode == 1 and "pinned fingerprint" in wrong_pin.stderr


def test_several_workers_share_the_ports_and_the_state(tmp_path: Path) -> None:
    process = ServerProcess(tmp_path / "data", "--workers", "2")
    try:
        data = process.data_dir
        created = cli_json(data, "roots", "create")
        # Whichever worker answers, it sees the same state (the DB is the truth).
        for _ in range(6):
            listing = cli_json(data, "roots", "list")
            assert isinstance(listing, dict) and isinstance(created, dict)
            assert created["fingerprint"] in {r["fingerprint"] for r in listing["active"]}
        workers = [
            int(pid)
            for pid in subprocess.run(
                ["pgrep", "-P", str(process.proc.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(workers) >= 2
        os.kill(workers[-1], signal.SIGKILL)
        # The supervisor restarts the killed worker; the service stays up meanwhile.
        assert cli_json(data, "keys", "list")
    finally:
        assert process.stop() == 0
