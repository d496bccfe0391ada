"""`keyplane zones list|show|revoke` and `keyplane certs revoke` against a real
`keyplane serve` and a real `keyplane zone serve`, with an agent enrolled through the
zone as a real `keyplane agent run` process: refusals change nothing, and a revoked
zone or certificate stops the agent that holds it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.serverkit import KEYPLANE, ServerProcess, run_cli
from tests.test_agent import AgentProcess
from tests.test_fleet import Process, wait_until

EXIT_REVOKED = 3


def cli_json(server: ServerProcess, *args: str) -> Any:
    result = run_cli(*args, "--json", data_dir=server.data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def refused(server: ServerProcess, *args: str) -> str:
    """The one line a refused command prints on stderr (it exits 1)."""
    result = run_cli(*args, data_dir=server.data_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "server")
    yield process
    assert process.stop() == 0


@pytest.fixture
def zone(served: ServerProcess, tmp_path: Path) -> Iterator[Process]:
    """`keyplane zone serve --name zone1`, enrolled with the server."""
    token = run_cli(
        "tokens", "create", "--role", "zone-server", data_dir=served.data_dir, check=True
    ).stdout.strip()
    cli_json(served, "bundle", "download", "--out", str(tmp_path / "b0.dat"))
    process = Process(
        tmp_path / "zone.log",
        "zone",
        "serve",
        "--data-dir",
        str(tmp_path / "zone"),
        "--name",
        "zone1",
        "--bundle",
        str(tmp_path / "b0.dat"),
        "--token",
        token,
    )
    try:
        wait_until("the zone server", lambda: "listening on" in process.output(), 60)
        yield process
    finally:
        process.stop()


@pytest.fixture
def agent_through_zone(
    served: ServerProcess, zone: Process, tmp_path: Path
) -> Iterator[AgentProcess]:
    """An agent enrolled through zone1, running, its certificate reported to the server."""
    bundle = tmp_path / "bundle.dat"
    cli_json(served, "bundle", "download", "--out", str(bundle))
    token = cli_json(served, "tokens", "create", "--ttl", "1h")["token"]
    agent = AgentProcess(tmp_path / "agent", bundle, "--token", token, "--name", "meter-1")
    try:
        status = agent.wait_enrolled()
        assert status["endpoint"]["name"] == "zone1" and status["state"] == "enrolled"
        wait_until(
            "the zone to report the agent's certificate",
            lambda: status["serial"] in {c["serial"] for c in cli_json(served, "certs", "list")},
            30,
        )
        yield agent
    finally:
        if not agent.stopped:
            agent.stop()


def without_last_seen(zone: dict[str, Any]) -> dict[str, Any]:
    # The server updates last_seen as the zone calls it; the rest stays put.
    return {k: v for k, v in zone.items() if k != "last_seen"}


def help_of(*verb: str) -> str:
    shown = subprocess.run(
        [KEYPLANE, *verb, "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    return shown.stdout


def test_every_new_verb_has_a_description_and_an_example() -> None:
    for verb in (("zones", "list"), ("zones", "show"), ("zones", "revoke"), ("certs", "revoke")):
        text = help_of(*verb)
        assert "example" in text and f"keyplane {' '.join(verb)} " in text, verb
    assert "every certificate it issued" in help_of("zones", "revoke")
    assert "must" in help_of("zones", "revoke") and "enroll again" in help_of("zones", "revoke")
    revoke = help_of("certs", "revoke")
    assert "--yes" in revoke and "--force" in revoke and "zones revoke" in revoke
    run = help_of("agent", "run")
    assert "exit status" in run and "3 its certificate is revoked" in run


def test_zones_list_show_and_a_refused_revoke_change_nothing(
    served: ServerProcess, agent_through_zone: AgentProcess
) -> None:
    listed = cli_json(served, "zones", "list")
    assert [z["name"] for z in listed] == ["zone1"]
    zone1 = listed[0]
    assert zone1["state"] == "live" and zone1["revoked"] is None
    assert zone1["listen"] == agent_through_zone.status()["endpoint"]["listen"]  # type: ignore[index]
    assert zone1["intermediate_not_after"] and zone1["intermediate_fingerprint"]
    assert zone1["certificates_issued"] == 1
    assert set(zone1) == {
        "name",
        "state",
        "listen",
        "bootstrap_listen",
        "registered",
        "last_seen",
        "intermediate_fingerprint",
        "intermediate_not_after",
        "tls_serial",
        "certificates_issued",
        "revoked",
        "revoked_by",
        "revoke_reason",
    }
    shown = cli_json(served, "zones", "show", "zone1")
    assert without_last_seen(shown) == without_last_seen(zone1)

    table = run_cli("zones", "list", data_dir=served.data_dir).stdout.splitlines()
    header = "NAME STATE LISTEN LAST SEEN INTERMEDIATE NOT AFTER ISSUED"
    assert table[0].split() == header.split()
    assert table[1].split()[:3] == ["zone1", "live", zone1["listen"]]
    assert table[1].split()[-1] == "1"
    text = run_cli("zones", "show", "zone1", data_dir=served.data_dir).stdout
    assert "intermediate_fingerprint:" in text and zone1["intermediate_fingerprint"] in text
    assert refused(served, "zones", "show", "zone9").startswith("keyplane: NOT_FOUND: ")

    # Without --yes: refused, one line saying to add it, and nothing is revoked.
    versions_before = cli_json(served, "trust-state", "show")["version"]
    line = refused(served, "zones", "revoke", "zone1", "--reason", "decommissioned")
    assert line.startswith("keyplane: FAILED_PRECONDITION: ") and "--yes" in line
    # A zone's own certificate is not revoked one by one: the zone goes as a whole.
    line = refused(served, "certs", "revoke", zone1["tls_serial"], "--yes", "--force")
    assert line.startswith("keyplane: FAILED_PRECONDITION: ") and "zones revoke" in line

    assert [without_last_seen(z) for z in cli_json(served, "zones", "list")] == [
        without_last_seen(zone1)
    ]
    assert cli_json(served, "trust-state", "show")["version"] == versions_before
    assert all(c["revoked"] is None for c in cli_json(served, "certs", "list"))
    status = agent_through_zone.status()
    assert status is not None and status["state"] == "enrolled"
    assert agent_through_zone.proc.poll() is None


def test_a_revoked_zone_is_listed_revoked_and_its_agent_stops(
    served: ServerProcess, zone: Process, agent_through_zone: AgentProcess
) -> None:
    agent = agent_through_zone
    serial = agent.status()["serial"]  # type: ignore[index]
    revoked = cli_json(served, "zones", "revoke", "zone1", "--reason", "decommissioned", "--yes")
    assert revoked["state"] == "revoked" and revoked["revoke_reason"] == "decommissioned"
    assert revoked["revoked"] and revoked["revoked_by"]

    assert cli_json(served, "zones", "list") == []
    every = cli_json(served, "zones", "list", "--all")
    assert [(z["name"], z["state"]) for z in every] == [("zone1", "revoked")]
    table = run_cli("zones", "list", "--all", data_dir=served.data_dir).stdout
    assert "zone1" in table and "revoked" in table
    assert cli_json(served, "zones", "show", "zone1")["state"] == "revoked"
    certs = {c["serial"]: c for c in cli_json(served, "certs", "list")}
    assert certs[serial]["revoked"] is not None

    # The agent learns it from the trust state the zone relays, and stops.
    assert agent.proc.wait(timeout=30) == EXIT_REVOKED, agent.output()
    agent.stop()
    assert f"revoked: re-enroll with a new token (certificate {serial}" in agent.output()
    status = agent.status()
    assert status is not None and status["state"] == "revoked"
    assert "revoked: re-enroll with a new token" in status["last_error"]
    shown = subprocess.run(
        [KEYPLANE, "agent", "status", "--data-dir", str(agent.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "state:" in shown and "revoked" in shown and "re-enroll with a new token" in shown
    # The zone server learns it too, says so, and stops for good (its supervisor too).
    assert zone.proc.wait(timeout=30) == EXIT_REVOKED
    assert "was revoked by its server" in zone.output()
    # Its data dir is left as it was.
    assert (agent.data_dir / "key.pem").exists()
    leaf = x509.load_pem_x509_certificates((agent.data_dir / "cert.pem").read_bytes())[0]
    assert f"{leaf.serial_number:032x}" == serial


def test_certs_revoke_asks_for_yes_and_then_force_for_the_callers_own_credential(
    served: ServerProcess,
) -> None:
    admin = x509.load_pem_x509_certificates((served.data_dir / "admin" / "admin.pem").read_bytes())
    serial = f"{admin[0].serial_number:032x}"
    assert serial in {
        c["serial"] for c in cli_json(served, "certs", "list", "--component", "admin")
    }

    line = refused(served, "certs", "revoke", serial, "--reason", "rotating")
    assert line.startswith("keyplane: FAILED_PRECONDITION: ") and "--yes" in line
    assert cli_json(served, "roots", "list")["active"]  # the credential still works

    line = refused(served, "certs", "revoke", serial, "--reason", "rotating", "--yes")
    assert line.startswith("keyplane: FAILED_PRECONDITION: ") and "--force" in line
    assert cli_json(served, "roots", "list")["active"]
    mine = [c for c in cli_json(served, "certs", "list") if c["serial"] == serial]
    assert mine and mine[0]["revoked"] is None

    gone = cli_json(served, "certs", "revoke", serial, "--reason", "rotating", "--yes", "--force")
    assert gone["serial"] == serial and gone["revoke_reason"] == "rotating"
    line = refused(served, "roots", "list")
    assert line.startswith("keyplane: PERMISSION_DENIED: ") and "revoked" in line
