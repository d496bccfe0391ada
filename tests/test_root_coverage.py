"""Root coverage with real processes: a server, a zone server and three agents (one at
the server, two through the zone), one of them offline through a root rotation. The
others move; revoking the old root is refused with the straggler named; the dry run says
what the revocation does, and --force then does exactly that, audited as forced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.serverkit import ServerProcess, run_cli
from tests.test_agent import AgentProcess
from tests.test_fleet import Process, wait_until


def _json(data: Path, *args: str) -> Any:
    result = run_cli(*args, "--json", data_dir=data)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _coverage(data: Path) -> dict[str, Any]:
    coverage: dict[str, Any] = _json(data, "roots", "coverage")
    return coverage


def _moved(data: Path, agents: int, zones: int) -> bool:
    moved = _coverage(data)["moved"]
    return bool(moved["agents"] == agents and moved["zone_servers"] == zones)


@pytest.mark.timeout(300)
def test_coverage_moves_as_components_renew_and_the_gate_waits_for_them(
    tmp_path: Path,
) -> None:
    # Sightings written (the server) and reported (the zone) every half second.
    (tmp_path / "fast.toml").write_text("sightings_seconds = 0.5\n")
    server = ServerProcess(tmp_path / "server", "--config", str(tmp_path / "fast.toml"))
    data = server.data_dir
    running: dict[str, AgentProcess | Process] = {}

    def start_agent(name: str, bundle: Path, *extra: str) -> AgentProcess:
        agent = AgentProcess(tmp_path / name, bundle, "--name", name, *extra)
        running[name] = agent
        return agent

    zone_args = (
        "zone", "serve", "--data-dir", str(tmp_path / "zone"), "--name", "zone1",
        "--config", str(tmp_path / "fast.toml"),
    )  # fmt: skip

    def start_zone(*extra: str) -> Process:
        zone = Process(tmp_path / "zone.log", *zone_args, *extra)
        running["zone1"] = zone
        wait_until("the zone server", lambda: "listening on" in zone.output(), 60)
        return zone

    try:
        run_cli("bundle", "download", "--out", str(tmp_path / "b0.dat"), data_dir=data, check=True)
        token = _json(data, "tokens", "create", "--uses", "3")["token"]
        start_agent("north", tmp_path / "b0.dat", "--token", token).wait_enrolled()
        zone_token = _json(data, "tokens", "create", "--role", "zone-server")["token"]
        start_zone("--bundle", str(tmp_path / "b0.dat"), "--token", zone_token)
        # A bundle downloaded now sends new agents to the zone.
        run_cli("bundle", "download", "--out", str(tmp_path / "b1.dat"), data_dir=data, check=True)
        for name in ("east", "west"):
            start_agent(name, tmp_path / "b1.dat", "--token", token).wait_enrolled()
        # The zone reports what it issued; one root: everyone is under the newest.
        wait_until("the zone's report", lambda: _moved(data, 3, 1), 60)
        root0 = _coverage(data)["newest_root_fingerprint"]

        # West is offline through the rotation; the others follow the new root.
        running.pop("west").stop()
        root1 = _json(data, "roots", "create")["fingerprint"]
        wait_until("north, east and the zone to move", lambda: _moved(data, 2, 1), 60)
        coverage = _coverage(data)
        assert coverage["newest_root_fingerprint"] == root1
        # East renewed at the zone, which reported the serial it renews: its first
        # certificate no longer counts, so each agent is counted once.
        assert coverage["live"] == {"agents": 3, "zone_servers": 1, "peers": 0, "total": 4}
        assert coverage["share"] == 0.75 and coverage["min_coverage"] == 0.99
        [west] = coverage["stragglers"]
        assert (west["kind"], west["name"], west["issued_by"]) == ("agent", "west", "zone zone1")
        assert west["root_fingerprint"] == root0
        # Seen after it was issued: the zone reported its trust-state watch.
        assert west["last_seen"] > west["issued"], west
        by_root = {r["fingerprint"]: r for r in coverage["roots"]}
        assert by_root[root0]["components"]["total"] == 1
        assert by_root[root0]["coverage_without"] == 0.75
        assert by_root[root1]["newest"] and by_root[root1]["components"]["total"] == 3
        listed = run_cli("roots", "list", data_dir=data, check=True).stdout
        assert "1 of 4" in listed and "3 of 4" in listed

        # Revoking now is refused, with the figures and the straggler's name.
        refused = run_cli("roots", "revoke", root0, "--reason", "rotation", "--yes", data_dir=data)
        assert refused.returncode == 1
        line = refused.stderr.strip()
        assert line.startswith("keyplane: FAILED_PRECONDITION:") and "\n" not in line
        assert "75.0%" in line and "99.0%" in line and "west (agent)" in line and "--force" in line
        assert "north" not in line and "east" not in line
        assert _json(data, "roots", "show", root0)["state"] == "active"

        plan = _json(data, "roots", "revoke", root0, "--dry-run")["plan"]
        assert plan["dry_run"] and plan["verdict"] == "refused" and plan["coverage"] == 0.75
        assert plan["stranded"] == {"agent": 1, "zone-server": 0, "peer": 0}
        assert [s["name"] for s in plan["first_stranded"]] == ["west"]
        assert plan["zones"] == [] and plan["peers"] == []
        # The root, the server's three subordinates under it and the zone's first
        # intermediate; with them the first certificate of every agent.
        assert sorted(k["kind"] for k in plan["keys"]) == sorted(
            ["root", "server_tls", "intermediate_tls", "message_signing", "zone_intermediate"]
        )
        assert plan["certificates"]["agent"] == 3
        dry = run_cli("roots", "revoke", root0, "--dry-run", data_dir=data, check=True).stdout
        assert dry.startswith("would revoke") and "gate refused" in dry and "west" in dry
        assert _json(data, "roots", "show", root0)["state"] == "active"
        assert _coverage(data)["share"] == 0.75

        # A compromised key cannot wait: forced, with a reason, it goes at once.
        done = _json(
            data, "roots", "revoke", root0, "--reason", "key compromised", "--yes", "--force"
        )
        assert done["state"] == "revoked"
        # The dry run said what the revocation did.
        assert {**done["plan"], "dry_run": True, "verdict": "refused"} == plan
        assert done["plan"]["verdict"] == "forced"
        [event] = _json(data, "audit", "list", "--action", "root.revoke")
        details = event["details"]
        assert details["forced"] is True and details["reason"] == "key compromised"
        assert details["certificates"] == plan["certificates_total"]
        assert details["coverage"] == 0.75 and details["min_coverage"] == 0.99
        assert sorted(details["subordinates"]) == sorted(
            k["fingerprint"] for k in plan["keys"] if k["kind"] != "root"
        )
        west_serial = json.loads((tmp_path / "west" / "status.json").read_text())["serial"]
        certificates = {
            c["serial"]: c for c in _json(data, "certs", "list", "--component", "agent")
        }
        assert certificates[west_serial]["revoked"] is not None
        # Those that moved drop the old root and carry on.
        for name in ("north", "east"):
            agent = running[name]
            assert isinstance(agent, AgentProcess)
            status = agent.wait_for("the old root to go", lambda s: s["trusted_roots"] == [root1])
            assert status["last_error"] is None and status["chain_root_fingerprint"] == root1
        coverage = _coverage(data)
        assert coverage["share"] == 1.0
        assert coverage["live"] == {"agents": 2, "zone_servers": 1, "peers": 0, "total": 3}
    finally:
        for process in reversed(list(running.values())):
            process.stop()
        server.stop()
