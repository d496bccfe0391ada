"""A zone server run as a service would be: `keyplane zone serve --workers 2
--metrics-listen … --log-format json` under a NOTIFY_SOCKET. Its scrape counts the
enrollments the test made through it and the certificates its intermediate issued, its
log is JSON line by line with an event per certificate, and systemd hears READY=1,
WATCHDOG=1 and STOPPING=1 from its supervisor alone."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from tests.opskit import Keyplane, NotifySocket, free_port, scrape, serve, value
from tests.serverkit import run_cli
from tests.test_enrollment import make_csr, p256


@pytest.mark.timeout(120)
def test_a_zone_server_counts_logs_and_notifies_like_the_server(tmp_path: Path) -> None:
    server = serve(tmp_path / "server", tmp_path / "serve")
    notify = NotifySocket(path=tmp_path / "notify.sock")
    try:
        data = tmp_path / "server"
        token = run_cli(
            "tokens", "create", "--role", "zone-server", data_dir=data, check=True
        ).stdout.strip()
        bundle = tmp_path / "bundle.dat"
        run_cli("bundle", "download", "--out", str(bundle), data_dir=data, check=True)
        metrics = f"127.0.0.1:{free_port()}"
        zone = Keyplane(
            tmp_path / "zone",
            "zone",
            "serve",
            "--data-dir",
            str(tmp_path / "zone-data"),
            "--name",
            "zone-ops",
            "--bundle",
            str(bundle),
            "--token",
            token,
            "--workers",
            "2",
            "--metrics-listen",
            metrics,
            "--log-format",
            "json",
            env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"},
        )
        try:
            zone.wait_for("bootstrap listener on")
            notify.receive(lambda lines: "READY=1" in lines)
            bootstrap = zone.stdout().split("bootstrap listener on ")[1].split()[0]
            run_cli("bundle", "download", "--out", str(bundle), data_dir=data, check=True)
            roots = load_bundle(bundle.read_bytes()).roots_pem()
            agents = json.loads(
                run_cli("tokens", "create", "--uses", "3", "--json", data_dir=data).stdout
            )["token"]
            before = scrape(metrics)[1]
            for i in range(3):  # a connection each: the workers share them
                with KeyplaneClient(bootstrap_channel_for(bootstrap, roots), timeout=30) as c:
                    c.enroll(make_csr(p256(), cn=f"zone-agent-{i}"), agents)
            page, after = scrape(metrics)
            enroll = {
                "grpc_type": "unary",
                "grpc_service": "keyplane.v1.EnrollmentService",
                "grpc_method": "Enroll",
            }
            handled = value(after, "grpc_server_handled_total", **enroll, grpc_code="OK")
            assert (
                handled - value(before, "grpc_server_handled_total", **enroll, grpc_code="OK") == 3
            )
            issued = "keyplane_certificates_issued_total"
            assert value(after, issued, issuer_kind="zone_intermediate") == 3
            assert any(
                name == "keyplane_key_not_after_timestamp_seconds"
                and ("kind", "zone_intermediate") in labels
                for name, labels in after
            )
            assert value(after, "keyplane_trust_state_version") >= 1
            assert value(after, "keyplane_backend_up", backend="software") == 1
            assert "-----BEGIN" not in page
            notify.receive(lambda lines: "WATCHDOG=1" in lines)
        finally:
            assert zone.stop(signal.SIGTERM) == 0
        notify.receive(lambda lines: "STOPPING=1" in lines, timeout=5)
        assert notify.senders() == {zone.proc.pid}
    finally:
        notify.close()
        assert server.stop() == 0
    entries = [json.loads(line) for line in zone.stderr().splitlines() if line.strip()]
    issues = [e for e in entries if e["event"] == "certificate.issue"]
    assert len(issues) == 3
    assert {e["details"]["subject"] for e in issues} == {f"zone-agent-{i}" for i in range(3)}
    assert all(e["rpc"] == "/keyplane.v1.EnrollmentService/Enroll" for e in issues)
    assert all(len(e["fingerprint"]) == 64 and "worker" in e for e in issues)
    assert "-----BEGIN" not in zone.stderr() + zone.stdout()
