"""A renewal whose answer is lost (the server renewed, the client never heard: a dropped
connection, a deadline) is not a dead end, although a certificate renews once: asked
again over mutual TLS for the same new key, the server or zone server answers with the
same certificate and records nothing new; asked for any other key, it refuses. The agent
keeps its renewal's key until the certificate is saved, so it asks again for that key."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from keyplane.clients.agent import PENDING_FILE, Agent
from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.v1 import zone_service_pb2, zone_service_pb2_grpc
from tests.serverkit import RunningServer
from tests.test_enrollment import make_csr, p256
from tests.zonekit import FakeZone, enroll_fake_zone, key_pem, mtls_channel


def _agents(server: RunningServer) -> int:
    return len(server.hierarchy.store.certificates("agent", 10_000))


def test_renew_asked_again_for_the_same_key_gets_the_same_certificate(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    key = p256()
    issued = anonymous.enroll(make_csr(key, cn="edge"), admin.create_enrollment_token().token)
    roots = (server.admin_dir / "ca.pem").read_bytes()
    csr = make_csr(p256(), cn="edge")
    with KeyplaneClient(
        mtls_channel(server.listen, issued.certificate_chain_pem.encode(), key_pem(key), roots)
    ) as holder:
        first = holder.renew(csr)
        count = _agents(server)
        again = holder.renew(csr)  # the first answer "was lost"
        assert again.serial == first.serial
        assert again.certificate_chain_pem == first.certificate_chain_pem
        assert _agents(server) == count
        # Any other key: a certificate renews once.
        with pytest.raises(KeyplaneClientError) as caught:
            holder.renew(make_csr(p256(), cn="edge"))
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "renews once" in caught.value.message
        # Once the renewed certificate is revoked, asking again gets nothing.
        admin.revoke_certificate(first.serial, "lost")
        with pytest.raises(KeyplaneClientError) as caught:
            holder.renew(csr)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert _agents(server) == count


def test_an_agent_that_lost_its_renewal_answer_asks_again_for_the_same_key(
    server: RunningServer, admin: KeyplaneClient, tmp_path: Path
) -> None:
    bundle = load_bundle(admin.get_init_bundle().SerializeToString())
    data = tmp_path / "agent"
    data.mkdir(mode=0o700)
    agent = Agent(data, bundle, "edge-2", 1.0, threading.Event())
    assert agent.enroll(admin.create_enrollment_token().token)
    before = agent.status()["serial"]
    # The agent makes its renewal's key and CSR, and its request reaches the server,
    # which renews; the answer never comes back (played here by sending the same
    # request with the agent's credential).
    key_pem_bytes, csr = agent._pending_renewal(before)
    assert (data / PENDING_FILE).stat().st_mode & 0o777 == 0o600
    roots = (server.admin_dir / "ca.pem").read_bytes()
    chain = (data / "cert.pem").read_bytes()
    with KeyplaneClient(
        mtls_channel(server.listen, chain, (data / "key.pem").read_bytes(), roots)
    ) as same_credential:
        lost = same_credential.renew(csr)
    # Its next try asks again for the same key and gets that certificate.
    agent._renew_once()
    status = json.loads((data / "status.json").read_text())
    assert status["serial"] == lost.serial and status["last_error"] is None
    leaf = x509.load_pem_x509_certificates((data / "cert.pem").read_bytes())[0]
    assert f"{leaf.serial_number:032x}" == lost.serial
    assert (data / "key.pem").read_bytes() == key_pem_bytes
    assert not (data / PENDING_FILE).exists()


def _table_counts(server: RunningServer) -> tuple[int, ...]:
    db = sqlite3.connect(f"file:{server.config.data_dir / 'keyplane.db'}?mode=ro", uri=True)
    try:
        return tuple(
            db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            for table in ("keys", "certificates", "audit", "trust_states", "zones")
        )
    finally:
        db.close()


def test_a_zone_renewal_asked_again_gets_the_same_certificates(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    """A zone whose RenewZoneServer answer was lost (the server was killed after its
    commit: tests/test_fault_kill.py found zones locked out by it) asks again from the
    certificate it still holds, for the same two keys: the same intermediate and TLS
    certificate, nothing recorded. Other keys, or a third credential, are refused."""
    token = admin.create_enrollment_token(uses=1, role="zone-server").token
    roots = (server.admin_dir / "ca.pem").read_bytes()
    zone = enroll_fake_zone(server.bootstrap, roots, token, name="lossy-zone")
    intermediate_key, tls_key = p256(), p256()
    request = zone_service_pb2.RenewZoneServerRequest(
        intermediate_csr=make_csr(intermediate_key, cn=zone.name),
        tls_csr=make_csr(tls_key, cn=zone.name),
    )
    with zone.channel(server.listen, roots) as channel:
        stub = zone_service_pb2_grpc.ZoneServiceStub(channel)
        first = stub.RenewZoneServer(request, timeout=30)  # "lost"
        counts = _table_counts(server)
        again = stub.RenewZoneServer(
            zone_service_pb2.RenewZoneServerRequest(  # new CSRs, the same keys
                intermediate_csr=make_csr(intermediate_key, cn=zone.name),
                tls_csr=make_csr(tls_key, cn=zone.name),
            ),
            timeout=30,
        )
        assert again.intermediate_chain_pem == first.intermediate_chain_pem
        assert again.tls_certificate.serial == first.tls_certificate.serial
        assert (
            again.tls_certificate.certificate_chain_pem
            == first.tls_certificate.certificate_chain_pem
        )
        assert _table_counts(server) == counts
        for other in (
            zone_service_pb2.RenewZoneServerRequest(
                intermediate_csr=make_csr(p256(), cn=zone.name),
                tls_csr=make_csr(tls_key, cn=zone.name),
            ),
            zone_service_pb2.RenewZoneServerRequest(
                intermediate_csr=make_csr(intermediate_key, cn=zone.name),
                tls_csr=make_csr(p256(), cn=zone.name),
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.RenewZoneServer(other, timeout=30)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _table_counts(server) == counts
    # Renewed once more from the new credential, the first one repeats nothing.
    renewed = FakeZone(
        zone.name,
        intermediate_key,
        x509.load_pem_x509_certificates(first.intermediate_chain_pem.encode())[0],
        first.intermediate_chain_pem,
        tls_key,
        first.tls_certificate.certificate_chain_pem,
    )
    with renewed.channel(server.listen, roots) as channel:
        zone_service_pb2_grpc.ZoneServiceStub(channel).RenewZoneServer(
            zone_service_pb2.RenewZoneServerRequest(
                intermediate_csr=make_csr(p256(), cn=zone.name),
                tls_csr=make_csr(p256(), cn=zone.name),
            ),
            timeout=30,
        )
    with zone.channel(server.listen, roots) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            zone_service_pb2_grpc.ZoneServiceStub(channel).RenewZoneServer(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
