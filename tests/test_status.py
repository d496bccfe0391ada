"""`keyplane status` against a real server, as text and as --json: health, roots, the
keys that expire next, the zone servers with when each last called, and the last
backup, which the server records when it makes one. And while the HSM does not answer,
health says NOT_SERVING, `status` says why (exit status 4), and the scrape says 0."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyplane.clients.client import bootstrap_channel_for
from keyplane.v1 import zone_service_pb2, zone_service_pb2_grpc
from tests.opskit import free_port, listen_address, scrape, serve, value, wait_until
from tests.serverkit import RunningServer, run_cli
from tests.softhsm import SOFTHSM_MODULE, missing_softhsm
from tests.zonekit import enroll_fake_zone


def test_status_shows_health_roots_expiries_zones_and_the_last_backup(
    server: RunningServer, tmp_path: Path
) -> None:
    data = server.config.data_dir
    roots = (server.admin_dir / "ca.pem").read_bytes()
    with server.admin_client() as admin:
        token = admin.create_enrollment_token(role="zone-server").token
        nothing_yet = admin.get_server_status()
    assert not nothing_yet.HasField("last_backup") and not nothing_yet.zones
    zone = enroll_fake_zone(server.bootstrap, roots, token, name="status-zone")
    with zone.channel(server.listen, roots) as channel:  # the zone calls: it is seen
        zone_service_pb2_grpc.ZoneServiceStub(channel).ReportIssuedCertificates(
            zone_service_pb2.ReportIssuedCertificatesRequest(), timeout=30
        )
    text = run_cli("status", data_dir=data)
    assert text.returncode == 0 and "never" in text.stdout  # no backup yet
    assert "backup create" in text.stdout  # and how to make one
    backup = run_cli("backup", "create", "--out", str(tmp_path / "b.tar"), data_dir=data)
    assert backup.returncode == 0, backup.stderr

    text = run_cli("status", data_dir=data)
    assert text.returncode == 0, text.stderr
    root = server.hierarchy.issuing_root()
    assert "health:       SERVING" in text.stdout
    assert root.name in text.stdout and root.fingerprint in text.stdout
    assert "status-zone" in text.stdout and "intermediate_tls" in text.stdout
    assert "last backup:  " in text.stdout and "admin@pki.test" in text.stdout

    result = run_cli("status", "--json", "--expiries", "10", data_dir=data)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["serving"] is True and status["problems"] == []
    assert status["backends"] == [{"backend": "software", "up": True, "problem": None}]
    assert [r["fingerprint"] for r in status["roots"]] == [root.fingerprint]
    expiries = status["next_expiries"]
    kinds = {e["kind"] for e in expiries}
    assert {"server_tls", "intermediate_tls", "message_signing", "zone_intermediate"} <= kinds
    assert [e["not_after"] for e in expiries] == sorted(e["not_after"] for e in expiries)
    (seen,) = status["zones"]
    assert seen["name"] == "status-zone" and seen["last_seen"] is not None
    assert seen["intermediate_not_after"] is not None
    last = status["last_backup"]
    assert last["actor"].startswith("admin@pki.test")
    assert last["size_bytes"] == (tmp_path / "b.tar").stat().st_size
    created = datetime.datetime.fromisoformat(last["created"])
    assert abs(created - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=5)
    assert last["trust_state_version"] == status["trust_state_version"]
    assert len(run_cli("status", "--json", data_dir=data).stdout) > 0
    refused = run_cli("status", "--expiries", "1000", data_dir=data)
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
    assert "Traceback" not in refused.stderr


def own_token(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """A SoftHSM token of the test's own (it goes away mid-test): the environment that
    finds it, its token directory, and a config that keeps the roots on it."""
    if shutil.which("softhsm2-util") is None or not Path(SOFTHSM_MODULE).is_file():
        missing_softhsm("softhsm2-util or its module is missing")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {"SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "going",
            "--pin",
            "4321",
            "--so-pin",
            "8765",
        ],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=60,
    )
    pin = tmp_path / "hsm-pin"
    pin.write_text("4321\n")
    config = tmp_path / "keyplane.toml"
    config.write_text(
        "backend_check_seconds = 0.2\n\n"
        '[key_backends]\nroot = "pkcs11"\n\n[backends.pkcs11]\n'
        f'module = "{SOFTHSM_MODULE}"\ntoken = "going"\npin_file = "{pin}"\n'
    )
    return env, tokens, config


def health(bootstrap: str, roots: bytes) -> int:
    with bootstrap_channel_for(bootstrap, roots) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    return int(answer.status)


@pytest.mark.softhsm
@pytest.mark.timeout(120)
def test_an_hsm_that_goes_away_makes_the_server_not_serving(tmp_path: Path) -> None:
    env, tokens, config = own_token(tmp_path)
    data = tmp_path / "data"
    metrics = f"127.0.0.1:{free_port()}"
    process = serve(
        data, tmp_path / "serve", "--config", str(config), "--metrics-listen", metrics, env=env
    )
    try:
        note = json.loads((data / "admin" / "endpoint.json").read_text())
        roots = (data / "admin" / "ca.pem").read_bytes()
        assert listen_address(data)
        assert health(note["bootstrap_listen"], roots) == health_pb2.HealthCheckResponse.SERVING
        assert value(scrape(metrics)[1], "keyplane_backend_up", backend="pkcs11") == 1
        tokens.rename(tmp_path / "unplugged")  # the token is gone
        wait_until(
            "NOT_SERVING",
            lambda: (
                health(note["bootstrap_listen"], roots)
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
        )
        assert value(scrape(metrics)[1], "keyplane_backend_up", backend="pkcs11") == 0
        assert value(scrape(metrics)[1], "keyplane_backend_up", backend="software") == 1
        status = run_cli("status", "--json", data_dir=data)
        assert status.returncode == 4, status.stderr
        answer = json.loads(status.stdout)
        assert answer["serving"] is False
        (problem,) = answer["problems"]
        assert "pkcs11" in problem and "4321" not in problem
        down = {b["backend"]: b["up"] for b in answer["backends"]}
        assert down == {"pkcs11": False, "software": True}
        text = run_cli("status", data_dir=data)
        assert "health:       NOT_SERVING" in text.stdout and "pkcs11 DOWN" in text.stdout
    finally:
        assert process.stop() == 0
    assert "does not answer" in process.stderr()
    assert "4321" not in process.stderr() + process.stdout()
