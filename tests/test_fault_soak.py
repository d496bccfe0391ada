"""A soak: mixed load for KEYPLANE_SOAK_SECONDS (30 s in `make test`, an hour in `make
test-long`) against a real `keyplane serve --workers 2` and a real zone server: agents
enroll at the server and through the zone, renew over mutual TLS at whichever issued
them, messages are signed, a watcher follows the trust state, certificates are revoked
and subordinate keys rotate (a root rotation under agents: tests/test_fleet.py). Every
few seconds it samples the resident memory and open descriptors of every process
(supervisor, workers, zone) and the state DB's size per certificate; it reports the
slopes (and writes them to soak.json beside the data dirs), and fails on any error but
the expected ones, on descriptors that keep growing, and on the invariants."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.clients.credentials import load_credential
from keyplane.v1 import trust_state_service_pb2, trust_state_service_pb2_grpc
from tests.invariants import Acknowledged, check_invariants
from tests.serverkit import ServerProcess, run_cli
from tests.test_enrollment import make_csr, p256
from tests.test_fleet import Process, wait_until
from tests.zonekit import key_pem, mtls_channel

SECONDS = float(os.environ.get("KEYPLANE_SOAK_SECONDS", "30"))
SAMPLE_SECONDS = 5.0 if SECONDS < 600 else 30.0
ROTATE_SECONDS = 10.0
LIVE_AGENTS = 200  # enrolled agents kept; beyond them the oldest is revoked
# Descriptors may rise while connections are made; a leak grows with every call.
FD_GROWTH = 64


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (per unit of x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


@dataclass
class Agent:
    key: ec.EllipticCurvePrivateKey
    chain_pem: str
    serial: str
    name: str
    at_zone: bool
    # A renewal at the zone reaches the server by the zone's report (every second):
    # until then the server knows no such serial to revoke.
    revocable_at: float = 0.0


@dataclass
class Load:
    """The load's state and tallies."""

    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    agents: list[Agent] = field(default_factory=list)
    acks: Acknowledged = field(default_factory=Acknowledged)
    samples: list[dict[str, float]] = field(default_factory=list)
    watched: int = 0


class Soak:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = ServerProcess(tmp / "server", "--workers", "2")
        self.data = self.server.data_dir
        wait_until("both workers", lambda: len(_children(self.server.proc.pid)) >= 2, 60)
        zone_token = run_cli("tokens", "create", "--role", "zone-server", data_dir=self.data,
                             check=True).stdout.strip()  # fmt: skip
        run_cli("bundle", "download", "--out", str(tmp / "b0.dat"), data_dir=self.data, check=True)
        self.zone_data = tmp / "zone"
        self.zone = Process(tmp / "zone.log", "zone", "serve", "--data-dir", str(self.zone_data),
                            "--name", "soak-zone", "--bundle", str(tmp / "b0.dat"),
                            "--token", zone_token)  # fmt: skip
        wait_until("the zone server", lambda: "listening on" in self.zone.output(), 60)
        run_cli("bundle", "download", "--out", str(tmp / "b1.dat"), data_dir=self.data, check=True)
        self.zone_endpoint = load_bundle((tmp / "b1.dat").read_bytes()).enrollment_endpoint()
        endpoint = json.loads((self.data / "admin" / "endpoint.json").read_text())
        self.bootstrap = endpoint["bootstrap_listen"]
        self.load = Load()
        self.rng = random.Random(1234)
        self.stop = threading.Event()

    def roots(self) -> bytes:
        return (self.data / "admin" / "ca.pem").read_bytes()

    def admin(self) -> KeyplaneClient:
        return KeyplaneClient.connect(self.server.listen, load_credential(self.data / "admin"))

    def pids(self) -> list[int]:
        return [self.server.proc.pid, *_children(self.server.proc.pid), self.zone.proc.pid]

    # -- the operations -----------------------------------------------------------------

    def enroll(self, admin: KeyplaneClient, token: str) -> None:
        at_zone = self.rng.random() < 0.5
        address = self.zone_endpoint.bootstrap_listen if at_zone else self.bootstrap
        key, name = p256(), f"soak-{self.load.ops['enroll']}"
        with KeyplaneClient(bootstrap_channel_for(address, self.roots())) as client:
            issued = client.enroll(make_csr(key, cn=name), token)
        self.load.acks.serials.add(issued.serial)
        self.load.agents.append(Agent(key, issued.certificate_chain_pem, issued.serial, name,
                                      at_zone))  # fmt: skip
        if len(self.load.agents) > LIVE_AGENTS:
            self.revoke(admin, self.load.agents.pop(0))

    def renew(self) -> None:
        if not self.load.agents:
            return
        agent = self.load.agents.pop(self.rng.randrange(len(self.load.agents)))
        address = self.zone_endpoint.listen if agent.at_zone else self.server.listen
        key = p256()
        channel = mtls_channel(address, agent.chain_pem.encode(), key_pem(agent.key), self.roots())
        with KeyplaneClient(channel) as holder:
            renewed = holder.renew(make_csr(key, cn=agent.name))
        if not agent.at_zone:  # a zone's renewals reach the server by its reports
            self.load.acks.serials.add(renewed.serial)
        reported = time.monotonic() + (5.0 if agent.at_zone else 0.0)
        self.load.agents.append(Agent(key, renewed.certificate_chain_pem, renewed.serial,
                                      agent.name, agent.at_zone, reported))  # fmt: skip

    def revoke(self, admin: KeyplaneClient, agent: Agent | None = None) -> None:
        if agent is None:
            now = time.monotonic()
            ready = [i for i, a in enumerate(self.load.agents) if a.revocable_at <= now]
            if not ready:
                return
            agent = self.load.agents.pop(self.rng.choice(ready))
        admin.revoke_certificate(agent.serial, "soak")
        self.load.acks.revoked.add(agent.serial)

    def watch(self) -> None:
        """Follow the trust state until the soak ends, reconnecting when a stream ends."""
        while not self.stop.is_set():
            with bootstrap_channel_for(self.bootstrap, self.roots()) as channel:
                call = trust_state_service_pb2_grpc.TrustStateServiceStub(channel).WatchTrustState(
                    trust_state_service_pb2.WatchTrustStateRequest(since_version=0), timeout=60
                )
                try:
                    for _ in call:
                        self.load.watched += 1
                        if self.stop.is_set():
                            call.cancel()
                except Exception as exc:
                    code = getattr(exc, "code", lambda: None)()
                    if code is not None and code.name not in ("DEADLINE_EXCEEDED", "CANCELLED"):
                        self.load.errors[f"watch {code.name}"] += 1

    def sample(self, started: float) -> None:
        pids = self.pids()
        db_bytes = sum(p.stat().st_size for p in self.data.glob("keyplane.db*") if p.is_file())
        certificates = max(1, len(self.load.acks.serials))
        self.load.samples.append({
            "t": time.monotonic() - started,
            "rss_kib": float(sum(_rss_kib(p) for p in pids)),
            "fds": float(sum(_fds(p) for p in pids)),
            "db_bytes_per_certificate": db_bytes / certificates,
            "certificates": float(certificates),
        })  # fmt: skip

    def run(self, seconds: float) -> None:
        watcher = threading.Thread(target=self.watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        next_sample = next_rotation = 0.0
        admin = self.admin()
        token = admin.create_enrollment_token(uses=1_000_000).token
        kinds = ["message-signing", "intermediate-tls", "server-tls"]
        try:
            while (now := time.monotonic() - started) < seconds:
                if now >= next_sample:
                    self.sample(started)
                    next_sample = now + SAMPLE_SECONDS
                op = self.rng.choices(["enroll", "renew", "sign", "revoke"], [5, 4, 4, 1])[0]
                if now >= next_rotation:
                    op, next_rotation = "rotate", now + ROTATE_SECONDS
                try:
                    if op == "enroll":
                        self.enroll(admin, token)
                    elif op == "renew":
                        self.renew()
                    elif op == "sign":
                        admin.sign_message(b"soak %d" % self.load.ops["sign"])
                    elif op == "revoke":
                        self.revoke(admin)
                    elif op == "rotate":
                        self.load.acks.keys.add(
                            admin.rotate_key(self.rng.choice(kinds)).fingerprint
                        )
                    self.load.ops[op] += 1
                except KeyplaneClientError as exc:
                    self.load.errors[f"{op} {exc.code.name}: {exc.message[:80]}"] += 1
            self.sample(started)
        finally:
            admin.close()
            self.stop.set()
            watcher.join(timeout=90)

    def close(self) -> None:
        self.zone.stop()
        assert self.server.stop() == 0


def _report(load: Load, seconds: float) -> dict[str, Any]:
    """Slopes per minute, over the whole run and over its second half (after the
    warm-up: caches filling, the first connections)."""
    samples = load.samples
    whole = [(s["t"] / 60, s) for s in samples]
    later = [(m, s) for m, s in whole if s["t"] >= seconds / 2]
    report: dict[str, Any] = {
        "seconds": seconds,
        "operations": dict(load.ops),
        "watched_messages": load.watched,
        "errors": dict(load.errors),
    }
    for metric in ("rss_kib", "fds", "db_bytes_per_certificate"):
        report[f"{metric}_per_minute"] = round(slope([(m, s[metric]) for m, s in whole]), 1)
        report[f"{metric}_per_minute_second_half"] = round(
            slope([(m, s[metric]) for m, s in later]), 1
        )
    report["first"], report["last"] = samples[0], samples[-1]
    return report


@pytest.mark.timeout(SECONDS + 600)
def test_a_soak_of_mixed_load_stays_flat(tmp_path: Path) -> None:
    soak = Soak(tmp_path)
    try:
        soak.run(SECONDS)
        # What the zone answered reaches the server by its reports.
        wait_until("the zone's reports", lambda: _recorded(soak), 60)
    finally:
        soak.close()
    report = _report(soak.load, SECONDS)
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=2))
    print("soak:", json.dumps(report, indent=2))
    assert not soak.load.errors, soak.load.errors
    assert soak.load.ops["enroll"] and soak.load.ops["renew"] and soak.load.watched
    assert report["last"]["fds"] - report["first"]["fds"] <= FD_GROWTH, report
    check_invariants(soak.data, zone_dirs=(soak.zone_data,), acknowledged=soak.load.acks)
    for log in (soak.server.output(), soak.zone.output()):
        assert "Traceback" not in log


def _recorded(soak: Soak) -> bool:
    with sqlite3.connect(f"file:{soak.data / 'keyplane.db'}?mode=ro", uri=True) as db:
        recorded = {r[0] for r in db.execute("SELECT serial FROM certificates")}
    zone_serials = {a.serial for a in soak.load.agents if a.at_zone}
    return zone_serials <= recorded
