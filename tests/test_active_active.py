"""Active/active end to end, every part a real process on 127.0.0.1: two `keyplane serve`,
a `keyplane zone serve` on each side and `keyplane agent run`s on each, set up trust with
the CLI as their admins would; A's agents renew at B; a root created and revoked on A
reaches B's agents and zone; an agent revoked on B is refused by A; A stops, its agents
carry on through B (its zone keeps its reports queued) and come back when it returns;
revoking the trust takes A's roots out of B's bundle and trust state."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.v1 import trust_state_pb2
from tests.peerkit import A_FQDN, B_FQDN, free_ports
from tests.serverkit import ServerProcess, run_cli
from tests.test_enrollment import make_csr, p256
from tests.test_fleet import Process, status, wait_until
from tests.zonekit import key_pem, mtls_channel

# Agents renew every few seconds (see tests/test_fleet.py).
TIME_SCALE = "150000"


def cli(*args: str, data_dir: Path) -> Any:
    done = run_cli(*args, "--json", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def serve(data_dir: Path, fqdn: str, ports: list[int]) -> ServerProcess:
    return ServerProcess(
        data_dir,
        "--fqdn",
        fqdn,
        "--listen",
        f"127.0.0.1:{ports[0]}",
        "--bootstrap-listen",
        f"127.0.0.1:{ports[1]}",
    )


def zone_bootstrap(zone: Process) -> str:
    found = re.search(r"bootstrap listener on (\S+)", zone.output())
    assert found, zone.output()
    return found.group(1)


def relayed_peers(zone: Process, roots_pem: bytes) -> list[Any]:
    """The peers section of the trust state a zone relays."""
    with KeyplaneClient(bootstrap_channel_for(zone_bootstrap(zone), roots_pem)) as client:
        versions = client.get_trust_state()
    body = trust_state_pb2.TrustStateBody.FromString(versions[-1].body)
    return list(body.peers)


def server_peers(bootstrap: str, roots_pem: bytes) -> list[Any]:
    with KeyplaneClient(bootstrap_channel_for(bootstrap, roots_pem)) as client:
        versions = client.get_trust_state()
    return list(trust_state_pb2.TrustStateBody.FromString(versions[-1].body).peers)


def agent_args(tmp: Path, name: str, bundle: Path) -> tuple[str, ...]:
    return (
        "agent",
        "run",
        "--bundle",
        str(bundle),
        "--data-dir",
        str(tmp / name),
        "--name",
        name,
        "--time-scale",
        TIME_SCALE,
    )


def credential(agent_dir: Path) -> tuple[bytes, bytes]:
    return (agent_dir / "cert.pem").read_bytes(), (agent_dir / "key.pem").read_bytes()


@pytest.mark.timeout(900)
def test_two_servers_in_active_active(tmp_path: Path) -> None:
    ports_a = free_ports(2)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a = serve(a_dir, A_FQDN, ports_a)
    b = serve(b_dir, B_FQDN, free_ports(2))
    processes: list[Process] = []
    servers = [a, b]
    try:
        a_boot = f"127.0.0.1:{ports_a[1]}"
        b_boot = json.loads((b_dir / "admin" / "endpoint.json").read_text())["bootstrap_listen"]
        b_root0 = cli("roots", "list", data_dir=b_dir)["active"][0]["fingerprint"]
        a_root0 = cli("roots", "list", data_dir=a_dir)["active"][0]["fingerprint"]

        # -- trust: A asks with B's fingerprint, both admins compare, B approves -----------
        made = cli(
            "trust", "request", "--peer", b_boot, "--peer-fingerprint", b_root0, data_dir=a_dir
        )
        (seen_b,) = cli("trust", "list", data_dir=b_dir)["requests"]
        (seen_a,) = cli("trust", "list", data_dir=a_dir)["requests"]
        assert seen_a["comparison_code"] == seen_b["comparison_code"] == made["comparison_code"]
        assert seen_b["peer_root_fingerprints"] == [a_root0] and seen_b["id"] == made["id"]
        assert cli("roots", "list", data_dir=b_dir)["peers"] == []  # not before approval
        cli("trust", "approve", made["id"], data_dir=b_dir)
        assert [p["peer"] for p in cli("trust", "list", data_dir=a_dir)["peers"]] == [B_FQDN]
        peers_b = cli("roots", "list", data_dir=b_dir)["peers"]
        assert [(p["server"], [r["fingerprint"] for r in p["roots"]]) for p in peers_b] == [
            (A_FQDN, [a_root0])
        ]
        shown = run_cli("roots", "list", data_dir=b_dir).stdout
        assert f"peer {A_FQDN} (trusted" in shown and a_root0 in shown
        a_roots = (a_dir / "admin" / "ca.pem").read_bytes()
        b_roots = (b_dir / "admin" / "ca.pem").read_bytes()

        # -- components on both sides ----------------------------------------------------
        bundles = {}
        for side, data in (("a", a_dir), ("b", b_dir)):
            direct = tmp_path / f"{side}-direct.dat"  # before the zone: agents enroll here
            run_cli("bundle", "download", "--out", str(direct), data_dir=data).check_returncode()
            bundles[f"{side}-direct"] = direct
            body = load_bundle(direct.read_bytes()).body
            assert [s.name for s in body.servers if s.peer] == [B_FQDN if side == "a" else A_FQDN]
            token = run_cli("tokens", "create", "--role", "zone-server", data_dir=data).stdout
            zone = Process(
                tmp_path / f"zone-{side}.log",
                "zone", "serve", "--data-dir", str(tmp_path / f"zone-{side}"),
                "--name", f"zone-{side}", "--bundle", str(direct), "--token", token.strip(),
            )  # fmt: skip
            processes.append(zone)
            wait_until(f"zone {side}", lambda z=zone: "listening on" in z.output(), 90)
            via_zone = tmp_path / f"{side}-zone.dat"
            run_cli("bundle", "download", "--out", str(via_zone), data_dir=data).check_returncode()
            bundles[f"{side}-zone"] = via_zone
        zone_a, zone_b = processes[0], processes[1]
        names = {
            "a1": "a-direct",
            "a2": "a-direct",
            "az": "a-zone",
            "b1": "b-direct",
            "bz": "b-zone",
        }
        agents: dict[str, Process] = {}
        for name, bundle in names.items():
            data = a_dir if name.startswith("a") else b_dir
            token = run_cli("tokens", "create", data_dir=data).stdout.strip()
            agents[name] = Process(
                tmp_path / f"{name}.log",
                *agent_args(tmp_path, name, bundles[bundle]),
                "--token",
                token,
            )
            processes.append(agents[name])
        dirs = {name: tmp_path / name for name in names}
        wait_until(
            "every agent to enroll",
            lambda: all(status(d).get("serial") for d in dirs.values()),
            120,
        )
        wait_until(
            "every agent to know the peer",
            lambda: all(status(d).get("peer_roots") for d in dirs.values()),
            60,
        )
        assert status(dirs["az"])["endpoint"]["zone"] and not status(dirs["a1"])["endpoint"]["zone"]

        # -- an agent of A renews at B (mutual TLS both ways) -------------------------------
        key = p256()
        with KeyplaneClient(bootstrap_channel_for(a_boot, a_roots)) as anonymous:
            token = run_cli("tokens", "create", data_dir=a_dir).stdout.strip()
            issued = anonymous.enroll(make_csr(key, cn="meter-a"), token)
        b_listen = json.loads((b_dir / "admin" / "endpoint.json").read_text())["listen"]
        with KeyplaneClient(
            mtls_channel(
                b_listen, issued.certificate_chain_pem.encode(), key_pem(key), a_roots + b_roots
            )
        ) as at_b:
            renewed = at_b.renew(make_csr(p256(), cn="meter-a"))
        assert renewed.serial in [c["serial"] for c in cli("certs", "list", data_dir=b_dir)]

        # -- a root created and revoked on A reaches B's agents and zone -------------------
        a_root1 = cli("roots", "create", data_dir=a_dir)["fingerprint"]

        def b_side_sees(fingerprints: list[str]) -> bool:
            agents_see = all(
                status(dirs[n]).get("peer_roots", {}).get(A_FQDN) == fingerprints
                for n in ("b1", "bz")
            )
            zone_sees = [
                [r.fingerprint for r in p.roots]
                for p in relayed_peers(zone_b, b_roots)
                if p.fqdn == A_FQDN
            ] == [fingerprints]
            return agents_see and zone_sees

        wait_until(
            "B's agents and zone to see A's second root",
            lambda: b_side_sees([a_root0, a_root1]),
            90,
        )
        wait_until(
            "A's components on A's new root",
            lambda: all(
                status(dirs[n]).get("chain_root_fingerprint") == a_root1 for n in ("a1", "a2", "az")
            ),
            120,
        )
        # meter-a renewed at B: A cannot know, so its first certificate still counts as a
        # live component under Root 0 there and the coverage gate would wait for it.
        cli(
            "roots", "revoke", a_root0, "--reason", "rotation", "--yes", "--force", data_dir=a_dir
        )  # fmt: skip
        wait_until("B's agents and zone to drop A's old root", lambda: b_side_sees([a_root1]), 90)
        a_roots = (a_dir / "admin" / "ca.pem").read_bytes()

        # -- an agent revoked on B is refused by A -----------------------------------------
        # The credential first, then its serial: the agent may renew between two reads of
        # its files, and the certificate revoked must be the one presented below.
        chain, victim_key = credential(dirs["b1"])
        victim = f"{x509.load_pem_x509_certificate(chain).serial_number:032x}"
        run_cli("certs", "revoke", victim, "--reason", "stolen", data_dir=b_dir).check_returncode()
        a_listen = f"127.0.0.1:{ports_a[0]}"
        wait_until(
            "A to learn of B's revocation",
            lambda: any(victim in p.revoked_serials for p in server_peers(a_boot, a_roots)),
            60,
        )
        with KeyplaneClient(mtls_channel(a_listen, chain, victim_key, a_roots + b_roots)) as stolen:
            with pytest.raises(KeyplaneClientError) as caught:
                stolen.renew(make_csr(p256(), cn="b1"))
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked by its server" in caught.value.message
        # Had it renewed just before the revocation, its new certificate goes too.
        for _ in range(3):
            current = str(status(dirs["b1"])["serial"])
            if current == victim or agents["b1"].proc.poll() is not None:
                break
            revoked = run_cli("certs", "revoke", current, "--reason", "stolen", data_dir=b_dir)
            revoked.check_returncode()
            victim = current
        wait_until("the revoked agent to stop", lambda: agents["b1"].proc.poll() is not None, 60)
        assert agents["b1"].proc.returncode == 3

        # -- A stops: its agents carry on through B, its zone queues its reports -----------
        before = {n: int(status(dirs[n])["renewals"]) for n in ("a1", "a2", "az")}
        assert a.stop() == 0
        servers.remove(a)
        wait_until(
            "A's agents to use B",
            lambda: all(
                status(dirs[n]).get("server_in_use", {}).get("name") == B_FQDN for n in ("a1", "a2")
            ),
            90,
        )
        wait_until(
            "A's agents to renew at B",
            lambda: all(int(status(dirs[n])["renewals"]) > before[n] + 1 for n in ("a1", "a2")),
            120,
        )
        assert all(status(dirs[n])["chain_root_fingerprint"] == b_root0 for n in ("a1", "a2"))
        # The zone's agent renews at its zone meanwhile: each certificate is queued for A.
        outage_serials: set[str] = set()

        def zone_issues_on() -> bool:
            outage_serials.add(str(status(dirs["az"])["serial"]))
            return len(outage_serials) >= 3

        wait_until("A's zone to go on issuing", zone_issues_on, 120)
        assert status(dirs["az"])["server_in_use"]["zone"]  # its zone still serves it
        wait_until(
            "A's zone to follow B", lambda: f"following the peer {B_FQDN}" in zone_a.output(), 60
        )

        # -- A comes back: its agents return, the zone's reports arrive ---------------------
        a = serve(a_dir, A_FQDN, ports_a)
        servers.append(a)
        wait_until(
            "A's agents to come back",
            lambda: all(
                status(dirs[n]).get("server_in_use", {}).get("name") == A_FQDN for n in ("a1", "a2")
            ),
            90,
        )
        wait_until(
            "A's agents on A's chain again",
            lambda: all(
                status(dirs[n]).get("chain_root_fingerprint") == a_root1 for n in ("a1", "a2")
            ),
            120,
        )

        def recorded() -> list[str]:
            return [
                c["serial"] for c in cli("certs", "list", "--component", "agent", data_dir=a_dir)
            ]

        wait_until(
            "A to record what its zone issued meanwhile",
            lambda: outage_serials <= set(recorded()),
            90,
        )
        serials = recorded()
        assert len(serials) == len(set(serials))  # none twice
        assert "UNAUTHENTICATED" not in agents["a1"].output()

        # -- B revokes the trust: A's roots leave B's bundle and trust state ----------------
        done = run_cli("trust", "revoke", A_FQDN, "--reason", "decommissioned", data_dir=b_dir)
        assert done.returncode == 0, done.stderr
        assert "the peer was told" in done.stdout
        after = tmp_path / "b-after.dat"
        run_cli("bundle", "download", "--out", str(after), data_dir=b_dir).check_returncode()
        body = load_bundle(after.read_bytes()).body
        assert list(body.peer_roots) == [] and not any(s.peer for s in body.servers)
        assert server_peers(b_boot, b_roots) == []
        assert cli("roots", "list", data_dir=b_dir)["peers"] == []
        wait_until("B's agent to forget A", lambda: status(dirs["bz"]).get("peer_roots") == {}, 60)
        wait_until(
            "A to hear of it", lambda: cli("trust", "list", data_dir=a_dir)["peers"] == [], 30
        )
        history = cli("trust", "history", data_dir=b_dir)
        assert [e["event"] for e in history] == ["received", "approved", "revoked"]
        assert all(status(dirs[n])["state"] == "enrolled" for n in ("a1", "a2", "az", "bz"))
    finally:
        for process in reversed(processes):
            process.stop()
        for server in servers:
            server.stop()
