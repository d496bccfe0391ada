"""RenewWithProof over real gRPC, at the server and through a zone server: the current
certificate and a proof by its key in the request, over a connection without a client
certificate. Every way to get it wrong is refused and stores nothing; a recorded
request cannot be replayed; a certificate renews once; a revoked key never comes back."""

from __future__ import annotations

import datetime
import itertools
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
from keyplane.clients.credentials import load_credential
from keyplane.clients.renewal import RENEWAL_PROOF_CONTEXT, renewal_proof
from keyplane.clients.trust import load as load_trust_state
from keyplane.server.domain import certs
from keyplane.server.domain import renewal as server_renewal
from keyplane.server.domain.clock import ManualClock
from keyplane.v1 import audit_service_pb2
from tests.serverkit import FQDN, RunningServer, ServerProcess, run_cli
from tests.test_enrollment import make_csr, p256
from tests.test_fleet import Process, wait_until
from tests.zonekit import enroll_fake_zone, key_pem, mtls_channel


def _refused(code: grpc.StatusCode, call: object, *args: object) -> KeyplaneClientError:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code == code, caught.value
    return caught.value


def _leaf(chain_pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem.encode())[0]


def renew(
    client: KeyplaneClient,
    key: object,
    chain: str,
    csr: bytes,
    audience: str = FQDN,
    when: int | None = None,
) -> object:
    proof, made = renewal_proof(key, _leaf(chain), csr, audience, when)  # type: ignore[arg-type]
    return client.renew_with_proof(csr, chain, proof, made)


def _forged(chain_pem: str) -> str:
    """The same subject, serial and issuer name, with the forger's key, self-signed by a
    key that is not the intermediate's."""
    leaf = _leaf(chain_pem)
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


def test_the_proof_context_is_the_same_on_both_sides() -> None:
    assert RENEWAL_PROOF_CONTEXT == server_renewal.RENEWAL_PROOF_CONTEXT
    assert server_renewal.renewal_message(b"c", b"r", "a", 7).startswith(RENEWAL_PROOF_CONTEXT)


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
        renewed = renew(anonymous, key, issued.certificate_chain_pem, csr)
        leaf, intermediate = x509.load_pem_x509_certificates(renewed.certificate_chain_pem.encode())  # type: ignore[attr-defined]
        leaf.verify_directly_issued_by(intermediate)
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-1"
        assert leaf.public_key() == new_key.public_key()
        assert renewed.serial in {c.serial for c in admin.list_certificates("agent")}  # type: ignore[attr-defined]

    key = p256()
    issued = anonymous.enroll(make_csr(key, cn="sensor-2"), admin.create_enrollment_token().token)
    chain = issued.certificate_chain_pem
    csr = make_csr(p256(), cn="sensor-2")
    before = len(admin.list_certificates("agent"))

    # A proof by another key, over other bytes, for another server, no proof at all.
    for bad_key, bad_csr, audience in (
        (p256(), csr, FQDN),
        (key, csr + b"x", FQDN),
        (key, csr, "zone1"),
    ):
        proof, made = renewal_proof(bad_key, _leaf(chain), bad_csr, audience)
        error = _refused(
            grpc.StatusCode.UNAUTHENTICATED, anonymous.renew_with_proof, csr, chain, proof, made
        )
        assert "renewal proof does not verify" in error.message
    proof, made = renewal_proof(key, _leaf(chain), csr, FQDN)
    _refused(grpc.StatusCode.UNAUTHENTICATED, anonymous.renew_with_proof, csr, chain, b"", made)
    # A proof made too long ago (or ahead) is refused, whatever it signs.
    stale = int(clock.now().timestamp()) - 3600
    error = _refused(
        grpc.StatusCode.UNAUTHENTICATED, renew, anonymous, key, chain, csr, FQDN, stale
    )
    assert "minutes from the server's clock" in error.message
    _refused(grpc.StatusCode.UNAUTHENTICATED, anonymous.renew_with_proof, csr, chain, proof, 0)
    # A forged certificate with a known serial, proved with the forger's own key.
    forged = _forged(chain)
    error = _refused(grpc.StatusCode.PERMISSION_DENIED, renew, anonymous, key, forged, csr)
    assert "not the certificate issued" in error.message
    # No chain, a chain that is not PEM, the same key, another name.
    _refused(grpc.StatusCode.UNAUTHENTICATED, anonymous.renew_with_proof, csr, "", b"x", made)
    _refused(grpc.StatusCode.INVALID_ARGUMENT, anonymous.renew_with_proof, csr, "junk", b"x", 1)
    same = make_csr(key, cn="sensor-2")
    error = _refused(grpc.StatusCode.INVALID_ARGUMENT, renew, anonymous, key, chain, same)
    assert "new key" in error.message
    other = make_csr(p256(), cn="sensor-3")
    error = _refused(grpc.StatusCode.INVALID_ARGUMENT, renew, anonymous, key, chain, other)
    assert "common name" in error.message
    # A new key that holds a certificate already is refused: a key is certified once.
    taken = p256()
    anonymous.enroll(make_csr(taken, cn="sensor-9"), admin.create_enrollment_token().token)
    error = _refused(
        grpc.StatusCode.ALREADY_EXISTS, renew, anonymous, key, chain, make_csr(taken, cn="sensor-2")
    )
    assert "certified once" in error.message
    assert len(admin.list_certificates("agent")) == before + 1

    # Revoked, then expired: refused.
    admin.revoke_certificate(issued.serial, "lost")
    error = _refused(grpc.StatusCode.PERMISSION_DENIED, renew, anonymous, key, chain, csr)
    assert "revoked" in error.message
    key = p256()
    issued = anonymous.enroll(make_csr(key, cn="sensor-4"), admin.create_enrollment_token().token)
    clock.advance(datetime.timedelta(days=30))
    csr = make_csr(p256(), cn="sensor-4")
    proof, made = renewal_proof(key, _leaf(issued.certificate_chain_pem), csr, FQDN)
    error = _refused(
        grpc.StatusCode.PERMISSION_DENIED,
        anonymous.renew_with_proof,
        csr,
        issued.certificate_chain_pem,
        proof,
        int(clock.now().timestamp()),
    )
    assert "expired" in error.message


def test_a_recorded_renewal_replays_to_nothing_and_a_revoked_key_never_comes_back(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    """The attacker has recorded an agent's RenewWithProof request. Replaying it, even
    at once, gets no certificate; after the renewed certificate is revoked, replaying
    the renewal that led to it does not bring its key back."""
    key = p256()
    first = anonymous.enroll(make_csr(key, cn="meter"), admin.create_enrollment_token().token)
    new_key = p256()
    csr = make_csr(new_key, cn="meter")
    proof, made = renewal_proof(key, _leaf(first.certificate_chain_pem), csr, FQDN)
    second = anonymous.renew_with_proof(csr, first.certificate_chain_pem, proof, made)
    count = len(admin.list_certificates("agent"))
    for _ in range(3):
        error = _refused(
            grpc.StatusCode.ALREADY_EXISTS,
            anonymous.renew_with_proof,
            csr,
            first.certificate_chain_pem,
            proof,
            made,
        )
    # And with a fresh CSR for yet another key, the superseded certificate renews no more.
    error = _refused(
        grpc.StatusCode.PERMISSION_DENIED,
        renew,
        anonymous,
        key,
        first.certificate_chain_pem,
        make_csr(p256(), cn="meter"),
    )
    assert error.reason == "PERMISSION_DENIED" and "renews once" in error.message
    admin.revoke_certificate(second.serial, "stolen")
    for _ in range(2):
        error = _refused(
            grpc.StatusCode.ALREADY_EXISTS,
            anonymous.renew_with_proof,
            csr,
            first.certificate_chain_pem,
            proof,
            made,
        )
        assert "revoked" in error.message
    # The revoked key cannot enroll again either, with a fresh token.
    error = _refused(
        grpc.StatusCode.ALREADY_EXISTS,
        anonymous.enroll,
        make_csr(new_key, cn="meter"),
        admin.create_enrollment_token().token,
    )
    assert "revoked key never gets a certificate again" in error.message
    assert len(admin.list_certificates("agent")) == count


def _zone(tmp_path: Path, server: ServerProcess, workers: str) -> tuple[Process, object]:
    data = server.data_dir
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
    wait_until("the zone server", lambda: "listening on" in zone.output(), 60)
    run_cli("bundle", "download", "--out", str(tmp_path / "b1.dat"), data_dir=data, check=True)
    return zone, load_bundle((tmp_path / "b1.dat").read_bytes())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_renew_with_proof_through_a_zone_server(tmp_path: Path, workers: str) -> None:
    server = ServerProcess(tmp_path / "server")
    data = server.data_dir
    zone: Process | None = None
    try:
        zone, bundle = _zone(tmp_path, server, workers)
        endpoint = bundle.enrollment_endpoint()  # type: ignore[attr-defined]
        assert endpoint.zone and endpoint.name == "zone1"
        token = json.loads(
            run_cli("tokens", "create", "--uses", "3", "--json", data_dir=data, check=True).stdout
        )["token"]
        channel = bootstrap_channel_for(endpoint.bootstrap_listen, bundle.roots_pem())  # type: ignore[attr-defined]
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
            proof, made = renewal_proof(key, _leaf(chain), csr, "zone1")
            renewed = client.renew_with_proof(csr, chain, proof, made)
            leaf, intermediate = x509.load_pem_x509_certificates(
                renewed.certificate_chain_pem.encode()
            )
            leaf.verify_directly_issued_by(intermediate)
            assert leaf.public_key() == new_key.public_key()
            # The recorded request replayed at the zone: renews once, nothing more.
            error = _refused(
                grpc.StatusCode.PERMISSION_DENIED, client.renew_with_proof, csr, chain, proof, made
            )
            assert "renewed already" in error.message
            # A proof for the server is no proof for the zone.
            csr2 = make_csr(p256(), cn="meter-1")
            error = _refused(
                grpc.StatusCode.UNAUTHENTICATED,
                renew,
                client,
                new_key,
                renewed.certificate_chain_pem,
                csr2,
                FQDN,
            )
            assert "renewal proof does not verify" in error.message
            # At the zone too: a forged certificate and a wrong proof are refused.
            error = _refused(
                grpc.StatusCode.PERMISSION_DENIED,
                renew,
                client,
                key,
                _forged(chain),
                csr2,
                "zone1",
            )
            assert "not a trusted intermediate" in error.message
            # Another zone's credentials at this zone: what it mints claiming admin is
            # refused outright, its agents are agents, and they renew where they were issued.
            boot = json.loads((data / "admin" / "endpoint.json").read_text())["bootstrap_listen"]
            other_token = run_cli(
                "tokens", "create", "--role", "zone-server", data_dir=data, check=True
            ).stdout.strip()
            other = enroll_fake_zone(boot, bundle.roots_pem(), other_token, "zone2")  # type: ignore[attr-defined]
            minted, minted_key = other.mint("boss", ["agent", "admin"])
            theirs, theirs_key = other.mint("meter-x", ["agent"])
            wait_until(
                "zone1 to relay zone2's intermediate",
                lambda: _zone_knows(client, other.intermediate),
                20,
            )
            roots = bundle.roots_pem()  # type: ignore[attr-defined]
            for cert, cert_key, code, words in (
                (minted, minted_key, grpc.StatusCode.PERMISSION_DENIED, "may not confer"),
                (theirs, theirs_key, grpc.StatusCode.FAILED_PRECONDITION, "not issued by this"),
            ):
                with KeyplaneClient(
                    mtls_channel(endpoint.listen, other.chain(cert), key_pem(cert_key), roots)
                ) as holder:
                    error = _refused(
                        code, holder.renew, make_csr(p256(), cn=certs.common_name_of(cert))
                    )
                    assert words in error.message, error.message
            # The server does not renew what the zone issued: it renews where it lives.
            with KeyplaneClient(bootstrap_channel_for(boot, bundle.roots_pem())) as at_server:  # type: ignore[attr-defined]
                error = _refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    renew,
                    at_server,
                    new_key,
                    renewed.certificate_chain_pem,
                    csr2,
                    FQDN,
                )
            assert "issued by a zone server" in error.message
            # A revoked key never comes back at the zone: the trust state tells it.
            with KeyplaneClient.connect(server.listen, load_credential(data / "admin")) as admin:
                wait_until(
                    "the report",
                    lambda: renewed.serial in {c.serial for c in admin.list_certificates("agent")},
                    20,
                )
                admin.revoke_certificate(renewed.serial, "stolen")
            wait_until(
                "the zone to relay the revocation",
                lambda: renewed.serial in _zone_revoked_serials(client),
                20,
            )
            error = _refused(
                grpc.StatusCode.PERMISSION_DENIED,
                renew,
                client,
                new_key,
                renewed.certificate_chain_pem,
                csr2,
                "zone1",
            )
            assert "revoked" in error.message
        # Renew over mutual TLS at the zone, its answer "lost": asked again for the same
        # key it is the same certificate; for another key, refused.
        token = json.loads(run_cli("tokens", "create", "--json", data_dir=data, check=True).stdout)[
            "token"
        ]
        roots = bundle.roots_pem()  # type: ignore[attr-defined]
        with KeyplaneClient(bootstrap_channel_for(endpoint.bootstrap_listen, roots)) as client:
            key = p256()
            issued = client.enroll(make_csr(key, cn="meter-lost"), token)
        with KeyplaneClient(
            mtls_channel(
                endpoint.listen, issued.certificate_chain_pem.encode(), key_pem(key), roots
            )
        ) as holder:
            csr = make_csr(p256(), cn="meter-lost")
            first = holder.renew(csr)
            assert holder.renew(csr).serial == first.serial
            error = _refused(
                grpc.StatusCode.PERMISSION_DENIED, holder.renew, make_csr(p256(), cn="meter-lost")
            )
            assert "renewed already" in error.message
        token = json.loads(
            run_cli("tokens", "create", "--uses", "8", "--json", data_dir=data, check=True).stdout
        )["token"]
        # Over eight connections (the kernel spreads them over the workers): all served.
        for i in range(8):
            channel = bootstrap_channel_for(endpoint.bootstrap_listen, bundle.roots_pem())  # type: ignore[attr-defined]
            with KeyplaneClient(channel, timeout=30) as client:
                key = p256()
                issued = client.enroll(make_csr(key, cn=f"meter-{i + 2}"), token)
                csr = make_csr(p256(), cn=f"meter-{i + 2}")
                assert renew(client, key, issued.certificate_chain_pem, csr, "zone1").serial  # type: ignore[attr-defined]
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


def _zone_knows(client: KeyplaneClient, intermediate: x509.Certificate) -> bool:
    versions = client.get_trust_state(0)
    if not versions:
        return False
    body = load_trust_state(versions[-1].SerializeToString()).body
    return certs.key_fingerprint(intermediate) in {i.fingerprint for i in body.intermediates}


def _zone_revoked_serials(client: KeyplaneClient) -> set[str]:
    versions = client.get_trust_state(0)
    if not versions:
        return set()
    # Read as given: what the zone relays, not what a client would verify.
    return set(load_trust_state(versions[-1].SerializeToString()).body.revoked_serials)


def _listening(endpoint: object) -> bool:
    host, _, port = endpoint.bootstrap_listen.rpartition(":")  # type: ignore[attr-defined]
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def test_revoking_a_certificate_revokes_what_it_was_renewed_into(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    """An operator revokes the serial they saw; its holder (or whoever stole its key)
    renewed it a moment before. The renewals it led to are revoked with it, audited as
    such, and published in the same trust-state version."""
    keys = [p256() for _ in range(3)]
    issued = [
        anonymous.enroll(make_csr(keys[0], cn="relay"), admin.create_enrollment_token().token)
    ]
    for old, new in itertools.pairwise(keys):
        issued.append(
            renew(anonymous, old, issued[-1].certificate_chain_pem, make_csr(new, cn="relay"))
        )
    serials = [i.serial for i in issued]
    unrelated = anonymous.enroll(
        make_csr(p256(), cn="other"), admin.create_enrollment_token().token
    )
    admin.revoke_certificate(serials[0], "keyCompromise: laptop lost")
    records = {c.serial: c for c in admin.list_certificates("agent")}
    assert all(records[s].HasField("revoke_time") for s in serials)
    assert {records[s].revoke_reason for s in serials} == {"keyCompromise: laptop lost"}
    assert not records[unrelated.serial].HasField("revoke_time")
    events = [
        e
        for e in admin.audit_events(audit_service_pb2.ListAuditEventsRequest(), limit=50)
        if e.action == "certificate.revoke"
    ]
    assert sorted(e.target for e in events) == sorted(serials)
    followed = {e.target: json.loads(e.details_json).get("renewed_from") for e in events}
    assert followed == {serials[0]: None, serials[1]: serials[0], serials[2]: serials[1]}
    published = load_trust_state(admin.get_trust_state(0)[-1].SerializeToString()).body
    assert set(serials) <= set(published.revoked_serials)
    assert unrelated.serial not in published.revoked_serials
    # The newest of them is refused like the first.
    with KeyplaneClient(
        mtls_channel(
            server.listen,
            issued[-1].certificate_chain_pem.encode(),
            key_pem(keys[-1]),
            (server.admin_dir / "ca.pem").read_bytes(),
        )
    ) as holder:
        error = _refused(
            grpc.StatusCode.PERMISSION_DENIED, holder.renew, make_csr(p256(), cn="relay")
        )
        assert "revoked" in error.message
