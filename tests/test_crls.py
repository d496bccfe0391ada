"""The server's CRLs, as a TLS stack that is not keyplane's sees them: a real
`keyplane serve --crl-listen`, `openssl verify -crl_check` with the CRL fetched and
with `-crl_download` from the distribution point, CRL numbers that only grow (across a
restart too), reason codes, a re-sign at half-life; and the listener as someone with
network access only sees it: it serves CRLs and nothing else, and changes nothing."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.clients.credentials import load_credential
from keyplane.server.domain import certs
from keyplane.server.domain.client_template import BACKDATE
from keyplane.server.domain.clock import ManualClock
from keyplane.v1 import key_service_pb2
from tests import crlkit
from tests.serverkit import RunningServer, ServerProcess, run_cli, running_server
from tests.test_enrollment import make_csr, p256
from tests.test_roles import _refused, new_identity, snapshot_state
from tests.zonekit import enroll_fake_zone, key_pem, mtls_channel

BASE_SETTING = "PKICRLBaseURL"


def _endpoint(data_dir: Path) -> dict[str, str]:
    return dict(json.loads((data_dir / "admin" / "endpoint.json").read_text()))


def _intermediate(admin: KeyplaneClient) -> x509.Certificate:
    active = [
        k
        for k in admin.list_keys("intermediate-tls")
        if k.state == key_service_pb2.KEY_STATE_ACTIVE
    ]
    return certs.load_pem(active[-1].certificate_pem)


def admin_root_key(admin: KeyplaneClient) -> ec.EllipticCurvePublicKey:
    key = certs.load_pem(admin.list_root_keys().active[0].certificate_pem).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


# -- a real server, openssl ------------------------------------------------------------


def test_openssl_rejects_a_revoked_agent_by_the_served_crl_and_numbers_only_grow(
    tmp_path: Path,
) -> None:
    data = tmp_path / "server"
    server = ServerProcess(data, "--crl-listen", "127.0.0.1:0")
    try:
        endpoint = _endpoint(data)
        crl_listen = endpoint["crl_listen"]
        base = f"http://{crl_listen}"
        run_cli("settings", "set", BASE_SETTING, base + "/", data_dir=data, check=True)
        # Re-issued after the setting, the intermediate names its root's CRL too.
        run_cli("keys", "rotate", "intermediate-tls", data_dir=data, check=True)
        roots = (data / "admin" / "ca.pem").read_text()
        with KeyplaneClient.connect(server.listen, load_credential(data / "admin")) as admin:
            token = admin.create_enrollment_token(uses=2).token
            intermediate = _intermediate(admin)
            root_fp = admin.list_root_keys().active[0].fingerprint
            with KeyplaneClient(
                bootstrap_channel_for(endpoint["bootstrap_listen"], roots.encode())
            ) as anonymous:
                live = anonymous.enroll(make_csr(p256(), cn="live-1"), token)
                doomed = anonymous.enroll(make_csr(p256(), cn="doomed-1"), token)
            int_fp = certs.key_fingerprint(intermediate)
            leaf = certs.load_pem(live.certificate_chain_pem)
            assert crlkit.distribution_point(leaf) == f"{base}/crl/{int_fp}.crl"
            assert crlkit.distribution_point(intermediate) == f"{base}/crl/{root_fp}.crl"
            first = crlkit.fetch_crl(crl_listen, int_fp)
            assert first.is_signature_valid(intermediate.public_key())  # type: ignore[arg-type]
            aki = first.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
            ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            assert aki.key_identifier == ski.value.digest
            assert first.issuer == intermediate.subject and crlkit.serials_of(first) == set()
            # thisUpdate is backdated as certificates are.
            assert first.next_update_utc - first.last_update_utc == (
                datetime.timedelta(hours=24) + BACKDATE
            )
            # -crl_check_all wants the root's CRL too: a root names no distribution
            # point (it is the trust anchor), so it is given as a file.
            root_crl = crlkit.fetch_crl(crl_listen, root_fp)
            assert root_crl.is_signature_valid(admin_root_key(admin))
            for issued in (live, doomed):
                ok = crlkit.verify(
                    tmp_path / "v0", roots, issued.certificate_chain_pem, crls=[root_crl],
                    download=True, check_all=True,
                )  # fmt: skip
                assert ok.returncode == 0, ok.stdout + ok.stderr

            admin.revoke_certificate(doomed.serial, "keyCompromise: lost laptop")
            # At once: the CRL served changed in the transaction that revoked it.
            second = crlkit.fetch_crl(crl_listen, int_fp)
            assert crlkit.number_of(second) > crlkit.number_of(first)
            assert crlkit.serials_of(second) == {doomed.serial}
            assert crlkit.reason_of(second, doomed.serial) == x509.ReasonFlags.key_compromise
            entry = second.get_revoked_certificate_by_serial_number(int(doomed.serial, 16))
            assert entry is not None and crlkit.near(entry.revocation_date_utc)
            refused = crlkit.verify(
                tmp_path / "v1", roots, doomed.certificate_chain_pem, crls=[root_crl],
                download=True, check_all=True,
            )  # fmt: skip
            assert (
                refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
            )
            fetched = crlkit.verify(
                tmp_path / "v2", roots, doomed.certificate_chain_pem, crls=[second]
            )
            assert fetched.returncode != 0 and "revoked" in fetched.stdout + fetched.stderr
            still = crlkit.verify(tmp_path / "v3", roots, live.certificate_chain_pem, crls=[second])
            assert still.returncode == 0, still.stdout + still.stderr
    finally:
        assert server.stop() == 0

    # A restarted server serves the same CRL, and the next one has a greater number.
    server = ServerProcess(data, "--crl-listen", "127.0.0.1:0")
    try:
        crl_listen = _endpoint(data)["crl_listen"]
        again = crlkit.fetch_crl(crl_listen, int_fp)
        assert crlkit.number_of(again) == crlkit.number_of(second)
        with KeyplaneClient.connect(server.listen, load_credential(data / "admin")) as admin:
            admin.revoke_certificate(live.serial, "superseded")
        third = crlkit.fetch_crl(crl_listen, int_fp)
        assert crlkit.number_of(third) > crlkit.number_of(second)
        assert crlkit.serials_of(third) == {doomed.serial, live.serial}
        assert crlkit.reason_of(third, live.serial) == x509.ReasonFlags.superseded
        gone = crlkit.verify(tmp_path / "v4", roots, live.certificate_chain_pem, crls=[third])
        assert gone.returncode != 0 and "revoked" in gone.stdout + gone.stderr
    finally:
        assert server.stop() == 0


# -- the listener, as someone with network access only -----------------------------------


@pytest.fixture
def crl_server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data", crl_listen="127.0.0.1:0") as server:
        yield server


def _crl_address(server: RunningServer) -> str:
    assert server.server.endpoints is not None
    return server.server.endpoints.crl_listen


def test_the_crl_listener_serves_crls_and_nothing_else(crl_server: RunningServer) -> None:
    address = _crl_address(crl_server)
    with crl_server.admin_client() as admin:
        root_fp = admin.list_root_keys().active[0].fingerprint
        int_fp = certs.key_fingerprint(_intermediate(admin))
    before = snapshot_state(crl_server)
    crls_before = crl_server.hierarchy.store.reads.crls()
    secret_markers = [b"PRIVATE KEY", (crl_server.admin_dir / "admin.pem").read_bytes()[-200:]]
    key_file = crl_server.config.data_dir / "pki.db.key"
    if key_file.exists():
        secret_markers.append(key_file.read_bytes())
    answers: list[bytes] = []

    def answer(method: str, path: str, **kwargs: object) -> int:
        status, headers, body = crlkit.request(address, method, path, **kwargs)  # type: ignore[arg-type]
        answers.append(body + json.dumps(headers).encode())
        return status

    for fp in (root_fp, int_fp):
        status, headers, body = crlkit.request(address, "GET", f"/crl/{fp}.crl")
        assert status == 200 and headers["Content-Type"] == "application/pkix-crl"
        assert headers["Cache-Control"] == "no-cache"
        x509.load_der_x509_crl(body)
        status, headers, pem = crlkit.request(address, "GET", f"/crl/{fp}.pem")
        assert status == 200
        assert x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER) == body
        status, headers, empty = crlkit.request(address, "HEAD", f"/crl/{fp}.crl")
        assert status == 200 and empty == b"" and headers["Content-Length"] == str(len(body))
        answers.extend([body, pem])
    for path in (
        "/",
        "/crl",
        "/crl/",
        f"/crl/{int_fp}",
        f"/crl/{int_fp}.der",
        f"/crl/{int_fp.upper()}.crl",
        f"/crl/{int_fp}.crl/",
        f"/crl/{int_fp}.crl/..",
        "/crl/../keyplane.db",
        "/crl/%2e%2e/keyplane.db",
        "/keyplane.db",
        "/pki.db.key",
        "/admin/admin.pem",
        f"/crl/{'0' * 64}.crl",  # no such issuer
        f"/crl/{int_fp}.crl%00",
    ):
        assert answer("GET", path) == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"):
        assert answer(method, f"/crl/{int_fp}.crl", body=b"x" * 10) == 405, method
        status, headers, _ = crlkit.request(address, method, f"/crl/{int_fp}.crl")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    # Bounded requests: no body, a short request line, short and few headers.
    assert answer("GET", f"/crl/{int_fp}.crl", body=b"hello") == 413
    assert answer("GET", "/crl/" + "a" * 4000 + ".crl") in (400, 414)
    assert answer("GET", f"/crl/{int_fp}.crl", headers={"X-Big": "b" * 5000}) in (400, 431)
    many = {f"X-H{i}": "1" for i in range(100)}
    assert answer("GET", f"/crl/{int_fp}.crl", headers=many) in (400, 431)
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, b"GET\r\n\r\n"):
        reply = crlkit.raw(address, junk)
        # (aiohttp answers a TLS hello in HTTP/1.0 from 3.14 on)
        assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")) or reply == b"", reply[:80]
        answers.append(reply)
    # Still serving, and nothing changed.
    assert crlkit.request(address, "GET", f"/crl/{int_fp}.crl")[0] == 200
    assert snapshot_state(crl_server) == before
    assert crl_server.hierarchy.store.reads.crls() == crls_before
    for served in answers:
        for marker in secret_markers:
            assert marker not in served


def test_only_an_admin_sets_the_crl_base_url_and_only_to_an_http_url(
    crl_server: RunningServer, tmp_path: Path
) -> None:
    roots = (crl_server.admin_dir / "ca.pem").read_bytes()
    with crl_server.admin_client() as admin:
        people = {r: new_identity(admin, f"{r}@example.org", r) for r in ("operator", "auditor")}
        token = admin.create_enrollment_token(uses=3).token
        zone_token = admin.create_enrollment_token(role="zone-server").token
        for bad in (
            "ftp://crl.example.org",
            "http://",
            "crl.example.org",
            "http://user:pw@crl.example.org",
            "http://crl.example.org/?q=1",
            "http://crl.example.org/#top",
            "http://crl.example.org/a b",
            "http://crl.example.org:99999",
            "javascript:alert(1)",
            "http://" + "a" * 600 + ".org",
        ):
            before = snapshot_state(crl_server)
            message = _refused(
                grpc.StatusCode.INVALID_ARGUMENT, admin.update_setting, BASE_SETTING, bad
            )
            assert BASE_SETTING in message
            assert snapshot_state(crl_server) == before
    agent_key = p256()
    with KeyplaneClient(bootstrap_channel_for(crl_server.bootstrap, roots)) as anonymous:
        agent = anonymous.enroll(make_csr(agent_key, cn="agent-1"), token)
    assert crlkit.distribution_point(certs.load_pem(agent.certificate_chain_pem)) is None
    zone = enroll_fake_zone(crl_server.bootstrap, roots, zone_token)

    callers = {
        **{r: p.client(crl_server) for r, p in people.items()},
        "agent": KeyplaneClient(
            mtls_channel(
                crl_server.listen, agent.certificate_chain_pem.encode(), key_pem(agent_key), roots
            )
        ),
        "zone-server": KeyplaneClient(zone.channel(crl_server.listen, roots)),
    }
    for who, client in callers.items():
        before = snapshot_state(crl_server)
        with client:
            _refused(
                grpc.StatusCode.PERMISSION_DENIED,
                client.update_setting,
                BASE_SETTING,
                "http://evil.example.org",
            )
        assert snapshot_state(crl_server) == before, who
    with crl_server.admin_client() as admin:
        setting = admin.update_setting(BASE_SETTING, "https://crl.example.org:8443/pki/")
        assert setting.value == "https://crl.example.org:8443/pki"
        with KeyplaneClient(bootstrap_channel_for(crl_server.bootstrap, roots)) as anonymous:
            named = anonymous.enroll(make_csr(p256(), cn="agent-2"), token)
        int_fp = certs.key_fingerprint(_intermediate(admin))
        assert crlkit.distribution_point(certs.load_pem(named.certificate_chain_pem)) == (
            f"https://crl.example.org:8443/pki/crl/{int_fp}.crl"
        )
        admin.update_setting(BASE_SETTING, "")
        with KeyplaneClient(bootstrap_channel_for(crl_server.bootstrap, roots)) as anonymous:
            plain = anonymous.enroll(make_csr(p256(), cn="agent-3"), token)
        assert crlkit.distribution_point(certs.load_pem(plain.certificate_chain_pem)) is None


# -- what goes with a root, a zone; half-life ----------------------------------------------


def test_a_revoked_root_and_zone_leave_their_last_crls_with_reasons_and_crls_renew_at_half_life(
    tmp_path: Path,
) -> None:
    clock = ManualClock(datetime.datetime.now(datetime.UTC))
    with running_server(tmp_path / "data", clock=clock, crl_listen="127.0.0.1:0") as server:
        address = _crl_address(server)
        roots = (server.admin_dir / "ca.pem").read_bytes()
        with server.admin_client() as admin:
            old_root = admin.list_root_keys().active[0].fingerprint
            old_int = certs.key_fingerprint(_intermediate(admin))
            token = admin.create_enrollment_token(uses=1).token
            zone_token = admin.create_enrollment_token(role="zone-server").token
        with KeyplaneClient(bootstrap_channel_for(server.bootstrap, roots)) as anonymous:
            agent = anonymous.enroll(make_csr(p256(), cn="agent-1"), token)
        zone = enroll_fake_zone(server.bootstrap, roots, zone_token, name="zone-1")
        with server.admin_client() as admin:
            admin.revoke_zone_server("zone-1", "decommissioned", True)
            zone_serial = certs.serial_hex(certs.load_pem(zone.tls_chain_pem))
            root_crl = crlkit.fetch_crl(address, old_root)
            zone_int_serial = certs.serial_hex(zone.intermediate)
            assert {zone_serial, zone_int_serial} <= crlkit.serials_of(root_crl)
            for serial in (zone_serial, zone_int_serial):
                assert crlkit.reason_of(root_crl, serial) == x509.ReasonFlags.cessation_of_operation
            new_root = admin.create_root_key().fingerprint
            admin.revoke_root_key(old_root, "scheduled rotation", True, force=True)  # agent-1 stays
        # The old root's and its intermediate's last CRLs list what went with them.
        last_root = crlkit.fetch_crl(address, old_root)
        assert crlkit.number_of(last_root) > crlkit.number_of(root_crl)
        last_int = crlkit.fetch_crl(address, old_int)
        assert agent.serial in crlkit.serials_of(last_int)
        assert crlkit.reason_of(last_int, agent.serial) == x509.ReasonFlags.superseded
        assert server.hierarchy.store.key_destroyed(old_root)  # its key is gone, its CRL stays
        live = crlkit.fetch_crl(address, new_root)
        new_int = server.hierarchy.active_key("intermediate_tls").fingerprint
        new_int_crl = crlkit.fetch_crl(address, new_int)
        # Half way to nextUpdate, the scheduler's next look signs every live CA's CRL anew.
        clock.advance(datetime.timedelta(hours=12, minutes=1))
        server.hierarchy.reconcile()
        renewed = crlkit.fetch_crl(address, new_root)
        assert crlkit.number_of(renewed) > crlkit.number_of(live)
        assert renewed.last_update_utc > live.last_update_utc
        assert crlkit.serials_of(renewed) == crlkit.serials_of(live)
        assert crlkit.number_of(crlkit.fetch_crl(address, new_int)) > crlkit.number_of(new_int_crl)
        # A revoked CA signs nothing more: its last CRL stays as it was.
        assert crlkit.number_of(crlkit.fetch_crl(address, old_int)) == crlkit.number_of(last_int)
