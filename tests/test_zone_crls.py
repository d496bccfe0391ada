"""Zone CRLs: a real `keyplane zone serve --crl-listen` signs the CRL of its
intermediate, serves it and sends it to the server, whose listener serves it too, and
`openssl verify -crl_download` rejects an agent certificate the zone issued once it is
revoked; and a zone server as an attacker holds one cannot get the server to keep a CRL
it did not sign, one that leaves out a revocation, or one whose number goes back."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.clients.credentials import load_credential
from keyplane.server.domain import certs, crl
from keyplane.v1 import zone_service_pb2
from tests import crlkit
from tests.serverkit import ServerProcess, run_cli, running_server
from tests.test_enrollment import make_csr, p256
from tests.test_fleet import Process, wait_until
from tests.test_roles import _refused
from tests.zonekit import enroll_fake_zone, key_pem, mtls_channel


def _zone_address(process: Process, what: str) -> str:
    found = re.search(re.escape(what) + r"\s*([0-9.:\[\]]+)", process.output())
    assert found is not None, process.output()
    return found.group(1).rstrip("/")


def _served(address: str, fingerprint: str) -> x509.CertificateRevocationList | None:
    status, _, body = crlkit.request(address, "GET", f"/crl/{fingerprint}.crl")
    return x509.load_der_x509_crl(body) if status == 200 else None


def _lists(address: str, fingerprint: str, serial: str) -> bool:
    found = _served(address, fingerprint)
    return found is not None and serial in crlkit.serials_of(found)


def test_a_zone_crl_lists_what_it_issued_and_was_revoked_at_the_zone_and_at_the_server(
    tmp_path: Path,
) -> None:
    data = tmp_path / "server"
    server = ServerProcess(data, "--crl-listen", "127.0.0.1:0")
    zone: Process | None = None
    try:
        endpoint = json.loads((data / "admin" / "endpoint.json").read_text())
        server_crls = endpoint["crl_listen"]
        base = f"http://{server_crls}"
        run_cli("settings", "set", "PKICRLBaseURL", base, data_dir=data, check=True)
        roots = (data / "admin" / "ca.pem").read_text()
        bundle = tmp_path / "bundle.dat"
        run_cli("bundle", "download", "--out", str(bundle), data_dir=data, check=True)
        with KeyplaneClient.connect(server.listen, load_credential(data / "admin")) as admin:
            zone_token = admin.create_enrollment_token(role="zone-server").token
            token = admin.create_enrollment_token(uses=2).token
            root = admin.list_root_keys().active[0]
            zone = Process(
                tmp_path / "zone.log",
                "zone", "serve", "--data-dir", str(tmp_path / "zone"), "--name", "zone1",
                "--bundle", str(bundle), "--token", zone_token, "--crl-listen", "127.0.0.1:0",
            )  # fmt: skip
            wait_until("the zone server", lambda: "CRLs on http://" in zone.output(), 60)  # type: ignore[union-attr]
            zone_crls = _zone_address(zone, "CRLs on http://")
            zone_bootstrap = _zone_address(zone, "bootstrap listener on")
            with KeyplaneClient(bootstrap_channel_for(zone_bootstrap, roots.encode())) as anyone:
                live = anyone.enroll(make_csr(p256(), cn="meter-1"), token)
                doomed = anyone.enroll(make_csr(p256(), cn="meter-2"), token)
            leaf, intermediate = (
                certs.load_pem(b) for b in crlkit.pem_blocks(live.certificate_chain_pem)
            )
            zone_fp = certs.key_fingerprint(intermediate)
            assert crlkit.distribution_point(leaf) == f"{base}/crl/{zone_fp}.crl"
            assert crlkit.distribution_point(intermediate) == f"{base}/crl/{root.fingerprint}.crl"
            wait_until(
                "the server to serve the zone's CRL",
                lambda: _served(server_crls, zone_fp) is not None,
                30,
            )
            first = _served(zone_crls, zone_fp)
            assert first is not None and crlkit.serials_of(first) == set()
            assert first.is_signature_valid(intermediate.public_key())  # type: ignore[arg-type]
            root_crl = crlkit.fetch_crl(server_crls, root.fingerprint)
            for issued in (live, doomed):
                ok = crlkit.verify(
                    tmp_path / "v0", roots, issued.certificate_chain_pem, crls=[root_crl],
                    download=True, check_all=True,
                )  # fmt: skip
                assert ok.returncode == 0, ok.stdout + ok.stderr

            admin.revoke_certificate(doomed.serial, "keyCompromise: meter stolen")
            # The trust state tells the zone; it signs a new CRL and sends it up.
            wait_until(
                "the zone's CRL to list it", lambda: _lists(zone_crls, zone_fp, doomed.serial), 30
            )
            wait_until(
                "the server's copy to list it",
                lambda: _lists(server_crls, zone_fp, doomed.serial),
                30,
            )
            second = _served(server_crls, zone_fp)
            assert second is not None and crlkit.number_of(second) > crlkit.number_of(first)
            assert second.is_signature_valid(intermediate.public_key())  # type: ignore[arg-type]
            assert crlkit.reason_of(second, doomed.serial) == x509.ReasonFlags.key_compromise
            refused = crlkit.verify(
                tmp_path / "v1", roots, doomed.certificate_chain_pem, crls=[root_crl],
                download=True, check_all=True,
            )  # fmt: skip
            assert (
                refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
            )
            still = crlkit.verify(
                tmp_path / "v2",
                roots,
                live.certificate_chain_pem,
                crls=[root_crl, second],
                check_all=True,
            )
            assert still.returncode == 0, still.stdout + still.stderr
    finally:
        if zone is not None:
            zone.stop()
        assert server.stop() == 0


def _crl_by(
    zone_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    serials: list[str],
    number: int,
    hours: float = 1.0,
    start: datetime.timedelta = datetime.timedelta(0),
) -> bytes:
    now = datetime.datetime.now(datetime.UTC) + start
    entries = [crl.Entry(s, now, crl.KEY_COMPROMISE) for s in serials]
    end = now + datetime.timedelta(hours=hours)
    return crl.build(zone_key, issuer, entries, number, now, end)  # type: ignore[arg-type]


def test_a_zone_cannot_get_a_crl_kept_that_it_did_not_sign_leaves_a_revocation_out_or_goes_back(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path / "data", crl_listen="127.0.0.1:0") as server:
        roots = (server.admin_dir / "ca.pem").read_bytes()
        assert server.server.endpoints is not None
        address = server.server.endpoints.crl_listen
        with server.admin_client() as admin:
            tokens = [admin.create_enrollment_token(role="zone-server").token for _ in range(2)]
            agent_token = admin.create_enrollment_token().token
        a = enroll_fake_zone(
            server.bootstrap, roots, tokens[0], "zone-a", "10.7.7.1:7443", "10.7.7.1:7444"
        )
        b = enroll_fake_zone(
            server.bootstrap, roots, tokens[1], "zone-b", "10.7.7.2:7443", "10.7.7.2:7444"
        )
        a_fp = certs.key_fingerprint(a.intermediate)
        minted, _ = a.mint("meter-9", ["agent"])
        serial = certs.serial_hex(minted)
        za = KeyplaneClient(a.channel(server.listen, roots))
        zb = KeyplaneClient(b.channel(server.listen, roots))
        report = zone_service_pb2.IssuedCertificateReport(
            certificate_der=certs.to_der(minted), component="agent"
        )
        assert za.report_issued_certificates([report]) == 1
        with server.admin_client() as admin:
            admin.revoke_certificate(serial, "keyCompromise")
        listed = za.list_zone_revocations()
        assert [(r.serial, r.reason_code, r.issuer_fingerprint) for r in listed] == [
            (serial, crl.KEY_COMPROMISE, a_fp)
        ]
        assert zb.list_zone_revocations() == []  # a zone sees its own, no other's
        agent_key = p256()
        with KeyplaneClient(bootstrap_channel_for(server.bootstrap, roots)) as anyone:
            agent = anyone.enroll(make_csr(agent_key, cn="agent-1"), agent_token)
        as_agent = KeyplaneClient(
            mtls_channel(
                server.listen, agent.certificate_chain_pem.encode(), key_pem(agent_key), roots
            )
        )
        stranger = ec.generate_private_key(ec.SECP256R1())
        number = 1_000
        store = server.hierarchy.store
        before = store.reads.crls()
        ak, ai = a.intermediate_key, a.intermediate
        denied, invalid = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT
        two_hours = datetime.timedelta(hours=2)
        for client, data, code in (
            # Signed by the zone, but leaving out what the server knows was revoked.
            (za, _crl_by(ak, ai, [], number), grpc.StatusCode.FAILED_PRECONDITION),
            # Another zone's intermediate, a key that is no intermediate, the other zone.
            (za, _crl_by(b.intermediate_key, b.intermediate, [serial], number), denied),
            (za, _crl_by(stranger, ai, [serial], number), denied),
            (zb, _crl_by(ak, ai, [serial], number), denied),
            # Not a CRL; expired; valid far too long; an agent's call.
            (za, b"not a CRL", invalid),
            (za, _crl_by(ak, ai, [serial], number, start=-two_hours), invalid),
            (za, _crl_by(ak, ai, [serial], number, hours=24 * 40), invalid),
            (as_agent, _crl_by(ak, ai, [serial], number), denied),
        ):
            _refused(code, client.publish_zone_crl, data)
        # Nothing kept, nothing audited as kept.
        assert store.reads.crls() == before
        assert not [e for e in store.audit_log(1000) if e.action == "crl.publish"]
        assert _served(address, a_fp) is None

        good = _crl_by(a.intermediate_key, a.intermediate, [serial], number)
        assert za.publish_zone_crl(good) == number
        status, _, body = crlkit.request(address, "GET", f"/crl/{a_fp}.crl")
        assert status == 200 and body == good
        # The same number again, or a lower one, is refused: a CRL number is never reused.
        for again in (number, number - 1):
            _refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                za.publish_zone_crl,
                _crl_by(a.intermediate_key, a.intermediate, [serial], again),
            )
        with server.admin_client() as admin:
            admin.revoke_zone_server("zone-a", "decommissioned", True)
        # A revoked zone publishes nothing more.
        _refused(
            grpc.StatusCode.PERMISSION_DENIED,
            za.publish_zone_crl,
            _crl_by(a.intermediate_key, a.intermediate, [serial], number + 1),
        )
        assert crlkit.request(address, "GET", f"/crl/{a_fp}.crl")[2] == good
        for client in (za, zb, as_agent):
            client.close()
