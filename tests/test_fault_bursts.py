"""A real `keyplane serve` SIGKILLed at a random moment of a burst of enrollments, made
at the server and through a real zone server, on both backends, again and again: after
each restart every invariant holds with every acknowledged enrollment, renewal and
revocation (tests/invariants.py also checks that each token's spent uses equal the
certificates recorded for it: none handed out without its record), and the zone
enrolls again once its server is back."""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.v1 import enrollment_service_pb2 as enroll_pb
from keyplane.v1 import enrollment_service_pb2_grpc
from tests.faultkit import WINDOW_FACTOR, KillChain, backend, fault_runs, fault_timeout
from tests.serverkit import run_cli
from tests.softhsm import SoftHsmToken
from tests.test_cancellation import _zone_config
from tests.test_enrollment import make_csr, p256
from tests.test_fleet import Process, wait_until
from tests.zonekit import key_pem, mtls_channel

__all__ = ["backend"]

BURST = 24  # enrollments per burst, with renewals and revocations of earlier ones


class Burst:
    """Enrollments at an endpoint, renewals of what enrolled there, revocations by the
    admin; what is answered goes into the chain's acknowledgements (renewals a zone
    answered into `later`: they reach the server by the zone's reports)."""

    def __init__(
        self, chain: KillChain, token: str, enroll_at: Callable[[], str],
        renew_at: Callable[[], str], zone: bool = False,
    ) -> None:  # fmt: skip
        self.chain = chain
        self.token = token
        self.enroll_at = enroll_at
        self.renew_at = renew_at
        self.zone = zone
        self.enrolled: list[tuple[ec.EllipticCurvePrivateKey, str, str, str]] = []
        self.later: set[str] = set()
        self.count = 0

    def _enroll(self, stub: enrollment_service_pb2_grpc.EnrollmentServiceStub) -> None:
        key = p256()
        self.count += 1
        name = f"b-{self.count}"
        request = enroll_pb.EnrollRequest(csr=make_csr(key, cn=name), token=self.token)
        issued = stub.Enroll(request, timeout=30).certificate
        self.chain.acks.serials.add(issued.serial)
        self.enrolled.append((key, issued.certificate_chain_pem, issued.serial, name))

    def _renew(
        self, holder: tuple[ec.EllipticCurvePrivateKey, str, str, str], roots: bytes
    ) -> None:
        key, chain_pem, _, name = holder
        channel = mtls_channel(self.renew_at(), chain_pem.encode(), key_pem(key), roots)
        with KeyplaneClient(channel) as client:
            renewed = client.renew(make_csr(p256(), cn=name))
        (self.later if self.zone else self.chain.acks.serials).add(renewed.serial)

    def __call__(self) -> None:
        roots = self.chain.roots_pem()
        earlier = [self.enrolled.pop() for _ in range(min(4, len(self.enrolled)))]
        with (
            bootstrap_channel_for(self.enroll_at(), roots) as channel,
            self.chain.admin() as admin,
        ):
            stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(channel)
            with ThreadPoolExecutor(8) as pool:
                jobs = [pool.submit(self._enroll, stub) for _ in range(BURST)]
                jobs += [pool.submit(self._renew, e, roots) for e in earlier[:2]]
                for _, _, serial, _ in earlier[2:]:
                    admin.revoke_certificate(serial, "burst")
                    self.chain.acks.revoked.add(serial)
                errors = [j.exception() for j in jobs if j.exception() is not None]
        if errors:
            raise errors[0]


@pytest.mark.timeout(fault_timeout(per_run=20, scale=2))
def test_sigkill_during_enrollment_bursts_at_the_server(
    backend: SoftHsmToken | None, tmp_path: Path
) -> None:
    chain = KillChain(tmp_path, backend, seed=505)
    with chain.admin() as admin:
        token = admin.create_enrollment_token(uses=100_000).token
    # (A new port at every start: the addresses are read each time.)
    burst = Burst(chain, token, lambda: chain.bootstrap, lambda: chain.server.listen)
    chain.measure(burst, calls=2)
    for _ in range(fault_runs(scale=2)):
        chain.kill_during(burst)
    print(f"server bursts: {chain.close()}; {len(chain.acks.serials)} acknowledged")


def _enrolls_through(zone_bootstrap: str, roots: bytes, token: str) -> bool:
    try:
        with KeyplaneClient(bootstrap_channel_for(zone_bootstrap, roots), timeout=5) as c:
            c.enroll(make_csr(p256(), cn="probe"), token)
    except Exception:
        return False
    return True


@pytest.mark.timeout(fault_timeout(per_run=20, scale=2))
def test_sigkill_during_enrollment_bursts_through_a_zone(
    backend: SoftHsmToken | None, tmp_path: Path
) -> None:
    """The server behind a real zone server killed during bursts through the zone: what
    the zone answered is recorded at the server (enrollments in the same transaction as
    the token's use; renewals by the zone's reports), and the zone serves again."""
    chain = KillChain(tmp_path, backend, seed=606, fixed_ports=True)
    data = chain.data
    with _zone_behind(chain, tmp_path, backend) as (zone_data, endpoint):
        with chain.admin() as admin:
            token = admin.create_enrollment_token(uses=100_000).token
        burst = Burst(
            chain, token, lambda: endpoint.bootstrap_listen, lambda: endpoint.listen, zone=True
        )
        chain.measure(burst, calls=2)
        for _ in range(fault_runs(scale=2)):
            chain.kill_during(burst, zone_dirs=(zone_data,))
            wait_until(
                "the zone to enroll again",
                lambda: _enrolls_through(endpoint.bootstrap_listen, chain.roots_pem(), token),
                60,
            )
            # Renewals the zone answered reach the server by its reports.
            wait_until("the zone's reports", lambda: _recorded(data, burst.later), 60)
            chain.acks.serials |= burst.later
        chain.check(zone_dirs=(zone_data,))
    print(f"zone bursts: {chain.close()}; {len(chain.acks.serials)} acknowledged")


@contextlib.contextmanager
def _zone_behind(
    chain: KillChain, tmp_path: Path, backend: SoftHsmToken | None
) -> Iterator[tuple[Path, Any]]:
    """A real zone server enrolled with the chain's server: (its data dir, its endpoint
    in the init bundle)."""
    data = chain.data
    zone_token = run_cli(
        "tokens", "create", "--role", "zone-server", data_dir=data, check=True
    ).stdout.strip()
    run_cli("bundle", "download", "--out", str(tmp_path / "b0.dat"), data_dir=data, check=True)
    zone_data = tmp_path / "zone"
    zone = Process(
        tmp_path / "zone.log",
        "zone", "serve", "--data-dir", str(zone_data), "--name", "zone1",
        "--bundle", str(tmp_path / "b0.dat"), "--token", zone_token,
        *_zone_config(tmp_path, backend),
    )  # fmt: skip
    try:
        wait_until("the zone server", lambda: "listening on" in zone.output(), 60)
        run_cli("bundle", "download", "--out", str(tmp_path / "b1.dat"), data_dir=data, check=True)
        yield zone_data, load_bundle((tmp_path / "b1.dat").read_bytes()).enrollment_endpoint()
    finally:
        assert zone.stop() == 0
    assert "Traceback" not in zone.output()


def _zone_meta(zone_data: Path, name: str) -> str:
    with sqlite3.connect(f"file:{zone_data / 'zone.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return str(row[0]) if row else ""


def _zone_intermediate(zone_data: Path) -> str:
    return _zone_meta(zone_data, "intermediate_chain_pem")


def _poll(check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Until `check()` holds, looking every 5 ms (to time what follows closely)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _zone_has_latest(zone_data: Path, chain: KillChain) -> bool:
    with sqlite3.connect(f"file:{zone_data / 'zone.db'}?mode=ro", uri=True) as db:
        held = db.execute("SELECT coalesce(max(version), 0) FROM trust_versions").fetchone()[0]
    with sqlite3.connect(f"file:{chain.data / 'keyplane.db'}?mode=ro", uri=True) as db:
        latest = db.execute("SELECT coalesce(max(version), 0) FROM trust_states").fetchone()[0]
    return bool(held >= latest)


def _issued_by_newest_root(zone_data: Path, chain: KillChain) -> bool:
    certificates = x509.load_pem_x509_certificates(_zone_intermediate(zone_data).encode())
    with chain.admin() as admin:
        newest = max(admin.list_root_keys().active, key=lambda r: r.number)
    root = x509.load_pem_x509_certificate(newest.certificate_pem.encode())
    try:
        certificates[0].verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@pytest.mark.timeout(fault_timeout(per_run=30))
def test_sigkill_while_a_real_zone_renews_its_intermediate(
    backend: SoftHsmToken | None, tmp_path: Path
) -> None:
    """A new root makes a real zone server renew its intermediate; the server is killed
    at a random moment of that renewal. Started again, the zone always ends up with an
    intermediate from the newest root: a renewal whose answer was lost is asked again
    for the same keys, and answered the same (it used to be refused for good)."""
    chain = KillChain(tmp_path, backend, seed=707, fixed_ports=True)
    rng = random.Random(707)
    with _zone_behind(chain, tmp_path, backend) as (zone_data, _):
        window = 0.0
        runs = max(3, fault_runs() // 3)
        for run in range(runs + 1):  # run 0 is unkilled: it measures the window
            with chain.admin() as admin:
                active = sorted(admin.list_root_keys().active, key=lambda r: r.number)
                if len(active) == 2:  # at most two: the older goes first
                    admin.revoke_root_key(active[0].fingerprint, "next run", confirm=True)
                    chain.acks.revoked_keys.add(active[0].fingerprint)
                    # Each step picked up before the next (a new root made while the zone
                    # reconnects strands it: see the report of this suite).
                    wait_until("the zone to see it", lambda: _zone_has_latest(zone_data, chain))
                before = _zone_intermediate(zone_data)
                chain.acks.keys.add(admin.create_root_key().fingerprint)
            # The zone picks the new root up (a server killed before that strands the
            # zone: see the report of this suite), records the keys it renews for, and
            # asks: the kill falls from then until the renewal is stored.
            _poll(lambda: bool(_zone_meta(zone_data, "renewal_pending")))
            started = time.monotonic()
            if run == 0:
                _poll(lambda old=before: _zone_intermediate(zone_data) != old)  # type: ignore[misc]
                window = (time.monotonic() - started) * WINDOW_FACTOR
            else:
                time.sleep(rng.uniform(0, window))
                chain.server.proc.send_signal(signal.SIGKILL)
                assert chain.server.stop() == -signal.SIGKILL
                chain.restart()
            wait_until(
                "an intermediate from the newest root",
                lambda: _issued_by_newest_root(zone_data, chain),
                90,
            )
            chain.check(zone_dirs=(zone_data,))
    print(f"real zone renewals: {runs} kills in a {window:.2f} s window; {chain.close()}")


def _recorded(data: Path, serials: set[str]) -> bool:
    with sqlite3.connect(f"file:{data / 'keyplane.db'}?mode=ro", uri=True) as db:
        recorded = {r[0] for r in db.execute("SELECT serial FROM certificates")}
    return serials <= recorded
