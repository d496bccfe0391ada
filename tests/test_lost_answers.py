"""A renewal whose answer is lost (the server renewed, the client never heard: a dropped
connection, a deadline) is not a dead end, although a certificate renews once: asked
again over mutual TLS for the same new key, the server or zone server answers with the
same certificate and records nothing new; asked for any other key, it refuses. The agent
keeps its renewal's key until the certificate is saved, so it asks again for that key."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from keyplane.clients.agent import PENDING_FILE, Agent
from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from tests.serverkit import RunningServer
from tests.test_enrollment import make_csr, p256
from tests.zonekit import key_pem, mtls_channel


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
