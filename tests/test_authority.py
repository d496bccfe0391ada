"""Authority boundaries, played by the attacker who holds each kind of credential: a
certificate counts only for what its issuer may confer, a zone is its certificate and
not its name, a revocation is published or not made, and the X.509 says so to every
other stack. Each test asserts the refusal (status and reason) and that nothing changed.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.server.domain import certs
from keyplane.v1 import zone_service_pb2
from tests.serverkit import FQDN, RunningServer, openssl_verify
from tests.test_enrollment import make_csr, p256
from tests.zonekit import FakeZone, enroll_fake_zone, key_pem, mtls_channel


def _roots(server: RunningServer) -> bytes:
    return (server.admin_dir / "ca.pem").read_bytes()


def _refused(code: grpc.StatusCode, call: object, *args: object) -> KeyplaneClientError:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code == code, caught.value
    return caught.value


def _state(server: RunningServer) -> tuple[int, int, int]:
    """What an attack must not change: audit lines (but the refusals, which are recorded,
    as they should be), certificates, trust-state version."""
    store = server.hierarchy.store
    return (
        len([e for e in store.audit_log(1_000_000) if e.outcome != "refused"]),
        len(store.certificates(None, 10_000)),
        server.hierarchy.trust.latest_version(),
    )


@pytest.fixture
def zone(server: RunningServer, admin: KeyplaneClient) -> FakeZone:
    token = admin.create_enrollment_token(role="zone-server").token
    return enroll_fake_zone(server.bootstrap, _roots(server), token)


def _as(server: RunningServer, chain: bytes, key: object) -> KeyplaneClient:
    return KeyplaneClient(mtls_channel(server.listen, chain, key_pem(key), _roots(server)))  # type: ignore[arg-type]


# -- a zone minting credentials ------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "operator", "auditor", "zone-server"])
def test_a_zone_minted_credential_gets_no_role_it_claims(
    server: RunningServer, admin: KeyplaneClient, zone: FakeZone, role: str
) -> None:
    before = _state(server)
    for roles in ([role], [role, "agent"]):
        cert, key = zone.mint(f"evil-{role}", roles)
        with _as(server, zone.chain(cert), key) as client:
            error = _refused(grpc.StatusCode.PERMISSION_DENIED, client.list_root_keys)
            assert "which a zone's intermediate may not confer" in error.message
            _refused(grpc.StatusCode.PERMISSION_DENIED, client.create_enrollment_token)
            _refused(grpc.StatusCode.PERMISSION_DENIED, client.sign_message, b"release")
    assert _state(server) == before


def test_a_zone_minted_copy_of_the_admin_serial_is_not_the_admin(
    server: RunningServer, admin: KeyplaneClient, zone: FakeZone
) -> None:
    real = x509.load_pem_x509_certificate((server.admin_dir / "admin.pem").read_bytes())
    cert, key = zone.mint("admin@pki.test", ["admin"], serial=real.serial_number)
    before = _state(server)
    with _as(server, zone.chain(cert), key) as client:
        error = _refused(grpc.StatusCode.PERMISSION_DENIED, client.list_root_keys)
    assert "not the certificate issued with its serial" in error.message
    assert _state(server) == before


def test_a_zone_minted_agent_certificate_is_an_agent_and_nothing_more(
    server: RunningServer, admin: KeyplaneClient, zone: FakeZone
) -> None:
    cert, key = zone.mint("meter-7", ["agent"])
    with _as(server, zone.chain(cert), key) as client:
        # Admitted as an agent: the trust state comes, admin calls do not.
        assert client.get_trust_state(0)
        error = _refused(grpc.StatusCode.PERMISSION_DENIED, client.list_root_keys)
        assert "needs the admin or auditor or operator role" in error.message


def test_no_stack_accepts_a_zone_issued_leaf_as_a_server_for_a_real_name(
    server: RunningServer, zone: FakeZone, tmp_path: Path
) -> None:
    roots_pem = _roots(server).decode()
    forged, _ = zone.mint(FQDN, [], dns=[FQDN, "127.0.0.1"], server_auth=True)
    chain = zone.chain(forged).decode()
    result = openssl_verify(tmp_path / "forged", roots_pem, chain, purpose="sslserver")
    assert result.returncode != 0, result.stdout
    store = Store(x509.load_pem_x509_certificates(roots_pem.encode()))
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(FQDN))
    with pytest.raises(VerificationError):
        verifier.verify(forged, [zone.intermediate])
    # The same intermediate's agent certificates verify as clients, with any name.
    for cn in ("meter-7", "web01.corp.example.com"):
        agent, _ = zone.mint(cn, ["agent"], dns=["agent.invalid"])
        good = openssl_verify(tmp_path / cn, roots_pem, zone.chain(agent).decode())
        assert good.returncode == 0, good.stderr
        PolicyBuilder().store(store).build_client_verifier().verify(agent, [zone.intermediate])


def test_the_zone_intermediate_says_what_it_may_sign(zone: FakeZone) -> None:
    constraints = zone.intermediate.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [x509.DNSName("invalid")]
    eku = zone.intermediate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    basic = zone.intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0


# -- a zone taking over another ------------------------------------------------------------


def test_a_zone_name_cannot_be_taken_over(
    server: RunningServer, admin: KeyplaneClient, zone: FakeZone, anonymous: KeyplaneClient
) -> None:
    before = _state(server)
    listed = admin.list_zone_servers()
    token = admin.create_enrollment_token(role="zone-server").token
    request = zone_service_pb2.EnrollZoneServerRequest(
        token=token,
        intermediate_csr=make_csr(p256(), cn=zone.name),
        tls_csr=make_csr(p256(), cn=zone.name),
        name=zone.name,
        listen="10.66.6.6:7443",
        bootstrap_listen="10.66.6.6:7444",
    )
    error = _refused(grpc.StatusCode.ALREADY_EXISTS, anonymous.enroll_zone_server, request)
    assert "revoke it first" in error.message
    # The refused enrollment spent nothing: the token still enrolls another zone.
    assert admin.list_zone_servers() == listed
    assert _state(server)[1:] == before[1:]


def test_a_zone_renews_itself_and_no_other(
    server: RunningServer, admin: KeyplaneClient, zone: FakeZone
) -> None:
    token = admin.create_enrollment_token(role="zone-server").token
    victim = enroll_fake_zone(
        server.bootstrap, _roots(server), token, "victim", "10.7.7.7:7443", "10.7.7.7:7444"
    )
    before = admin.get_zone_server("victim")
    with KeyplaneClient(zone.channel(server.listen, _roots(server))) as attacker:
        error = _refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            attacker.renew_zone_server,
            zone_service_pb2.RenewZoneServerRequest(
                intermediate_csr=make_csr(p256(), cn="victim"),
                tls_csr=make_csr(p256(), cn="victim"),
            ),
        )
        assert "zone server's name" in error.message
    assert admin.get_zone_server("victim") == before
    # The victim renews itself, once per certificate: its old certificate renews no more.
    old_chain = victim.tls_chain_pem
    with KeyplaneClient(victim.channel(server.listen, _roots(server))) as own:
        renewed = own.renew_zone_server(
            zone_service_pb2.RenewZoneServerRequest(
                intermediate_csr=make_csr(p256(), cn="victim"),
                tls_csr=make_csr(p256(), cn="victim"),
            )
        )
        assert renewed.tls_certificate.serial == admin.get_zone_server("victim").tls_serial
    with KeyplaneClient(
        mtls_channel(server.listen, old_chain.encode(), key_pem(victim.tls_key), _roots(server))
    ) as stale:
        error = _refused(
            grpc.StatusCode.PERMISSION_DENIED,
            stale.renew_zone_server,
            zone_service_pb2.RenewZoneServerRequest(
                intermediate_csr=make_csr(p256(), cn="victim"),
                tls_csr=make_csr(p256(), cn="victim"),
            ),
        )
        assert "current certificate" in error.message


def test_a_zone_reports_only_agents_it_issued(
    server: RunningServer, admin: KeyplaneClient, zone: FakeZone
) -> None:
    token = admin.create_enrollment_token(role="zone-server").token
    other = enroll_fake_zone(
        server.bootstrap, _roots(server), token, "other", "10.8.8.8:7443", "10.8.8.8:7444"
    )
    before = _state(server)
    admin_cert, _ = zone.mint("boss", ["admin"])
    agent_cert, _ = zone.mint("meter", ["agent"])
    foreign, _ = other.mint("theirs", ["agent"])
    with KeyplaneClient(zone.channel(server.listen, _roots(server))) as client:
        for der, component, code in (
            (certs.to_der(agent_cert), "admin", grpc.StatusCode.PERMISSION_DENIED),
            (certs.to_der(admin_cert), "agent", grpc.StatusCode.PERMISSION_DENIED),
            (certs.to_der(foreign), "agent", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            report = zone_service_pb2.IssuedCertificateReport(
                certificate_der=der, component=component
            )
            _refused(code, client.report_issued_certificates, [report])
    assert _state(server) == before


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        (f"{FQDN}:7443", "server's own names"),
        ("*.example.org:7443", "no wildcard"),
        ("0.0.0.0:7443", "no client can connect"),
        ("10.1.1.1", "HOST:PORT"),
        ("10.1.1.1:99999", "HOST:PORT"),
        ("zone-é.example:7443", "printable ASCII"),
        ("a" * 20_000 + ":7443", "longer than 255 bytes"),
        ("::1:7443", "in brackets"),
    ],
)
def test_bad_zone_listen_strings_are_refused(
    server: RunningServer,
    admin: KeyplaneClient,
    anonymous: KeyplaneClient,
    listen: str,
    reason: str,
) -> None:
    token = admin.create_enrollment_token(role="zone-server").token
    before = _state(server)
    request = zone_service_pb2.EnrollZoneServerRequest(
        token=token,
        intermediate_csr=make_csr(p256(), cn="zoneq"),
        tls_csr=make_csr(p256(), cn="zoneq"),
        name="zoneq",
        listen=listen,
        bootstrap_listen="10.3.3.3:7444",
    )
    error = _refused(grpc.StatusCode.INVALID_ARGUMENT, anonymous.enroll_zone_server, request)
    assert reason in error.message
    assert _state(server) == before
    assert admin.get_init_bundle().body  # the bundle still builds for everyone


def test_a_zone_named_like_the_server_is_refused(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    token = admin.create_enrollment_token(role="zone-server").token
    for name in (FQDN, "pki", "zone_with_underscore"):
        request = zone_service_pb2.EnrollZoneServerRequest(
            token=token,
            intermediate_csr=make_csr(p256(), cn=name),
            tls_csr=make_csr(p256(), cn=name),
            name=name,
            listen="10.4.4.4:7443",
            bootstrap_listen="10.4.4.4:7444",
        )
        _refused(grpc.StatusCode.INVALID_ARGUMENT, anonymous.enroll_zone_server, request)


# -- revoking a zone -----------------------------------------------------------------------


def test_revoking_a_zone_revokes_everything_it_issued_and_is_published(
    server: RunningServer, admin: KeyplaneClient, zone: FakeZone
) -> None:
    roots = _roots(server)
    agent_cert, agent_key = zone.mint("meter-9", ["agent"])
    with KeyplaneClient(zone.channel(server.listen, roots)) as client:
        report = zone_service_pb2.IssuedCertificateReport(
            certificate_der=certs.to_der(agent_cert), component="agent"
        )
        assert client.report_issued_certificates([report]) == 1
    # RevokeCertificate on the intermediate's serial, or the zone's own, says what to use.
    for serial in (
        certs.serial_hex(zone.intermediate),
        admin.get_zone_server(zone.name).tls_serial,
    ):
        error = _refused(
            grpc.StatusCode.FAILED_PRECONDITION, admin.revoke_certificate, serial, "no"
        )
        assert "zones revoke" in error.message
    error = _refused(
        grpc.StatusCode.FAILED_PRECONDITION, admin.revoke_zone_server, zone.name, "gone", False
    )
    assert error.reason == "CONFIRMATION_REQUIRED"
    version = server.hierarchy.trust.latest_version()
    revoked = admin.revoke_zone_server(zone.name, "compromised", True)
    assert revoked.state == "revoked" and revoked.revoke_reason == "compromised"
    # Published in the same step: the trust state names the intermediate and the agent.
    assert server.hierarchy.trust.latest_version() == version + 1
    body = _latest_body(admin, roots)
    assert certs.key_fingerprint(zone.intermediate) in body.revoked_key_fingerprints
    assert certs.serial_hex(agent_cert) in body.revoked_serials
    # The zone and its agents are refused; the bundle no longer names it; the name is free.
    with KeyplaneClient(zone.channel(server.listen, roots)) as client:
        _refused(grpc.StatusCode.PERMISSION_DENIED, client.report_issued_certificates, [report])
    with _as(server, zone.chain(agent_cert), agent_key) as agent:
        error = _refused(
            grpc.StatusCode.PERMISSION_DENIED, agent.renew, make_csr(p256(), cn="meter-9")
        )
    names = [s.name for s in _bundle_servers(admin)]
    assert zone.name not in names
    assert [z.name for z in admin.list_zone_servers()] == []
    assert [z.state for z in admin.list_zone_servers(include_revoked=True)] == ["revoked"]
    token = admin.create_enrollment_token(role="zone-server").token
    again = enroll_fake_zone(
        server.bootstrap, roots, token, zone.name, "10.5.5.5:7443", "10.5.5.5:7444"
    )
    assert again.name == zone.name


def _latest_body(admin: KeyplaneClient, roots: bytes) -> object:
    from keyplane.clients.trust import load

    return load(admin.get_trust_state(0)[-1].SerializeToString()).body


def _bundle_servers(admin: KeyplaneClient) -> list[object]:
    from keyplane.v1 import bundle_service_pb2

    return list(bundle_service_pb2.InitBundleBody.FromString(admin.get_init_bundle().body).servers)


# -- fail closed ---------------------------------------------------------------------------


def test_a_revocation_that_cannot_be_published_is_not_made(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    issued = anonymous.enroll(make_csr(p256(), cn="victim"), admin.create_enrollment_token().token)
    before = _state(server)
    server.hierarchy.faults.fail_at = "trust.sign"  # the backend fails when it signs
    try:
        error = _refused(grpc.StatusCode.UNAVAILABLE, admin.revoke_certificate, issued.serial, "x")
        assert "was not revoked" in error.message and "nothing changed" in error.message
        assert server.hierarchy.store.certificate(issued.serial).revoked_at is None
        assert _state(server) == before
    finally:
        server.hierarchy.faults.fail_at = ""
    # Once the backend signs again, the same call revokes and publishes at once.
    admin.revoke_certificate(issued.serial, "x")
    assert issued.serial in _latest_body(admin, _roots(server)).revoked_serials


def test_a_revocation_killed_before_its_commit_is_neither_half_made_nor_lost(
    tmp_path: Path,
) -> None:
    """SIGKILL between signing the trust state and committing it: after the restart the
    certificate is not revoked and the published state agrees; revoking again works."""
    from tests.serverkit import ServerProcess, run_cli

    data = tmp_path / "data"
    server = ServerProcess(data)
    token = json.loads(run_cli("tokens", "create", "--json", data_dir=data, check=True).stdout)[
        "token"
    ]
    boot = json.loads((data / "admin" / "endpoint.json").read_text())["bootstrap_listen"]
    roots = (data / "admin" / "ca.pem").read_bytes()
    with KeyplaneClient(bootstrap_channel_for(boot, roots)) as anonymous:
        issued = anonymous.enroll(make_csr(p256(), cn="kill-me"), token)
    assert server.stop() == 0
    config = tmp_path / "kill.toml"
    config.write_text('[testing]\nkill_at = "trust.signed"\n')
    # The start publishes nothing new (its state is current), so the kill point is first
    # reached by the revocation.
    killed = ServerProcess(data, "--config", str(config))
    result = run_cli("certs", "revoke", issued.serial, "--reason", "x", data_dir=data)
    assert result.returncode != 0
    assert killed.proc.wait(timeout=30) == -9
    killed.stop()
    again = ServerProcess(data)
    try:
        shown = json.loads(run_cli("certs", "list", "--json", data_dir=data, check=True).stdout)
        mine = next(c for c in shown if c["serial"] == issued.serial)
        assert mine["revoked"] is None
        trust = json.loads(
            run_cli("trust-state", "show", "--json", data_dir=data, check=True).stdout
        )
        assert issued.serial not in trust["revoked_serials"]
        assert (
            run_cli("certs", "revoke", issued.serial, "--reason", "x", data_dir=data).returncode
            == 0
        )
        trust = json.loads(
            run_cli("trust-state", "show", "--json", data_dir=data, check=True).stdout
        )
        assert issued.serial in trust["revoked_serials"]
    finally:
        again.stop()


def test_zone_servers_are_listed_with_what_they_issued(
    server: RunningServer, admin: KeyplaneClient, zone: FakeZone
) -> None:
    listed = admin.list_zone_servers()
    assert [z.name for z in listed] == [zone.name]
    one = admin.get_zone_server(zone.name)
    assert one.state == "live" and one.listen == "10.9.9.9:7443"
    assert one.intermediate_fingerprint == certs.key_fingerprint(zone.intermediate)
    assert one.intermediate_not_after.ToDatetime(tzinfo=datetime.UTC) > datetime.datetime.now(
        datetime.UTC
    )
    _refused(grpc.StatusCode.NOT_FOUND, admin.get_zone_server, "nope")
