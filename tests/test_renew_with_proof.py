"""RenewWithProof over real gRPC, at the server and through a zone server: the current
certificate and a proof by its key in the request, over a connection without a client
certificate; every way to get it wrong is refused and stores nothing."""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.clients.renewal import renewal_proof
from keyplane.server.domain import certs
from keyplane.server.domain.clock import ManualClock
from tests.serverkit import RunningServer, ServerProcess, run_cli
from tests.test_enrollment import make_csr, p256
from tests.test_fleet import Process, wait_until


def _refused(code: grpc.StatusCode, call: object, *args: object) -> str:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code == code, caught.value
    return caught.value.message


def _forged(chain_pem: str) -> str:
    """The same subject, serial and issuer name, with the forger's key, self-signed by a
    key that is not the intermediate's."""
    leaf = x509.load_pem_x509_certificates(chain_pem.encode())[0]
    forger = p256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(forger.public_key())
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False
        )
        .sign(forger, hashes.SHA256())
    )
    return certs.to_pem(cert)


def test_renew_with_proof_at_the_server(
    server: RunningServer,
    admin: KeyplaneClient,
    anonymous: KeyplaneClient,
    clock: ManualClock,
) -> None:
    for key in (
        p256(),
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
    ):
        token = admin.create_enrollment_token(uses=1).token
        issued = anonymous.enroll(make_csr(key, cn="sensor-1"), token)
        new_key = p256()
        csr = make_csr(new_key, cn="sensor-1")
        renewed = anonymous.renew_with_proof(
            csr,
            issued.certificate_chain_pem,
            renewal_proof(key, csr),  # type: ignore[arg-type]
        )
        leaf, intermediate = x509.load_pem_x509_certificates(renewed.certificate_chain_pem.encode())
        leaf.verify_directly_issued_by(intermediate)
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-1"
        assert leaf.public_key() == new_key.public_key()
        assert renewed.serial in {c.serial for c in admin.list_certificates("agent")}

    key = p256()
    issued = anonymous.enroll(make_csr(key, cn="sensor-2"), admin.create_enrollment_token().token)
    chain = issued.certificate_chain_pem
    csr = make_csr(p256(), cn="sensor-2")
    before = len(admin.list_certificates("agent"))

    # A proof by another key, a proof over other bytes, no proof.
    for proof in (renewal_proof(p256(), csr), renewal_proof(key, csr + b"x"), b""):
        message = _refused(
            grpc.StatusCode.UNAUTHENTICATED, anonymous.renew_with_proof, csr, chain, proof
        )
        assert "renewal proof does not verify" in message
    # A forged certificate with a known serial, proved with the forger's own key.
    forged = _forged(chain)
    forger_key = x509.load_pem_x509_certificate(forged.encode()).public_key()
    assert forger_key != key.public_key()
    message = _refused(
        grpc.StatusCode.PERMISSION_DENIED,
        anonymous.renew_with_proof,
        csr,
        forged,
        renewal_proof(key, csr),
    )
    assert "not the certificate issued" in message
    # No chain, a chain that is not PEM, the same key, another name.
    _refused(grpc.StatusCode.UNAUTHENTICATED, anonymous.renew_with_proof, csr, "", b"x")
    _refused(grpc.StatusCode.INVALID_ARGUMENT, anonymous.renew_with_proof, csr, "junk", b"x")
    same = make_csr(key, cn="sensor-2")
    message = _refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        anonymous.renew_with_proof,
        same,
        chain,
        renewal_proof(key, same),
    )
    assert "new key" in message
    other = make_csr(p256(), cn="sensor-3")
    message = _refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        anonymous.renew_with_proof,
        other,
        chain,
        renewal_proof(key, other),
    )
    assert "common name" in message
    assert len(admin.list_certificates("agent")) == before

    # Revoked, then expired: refused.
    admin.revoke_certificate(issued.serial, "lost")
    message = _refused(
        grpc.StatusCode.PERMISSION_DENIED,
        anonymous.renew_with_proof,
        csr,
        chain,
        renewal_proof(key, csr),
    )
    assert "revoked" in message
    key = p256()
    issued = anonymous.enroll(make_csr(key, cn="sensor-4"), admin.create_enrollment_token().token)
    clock.advance(datetime.timedelta(days=30))
    csr = make_csr(p256(), cn="sensor-4")
    message = _refused(
        grpc.StatusCode.PERMISSION_DENIED,
        anonymous.renew_with_proof,
        csr,
        issued.certificate_chain_pem,
        renewal_proof(key, csr),
    )
    assert "expired" in message


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_renew_with_proof_through_a_zone_server(tmp_path: Path, workers: str) -> None:
    server = ServerProcess(tmp_path / "server")
    data = server.data_dir
    zone: Process | None = None
    try:
        zone_token = run_cli(
            "tokens", "create", "--role", "zone-server", data_dir=data, check=True
        ).stdout.strip()
        run_cli("bundle", "download", "--out", str(tmp_path / "b0.dat"), data_dir=data, check=True)
        zone = Process(
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
            zone_token,
            "--workers",
            workers,
        )
        wait_until("the zone server", lambda: "listening on" in zone.output(), 60)  # type: ignore[union-attr]
        run_cli("bundle", "download", "--out", str(tmp_path / "b1.dat"), data_dir=data, check=True)
        bundle = load_bundle((tmp_path / "b1.dat").read_bytes())
        endpoint = bundle.enrollment_endpoint()
        assert endpoint.zone
        token = json.loads(
            run_cli("tokens", "create", "--uses", "2", "--json", data_dir=data, check=True).stdout
        )["token"]
        channel = bootstrap_channel_for(endpoint.bootstrap_listen, bundle.roots_pem())
        with KeyplaneClient(channel, timeout=30) as client:
            key = p256()
            issued = client.enroll(make_csr(key, cn="meter-1"), token)
            chain = issued.certificate_chain_pem
            assert (
                "zone1"
                in x509.load_pem_x509_certificates(chain.encode())[1].subject.rfc4514_string()
            )
            new_key = p256()
            csr = make_csr(new_key, cn="meter-1")
            renewed = client.renew_with_proof(csr, chain, renewal_proof(key, csr))
            leaf, intermediate = x509.load_pem_x509_certificates(
                renewed.certificate_chain_pem.encode()
            )
            leaf.verify_directly_issued_by(intermediate)
            assert leaf.public_key() == new_key.public_key()
            # At the zone too: a forged certificate and a wrong proof are refused.
            message = _refused(
                grpc.StatusCode.PERMISSION_DENIED,
                client.renew_with_proof,
                csr,
                _forged(chain),
                renewal_proof(key, csr),
            )
            assert "not a trusted intermediate" in message
            message = _refused(
                grpc.StatusCode.UNAUTHENTICATED,
                client.renew_with_proof,
                csr,
                chain,
                renewal_proof(p256(), csr),
            )
            assert "renewal proof does not verify" in message
        token = json.loads(
            run_cli("tokens", "create", "--uses", "8", "--json", data_dir=data, check=True).stdout
        )["token"]
        # Over eight connections (the kernel spreads them over the workers): all served.
        for i in range(8):
            channel = bootstrap_channel_for(endpoint.bootstrap_listen, bundle.roots_pem())
            with KeyplaneClient(channel, timeout=30) as client:
                key = p256()
                issued = client.enroll(make_csr(key, cn=f"meter-{i + 2}"), token)
                csr = make_csr(p256(), cn=f"meter-{i + 2}")
                proof = renewal_proof(key, csr)
                assert client.renew_with_proof(csr, issued.certificate_chain_pem, proof).serial
        children = subprocess.run(
            ["pgrep", "-P", str(zone.proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        serving = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        # --workers N (1 too) runs N serving processes under a supervisor.
        assert len(serving) == int(workers)
        # The supervisor killed outright: its workers stop too and free the ports.
        zone.proc.kill()
        wait_until("the orphaned zone workers to stop", lambda: not _listening(endpoint), 15)
    finally:
        if zone is not None:
            zone.stop()
        server.stop()


def _listening(endpoint: object) -> bool:
    host, _, port = endpoint.bootstrap_listen.rpartition(":")  # type: ignore[attr-defined]
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False
