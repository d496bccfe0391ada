"""A client that hangs up never stops the server: bursts of calls to every RPC that
writes, each with a deadline of 1 to 100 ms and some cancelled by the client at a random
moment, against a real `keyplane serve` and a real zone server (--workers 1 and 2, keys
in software or in SoftHSM). Afterwards both still serve writes at once, health says
SERVING, every token's spent uses equal the certificates recorded for it, and every
write that was acknowledged is there. A commit thread killed by a fault hook makes its
worker say NOT_SERVING, exit, and come back."""

from __future__ import annotations

import datetime
import hashlib
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyplane.clients.bundle import Bundle, load_bundle
from keyplane.clients.client import CHANNEL_OPTIONS, KeyplaneClient, bootstrap_channel_for
from keyplane.clients.credentials import Credential, load_credential
from keyplane.clients.renewal import renewal_proof
from keyplane.plugins.keys import fingerprint
from keyplane.server.domain import certs
from keyplane.v1 import (
    certificate_service_pb2 as cert_pb,
)
from keyplane.v1 import (
    certificate_service_pb2_grpc,
    enrollment_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    root_key_service_pb2,
    root_key_service_pb2_grpc,
    settings_service_pb2,
    settings_service_pb2_grpc,
    trust_state_pb2,
    trust_state_service_pb2,
    trust_state_service_pb2_grpc,
    zone_service_pb2,
    zone_service_pb2_grpc,
)
from keyplane.v1 import (
    enrollment_service_pb2 as enroll_pb,
)
from tests.bursts import Call, Outcome, fire
from tests.faultkit import SHORT_RUNS, fault_runs
from tests.invariants import Acknowledged, check_invariants
from tests.serverkit import FQDN, RunningServer, ServerProcess, run_cli
from tests.softhsm import SoftHsmToken
from tests.test_enrollment import make_csr, p256
from tests.test_fleet import Process, wait_until
from tests.test_server_hsm import hsm_config

# Calls per RPC in the server's burst and the zone's (at least 500 each), times
# KEYPLANE_FAULT_RUNS / 10 (`make test-long`: 10 times, over 10,000 calls a deployment).
SCALE = fault_runs() // SHORT_RUNS
SERVER_BURST = {
    "Enroll": 180,
    "EnrollBatch": 50,
    "Renew": 30,
    "RenewWithProof": 80,
    "RevokeCertificate": 50,
    "CreateEnrollmentToken": 50,
    "UpdateSetting": 30,
    "CreateRootKey": 6,
    "RotateKey": 12,
    "EnrollZoneServer": 6,
    "RenewZoneServer": 10,
    "RedeemEnrollmentToken": 40,
    "ReportIssuedCertificates": 20,
}
ZONE_BURST = {"Enroll": 260, "RenewWithProof": 160, "Renew": 80}
SERVER_BURST = {rpc: n * SCALE for rpc, n in SERVER_BURST.items()}
ZONE_BURST = {rpc: n * SCALE for rpc, n in ZONE_BURST.items()}
BATCH = 4
AT_ONCE = 10.0  # seconds a write may take after a burst


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _mtls(address: str, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots_pem, private_key=key_pem, certificate_chain=chain_pem
    )
    channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel


def _ready(channel: grpc.Channel) -> grpc.Channel:
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel


@dataclass
class Agent:
    """An enrolled client as the test holds it: its key and certificate chain."""

    key: ec.EllipticCurvePrivateKey
    chain_pem: str
    serial: str

    @property
    def name(self) -> str:
        leaf = x509.load_pem_x509_certificate(self.chain_pem.encode())
        return str(leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


@dataclass
class Deployment:
    tmp: Path
    server: ServerProcess
    zone: Process
    zone_data: Path
    bundle: Bundle
    credential: Credential

    @property
    def data(self) -> Path:
        return self.server.data_dir

    def admin(self) -> KeyplaneClient:
        return KeyplaneClient.connect(self.server.listen, self.credential)

    def server_bootstrap(self) -> str:
        return json.loads((self.data / "admin" / "endpoint.json").read_text())["bootstrap_listen"]

    def zone_endpoint(self) -> Any:
        return self.bundle.enrollment_endpoint()

    def roots(self) -> bytes:
        """The roots active now (the admin credential's ca.pem follows them)."""
        return (self.data / "admin" / "ca.pem").read_bytes()

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data / 'keyplane.db'}?mode=ro", uri=True)


def _zone_config(tmp: Path, token: SoftHsmToken | None) -> list[str]:
    if token is None:
        return []
    options = token.backend_options(tmp)
    config = tmp / "zone.toml"
    config.write_text(
        'intermediate_backend = "pkcs11"\n\n[backends.pkcs11]\n'
        f'module = "{options["module"]}"\ntoken = "{options["token"]}"\n'
        f'pin_file = "{options["pin_file"]}"\n'
    )
    return ["--config", str(config)]


@pytest.fixture(params=["software", "softhsm"])
def backend(request: pytest.FixtureRequest) -> SoftHsmToken | None:
    if request.param == "software":
        return None
    request.applymarker(pytest.mark.softhsm)
    token: SoftHsmToken = request.getfixturevalue("softhsm_token")
    return token


@pytest.fixture(params=["1", "2"])
def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, backend: SoftHsmToken | None
) -> Iterator[Deployment]:
    workers = request.param
    extra = ["--config", str(hsm_config(tmp_path, backend))] if backend is not None else []
    server = ServerProcess(tmp_path / "server", "--workers", workers, *extra)
    zone: Process | None = None
    try:
        data = server.data_dir
        zone_token = run_cli(
            "tokens", "create", "--role", "zone-server", data_dir=data, check=True
        ).stdout.strip()
        run_cli("bundle", "download", "--out", str(tmp_path / "b0.dat"), data_dir=data, check=True)
        zone_data = tmp_path / "zone"
        zone = Process(
            tmp_path / "zone.log",
            "zone",
            "serve",
            "--data-dir",
            str(zone_data),
            "--name",
            "zone1",
            "--bundle",
            str(tmp_path / "b0.dat"),
            "--token",
            zone_token,
            "--workers",
            workers,
            *_zone_config(tmp_path, backend),
        )
        wait_until("the zone server", lambda: "listening on" in zone.output(), 60)  # type: ignore[union-attr]
        run_cli("bundle", "download", "--out", str(tmp_path / "b1.dat"), data_dir=data, check=True)
        bundle = load_bundle((tmp_path / "b1.dat").read_bytes())
        yield Deployment(tmp_path, server, zone, zone_data, bundle, load_credential(data / "admin"))
    finally:
        if zone is not None:
            zone.stop()
        server.stop()


def _enroll_agents(
    channel: grpc.Channel, token: str, prefix: str, count: int, batch: bool = True
) -> list[Agent]:
    stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(channel)
    keys = [p256() for _ in range(count)]
    csrs = [make_csr(k, cn=f"{prefix}-{i}") for i, k in enumerate(keys)]
    if batch:
        issued = list(
            stub.EnrollBatch(
                enroll_pb.EnrollBatchRequest(csrs=csrs, token=token), timeout=60
            ).certificates
        )
    else:
        issued = [
            stub.Enroll(enroll_pb.EnrollRequest(csr=c, token=token), timeout=30).certificate
            for c in csrs
        ]
    return [Agent(k, i.certificate_chain_pem, i.serial) for k, i in zip(keys, issued, strict=True)]


def _proof(key: object, chain_pem: str, csr: bytes, audience: str) -> tuple[bytes, int]:
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    return renewal_proof(key, leaf, csr, audience)  # type: ignore[arg-type]


def _renew_with_proof_call(stub: Any, agent: Agent, acks: Acknowledged, audience: str) -> Call:
    csr = make_csr(p256(), cn=agent.name)
    proof, made = _proof(agent.key, agent.chain_pem, csr, audience)
    request = enroll_pb.RenewWithProofRequest(
        csr=csr, certificate_chain_pem=agent.chain_pem, proof=proof, proof_time=made
    )
    return Call(
        "RenewWithProof",
        lambda t: stub.RenewWithProof.future(request, timeout=t),
        lambda r: acks.serials.add(r.certificate.serial),
    )


def _renew_call(channel: grpc.Channel, agent: Agent, acks: Acknowledged) -> Call:
    stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(channel)
    request = enroll_pb.RenewRequest(csr=make_csr(p256(), cn=agent.name))
    return Call(
        "Renew",
        lambda t: stub.Renew.future(request, timeout=t),
        lambda r: acks.serials.add(r.certificate.serial),
    )


def _enroll_call(stub: Any, token: str, name: str, acks: Acknowledged) -> Call:
    request = enroll_pb.EnrollRequest(csr=make_csr(p256(), cn=name), token=token)
    return Call(
        "Enroll",
        lambda t: stub.Enroll.future(request, timeout=t),
        lambda r: acks.serials.add(r.certificate.serial),
    )


@dataclass
class FakeZone:
    """A zone server enrolled by the test itself, to call the zone RPCs directly."""

    channel: grpc.Channel
    intermediate_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate


def _fake_zone(deployment: Deployment, token: str) -> FakeZone:
    roots = deployment.bundle.roots_pem()
    intermediate_key, tls_key = p256(), p256()
    request = zone_service_pb2.EnrollZoneServerRequest(
        token=token,
        intermediate_csr=make_csr(intermediate_key, cn="burst-zone"),
        tls_csr=make_csr(tls_key, cn="burst-zone"),
        name="burst-zone",
        listen="127.0.0.1:1",
        bootstrap_listen="127.0.0.1:2",
    )
    with bootstrap_channel_for(deployment.server_bootstrap(), roots) as channel:
        response = zone_service_pb2_grpc.ZoneServiceStub(channel).EnrollZoneServer(
            request, timeout=30
        )
    chain = response.tls_certificate.certificate_chain_pem.encode()
    channel = _mtls(deployment.server.listen, chain, _key_pem(tls_key), roots)
    intermediate = x509.load_pem_x509_certificates(response.intermediate_chain_pem.encode())[0]
    return FakeZone(channel, intermediate_key, intermediate)


def _zone_issued(zone: FakeZone, name: str) -> bytes:
    """A certificate as the fake zone would issue it: signed by its intermediate."""
    cert = certs.build_client_certificate_slowly(
        zone.intermediate_key,
        zone.intermediate,
        p256().public_key(),
        name,
        "agent",
        zone.intermediate.not_valid_before_utc + datetime.timedelta(minutes=2),
        datetime.timedelta(days=1),
    )
    return certs.to_der(cert)


def _server_burst(
    deployment: Deployment, admin: KeyplaneClient, acks: Acknowledged
) -> tuple[list[Call], list[str], list[grpc.Channel]]:
    """Every RPC that writes, at the server. Returns the calls, the agent tokens used,
    and the channels to close."""
    roots = deployment.bundle.roots_pem()
    boot = _ready(bootstrap_channel_for(deployment.server_bootstrap(), roots))
    admin_channel = _mtls(
        deployment.server.listen,
        deployment.credential.certificate_chain_pem,
        deployment.credential.private_key_pem,
        deployment.credential.root_certificates_pem,
    )
    channels = [boot, admin_channel]
    enroll = admin.create_enrollment_token(uses=100_000).token
    redeem = admin.create_enrollment_token(uses=1000).token
    zone_token = admin.create_enrollment_token(
        uses=SERVER_BURST["EnrollZoneServer"] + 1, role="zone-server"
    ).token
    holders = _enroll_agents(boot, enroll, "holder", SERVER_BURST["Renew"])
    provers = _enroll_agents(boot, enroll, "prover", SERVER_BURST["RenewWithProof"])
    victims = _enroll_agents(boot, enroll, "victim", SERVER_BURST["RevokeCertificate"])
    fake = _fake_zone(deployment, zone_token)
    channels.append(fake.channel)
    stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(boot)
    certificates = certificate_service_pb2_grpc.CertificateServiceStub(admin_channel)
    settings = settings_service_pb2_grpc.SettingsServiceStub(admin_channel)
    roots_stub = root_key_service_pb2_grpc.RootKeyServiceStub(admin_channel)
    keys = key_service_pb2_grpc.KeyServiceStub(admin_channel)
    zones = zone_service_pb2_grpc.ZoneServiceStub(fake.channel)
    boot_zones = zone_service_pb2_grpc.ZoneServiceStub(boot)
    calls = [_enroll_call(stub, enroll, f"e-{i}", acks) for i in range(SERVER_BURST["Enroll"])]
    for i in range(SERVER_BURST["EnrollBatch"]):
        batch = enroll_pb.EnrollBatchRequest(
            csrs=[make_csr(p256(), cn=f"b-{i}-{j}") for j in range(BATCH)], token=enroll
        )
        calls.append(
            Call(
                "EnrollBatch",
                lambda t, r=batch: stub.EnrollBatch.future(r, timeout=t),
                lambda r: acks.serials.update(c.serial for c in r.certificates),
            )
        )
    for agent in holders:
        channel = _mtls(
            deployment.server.listen, agent.chain_pem.encode(), _key_pem(agent.key), roots
        )
        channels.append(channel)
        calls.append(_renew_call(channel, agent, acks))
    calls += [_renew_with_proof_call(stub, agent, acks, FQDN) for agent in provers]
    for agent in victims:
        request = cert_pb.RevokeCertificateRequest(serial=agent.serial, reason="burst")
        calls.append(
            Call(
                "RevokeCertificate",
                lambda t, r=request: certificates.RevokeCertificate.future(r, timeout=t),
                lambda r: acks.revoked.add(r.certificate.serial),
            )
        )
    for i in range(SERVER_BURST["CreateEnrollmentToken"]):
        request = cert_pb.CreateEnrollmentTokenRequest(uses=1 + i, ttl_seconds=3600)
        calls.append(
            Call(
                "CreateEnrollmentToken",
                lambda t, r=request: certificates.CreateEnrollmentToken.future(r, timeout=t),
                lambda r: acks.tokens.add(_hash(r.token)),
            )
        )
    for i in range(SERVER_BURST["UpdateSetting"]):
        request = settings_service_pb2.UpdateSettingRequest(
            name="PKIClientTLSKeyValidityHours", value=str(150 + i)
        )
        calls.append(
            Call(
                "UpdateSetting",
                lambda t, r=request: settings.UpdateSetting.future(r, timeout=t),
                lambda r: acks.settings.add((r.setting.name, r.setting.value)),
            )
        )
    for _ in range(SERVER_BURST["CreateRootKey"]):
        request = root_key_service_pb2.CreateRootKeyRequest()
        calls.append(
            Call(
                "CreateRootKey",
                lambda t, r=request: roots_stub.CreateRootKey.future(r, timeout=t),
                lambda r: acks.keys.add(r.root_key.fingerprint),
            )
        )
    kinds = [
        key_service_pb2.KEY_KIND_SERVER_TLS,
        key_service_pb2.KEY_KIND_INTERMEDIATE_TLS,
        key_service_pb2.KEY_KIND_MESSAGE_SIGNING,
    ]
    for i in range(SERVER_BURST["RotateKey"]):
        request = key_service_pb2.RotateKeyRequest(kind=kinds[i % 3])
        calls.append(
            Call(
                "RotateKey",
                lambda t, r=request: keys.RotateKey.future(r, timeout=t),
                lambda r: acks.keys.add(r.key.fingerprint),
            )
        )
    for i in range(SERVER_BURST["EnrollZoneServer"]):
        name = f"bz-{i}"
        request = zone_service_pb2.EnrollZoneServerRequest(
            token=zone_token,
            intermediate_csr=make_csr(p256(), cn=name),
            tls_csr=make_csr(p256(), cn=name),
            name=name,
            listen=f"127.0.0.{i + 10}:7443",
            bootstrap_listen=f"127.0.0.{i + 10}:7444",
        )
        calls.append(
            Call(
                "EnrollZoneServer",
                lambda t, r=request: boot_zones.EnrollZoneServer.future(r, timeout=t),
                lambda r, n=name: acks.zones.add(n),
            )
        )
    for _ in range(SERVER_BURST["RenewZoneServer"]):
        request = zone_service_pb2.RenewZoneServerRequest(
            intermediate_csr=make_csr(p256(), cn="burst-zone"),
            tls_csr=make_csr(p256(), cn="burst-zone"),
        )
        calls.append(
            Call(
                "RenewZoneServer",
                lambda t, r=request: zones.RenewZoneServer.future(r, timeout=t),
                lambda r: acks.keys.add(
                    fingerprint(
                        x509.load_pem_x509_certificates(r.intermediate_chain_pem.encode())[
                            0
                        ].public_key()  # type: ignore[arg-type]
                    )
                ),
            )
        )
    for i in range(SERVER_BURST["RedeemEnrollmentToken"]):
        der = _zone_issued(fake, f"z-{i}")
        request = zone_service_pb2.RedeemEnrollmentTokenRequest(
            token=redeem, subject=f"z-{i}", certificate_der=der
        )
        serial = certs.serial_hex(x509.load_der_x509_certificate(der))
        calls.append(
            Call(
                "RedeemEnrollmentToken",
                lambda t, r=request: zones.RedeemEnrollmentToken.future(r, timeout=t),
                lambda r, s=serial: acks.serials.add(s),
            )
        )
    for i in range(SERVER_BURST["ReportIssuedCertificates"]):
        ders = [_zone_issued(fake, f"r-{i}-{j}") for j in range(2)]
        request = zone_service_pb2.ReportIssuedCertificatesRequest(
            certificates=[
                zone_service_pb2.IssuedCertificateReport(certificate_der=d, component="agent")
                for d in ders
            ]
        )
        serials = [certs.serial_hex(x509.load_der_x509_certificate(d)) for d in ders]
        calls.append(
            Call(
                "ReportIssuedCertificates",
                lambda t, r=request: zones.ReportIssuedCertificates.future(r, timeout=t),
                lambda r, s=serials: acks.serials.update(s),
            )
        )
    return calls, [enroll, redeem], channels


def _zone_burst(
    deployment: Deployment, admin: KeyplaneClient, acks: Acknowledged
) -> tuple[list[Call], list[str], list[grpc.Channel]]:
    endpoint = deployment.zone_endpoint()
    roots = deployment.roots()
    boot = _ready(bootstrap_channel_for(endpoint.bootstrap_listen, roots))
    channels = [boot]
    token = admin.create_enrollment_token(uses=100_000).token
    holders = _enroll_agents(boot, token, "zholder", ZONE_BURST["Renew"], batch=False)
    provers = _enroll_agents(boot, token, "zprover", ZONE_BURST["RenewWithProof"], batch=False)
    acks.serials.update(a.serial for a in holders + provers)
    stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(boot)
    calls = [_enroll_call(stub, token, f"ze-{i}", acks) for i in range(ZONE_BURST["Enroll"])]
    calls += [_renew_with_proof_call(stub, agent, acks, endpoint.name) for agent in provers]
    for agent in holders:
        channel = _mtls(endpoint.listen, agent.chain_pem.encode(), _key_pem(agent.key), roots)
        channels.append(channel)
        calls.append(_renew_call(channel, agent, acks))
    return calls, [token], channels


def _quiet(deployment: Deployment, timeout: float = 60.0) -> None:
    """Until the server's work that outlived its callers (rotations running on after
    the caller gave up) is done: the audit log stops growing."""

    def audit_rows() -> int:
        with deployment.db() as db:
            return int(db.execute("SELECT count(*) FROM audit").fetchone()[0])

    deadline = time.monotonic() + timeout
    last, since = audit_rows(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = audit_rows()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return
    raise AssertionError("the server kept writing for a minute after the burst")


def _serving(address: str, roots: bytes) -> bool:
    with bootstrap_channel_for(address, roots) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _check_tokens(deployment: Deployment, tokens: list[str]) -> None:
    with deployment.db() as db:
        for token in tokens:
            uses, left = db.execute(
                "SELECT uses, uses_left FROM enrollment_tokens WHERE token_hash = ?",
                (_hash(token),),
            ).fetchone()
            recorded = db.execute(
                "SELECT count(*) FROM certificates WHERE token_hash = ?", (_hash(token),)
            ).fetchone()[0]
            assert uses - left == recorded, (uses - left, recorded)


def _check_acknowledged(
    deployment: Deployment, acks: Acknowledged, token: SoftHsmToken | None
) -> None:
    """Every invariant (tests/invariants.py), with what the burst was told was done:
    certificates, revocations (published too), tokens, settings, keys and zones."""
    check_invariants(
        deployment.data, zone_dirs=[deployment.zone_data], token=token, acknowledged=acks
    )


def _writes_at_once(
    deployment: Deployment, admin: KeyplaneClient, address: str, audience: str
) -> None:
    """Writes, each answered within AT_ONCE seconds (trusting the roots active now: a
    root the burst created may sign the server's certificate)."""
    roots = deployment.roots()
    with KeyplaneClient(bootstrap_channel_for(address, roots), timeout=AT_ONCE) as client:
        token = admin.create_enrollment_token(uses=2).token
        key = p256()
        issued = client.enroll(make_csr(key, cn="after-burst"), token)
        csr = make_csr(p256(), cn="after-burst")
        proof, made = _proof(key, issued.certificate_chain_pem, csr, audience)
        renewed = client.renew_with_proof(csr, issued.certificate_chain_pem, proof, made)
        assert renewed.serial != issued.serial


@pytest.mark.timeout(300 * SCALE)
def test_bursts_of_abandoned_calls_leave_every_write_path_working(
    deployment: Deployment, backend: SoftHsmToken | None
) -> None:
    acks = Acknowledged()
    roots = deployment.bundle.roots_pem()
    with deployment.admin() as admin:
        calls, tokens, channels = _server_burst(deployment, admin, acks)
        assert len(calls) >= 500
        outcome = fire(calls, seed=9)
        _report(outcome)
        assert outcome.total() == len(calls)
        _quiet(deployment)
        roots = deployment.roots()
        assert _serving(deployment.server_bootstrap(), roots)
        _writes_at_once(deployment, admin, deployment.server_bootstrap(), FQDN)
        _check_tokens(deployment, tokens)
        _check_acknowledged(deployment, acks, backend)
        for channel in channels:
            channel.close()

        # Through the zone server.
        zone_acks = Acknowledged()
        calls, tokens, channels = _zone_burst(deployment, admin, zone_acks)
        assert len(calls) >= 500
        outcome = fire(calls, seed=10)
        _report(outcome)
        endpoint = deployment.zone_endpoint()
        assert _serving(endpoint.bootstrap_listen, roots)
        _writes_at_once(deployment, admin, endpoint.bootstrap_listen, endpoint.name)
        # What the zone acknowledged reaches the server: enrollments at once (the token
        # use and the certificate are one transaction there), renewals by report.
        wait_until("the zone's reports", lambda: _reported(deployment, zone_acks.serials), 30)
        _check_tokens(deployment, tokens)
        _check_acknowledged(deployment, zone_acks, backend)
        for channel in channels:
            channel.close()
    # Nothing the clients did was an error on the server's side.
    for log in (deployment.server.output(), deployment.zone.output()):
        assert "Traceback" not in log and "internal error" not in log


@pytest.mark.timeout(120)
def test_abandoned_trust_state_watchers_leave_the_fanout_working(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    """Watchers that hang up at random moments while versions are published: the next
    watcher gets the newest version at once, and publishing goes on."""
    rng = random.Random(11)
    token = admin.create_enrollment_token(uses=41).token
    roots = (server.admin_dir / "ca.pem").read_bytes()
    with bootstrap_channel_for(server.bootstrap, roots) as channel:
        stub = trust_state_service_pb2_grpc.TrustStateServiceStub(channel)
        enrolled = [
            KeyplaneClient(channel).enroll(make_csr(p256(), cn=f"w-{i}"), token) for i in range(41)
        ]
        watches = []
        for i in range(400):
            call = stub.WatchTrustState(
                trust_state_service_pb2.WatchTrustStateRequest(since_version=rng.randint(0, 5)),
                timeout=rng.uniform(0.001, 0.1),
            )
            watches.append(call)
            if rng.random() < 0.3:
                call.cancel()
            if i % 10 == 0:  # a new version while watchers come and go
                admin.revoke_certificate(enrolled[i // 10].serial, "watched")
        for call in watches:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as exc:
                assert exc.code() in (
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ), exc
        latest = server.hierarchy.trust.latest_version()
        fresh = stub.WatchTrustState(
            trust_state_service_pb2.WatchTrustStateRequest(since_version=0), timeout=5
        )
        first = next(iter(fresh))
        fresh.cancel()
        body = trust_state_pb2.TrustStateBody.FromString(first.versions[-1].body)
        assert body.version == latest
        admin.revoke_certificate(enrolled[-1].serial, "after")
        assert server.hierarchy.trust.latest_version() == latest + 1


def _reported(deployment: Deployment, serials: set[str]) -> bool:
    with deployment.db() as db:
        recorded = {r[0] for r in db.execute("SELECT serial FROM certificates")}
    return serials <= recorded


def _report(outcome: Outcome) -> None:
    # Shown with -rA or on failure: how the burst went.
    print(f"burst: {outcome.summary()}; cancelled by the client: {outcome.cancelled_by_client}")


def _health_states(address: str, roots: bytes, states: list[str], stop: threading.Event) -> None:
    """Record the health states a Watch stream sees until it breaks."""
    with bootstrap_channel_for(address, roots) as channel:
        try:
            for reply in health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60
            ):
                states.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                if stop.is_set():
                    return
        except grpc.RpcError as exc:
            states.append(exc.code().name)


def _until(what: str, call: Callable[[], object], timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (grpc.RpcError, Exception):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}") from None
            time.sleep(0.2)


@pytest.mark.timeout(180)
def test_a_dead_commit_thread_takes_its_worker_down_and_a_fresh_one_serves(
    tmp_path: Path,
) -> None:
    config = tmp_path / "fault.toml"
    config.write_text("[testing]\ncommit_thread_dies_after = 2\n")
    server = ServerProcess(tmp_path / "data", "--workers", "1", "--config", str(config))
    try:
        credential = load_credential(server.data_dir / "admin")
        roots = credential.root_certificates_pem
        boot = json.loads((server.data_dir / "admin" / "endpoint.json").read_text())[
            "bootstrap_listen"
        ]
        with KeyplaneClient.connect(server.listen, credential) as admin:
            token = admin.create_enrollment_token(uses=10).token
        states: list[str] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_health_states, args=(boot, roots, states, stop))
        watcher.start()
        wait_until("the health watch", lambda: states == ["SERVING"], 10)
        with KeyplaneClient(bootstrap_channel_for(boot, roots), timeout=10) as client:
            client.enroll(make_csr(p256(), cn="one"), token)
            client.enroll(make_csr(p256(), cn="two"), token)
            # The third batch kills the thread: the caller is told at once.
            with pytest.raises(Exception) as caught:
                client.enroll(make_csr(p256(), cn="three"), token)
            assert "UNAVAILABLE" in str(caught.value)
        watcher.join(timeout=30)
        assert states[:2] == ["SERVING", "NOT_SERVING"], states
        wait_until(
            "the log line",
            lambda: (
                "its group-commit thread stopped" in server.output()
                and "restarting it" in server.output()
            ),
            30,
        )
        # A fresh worker serves writes again.
        with KeyplaneClient(bootstrap_channel_for(boot, roots), timeout=10) as client:
            _until("a fresh worker", lambda: client.enroll(make_csr(p256(), cn="four"), token))
        assert _serving(boot, roots)
        with sqlite3.connect(server.data_dir / "keyplane.db") as db:
            left = db.execute(
                "SELECT uses_left FROM enrollment_tokens WHERE token_hash = ?", (_hash(token),)
            ).fetchone()[0]
            recorded = db.execute(
                "SELECT count(*) FROM certificates WHERE token_hash = ?", (_hash(token),)
            ).fetchone()[0]
        # "three" was never recorded nor spent.
        assert (10 - left, recorded) == (3, 3)
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_a_dead_report_writer_takes_its_zone_worker_down_and_a_fresh_one_serves(
    tmp_path: Path,
) -> None:
    server = ServerProcess(tmp_path / "server")
    zone: Process | None = None
    try:
        data = server.data_dir
        zone_token = run_cli(
            "tokens", "create", "--role", "zone-server", data_dir=data, check=True
        ).stdout.strip()
        run_cli("bundle", "download", "--out", str(tmp_path / "b0.dat"), data_dir=data, check=True)
        config = tmp_path / "zone.toml"
        config.write_text("[testing]\nreport_writer_dies_after = 1\n")
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
            "1",
            "--config",
            str(config),
        )
        wait_until("the zone server", lambda: "listening on" in zone.output(), 60)  # type: ignore[union-attr]
        run_cli("bundle", "download", "--out", str(tmp_path / "b1.dat"), data_dir=data, check=True)
        bundle = load_bundle((tmp_path / "b1.dat").read_bytes())
        endpoint = bundle.enrollment_endpoint()
        roots = bundle.roots_pem()
        token = json.loads(
            run_cli("tokens", "create", "--uses", "4", "--json", data_dir=data, check=True).stdout
        )["token"]
        with KeyplaneClient(bootstrap_channel_for(endpoint.bootstrap_listen, roots)) as client:
            key = p256()
            issued = client.enroll(make_csr(key, cn="m"), token)
            csr = make_csr(p256(), cn="m")
            proof, made = _proof(key, issued.certificate_chain_pem, csr, "zone1")
            client.renew_with_proof(csr, issued.certificate_chain_pem, proof, made)
            # The second report batch kills the writer: the caller is told at once.
            key2 = p256()
            issued2 = client.enroll(make_csr(key2, cn="n"), token)
            csr = make_csr(p256(), cn="n")
            proof, made = _proof(key2, issued2.certificate_chain_pem, csr, "zone1")
            with pytest.raises(Exception) as caught:
                client.renew_with_proof(csr, issued2.certificate_chain_pem, proof, made)
            assert "UNAVAILABLE" in str(caught.value)
        wait_until(
            "the zone's log line",
            lambda: (
                "its report writer thread stopped" in zone.output()  # type: ignore[union-attr]
                and "restarting it" in zone.output()
            ),  # type: ignore[union-attr]
            30,
        )
        with KeyplaneClient(
            bootstrap_channel_for(endpoint.bootstrap_listen, roots), timeout=10
        ) as client:
            csr = make_csr(p256(), cn="n")
            _until(
                "a fresh zone worker",
                lambda: client.renew_with_proof(
                    csr,
                    issued2.certificate_chain_pem,
                    *_proof(key2, issued2.certificate_chain_pem, csr, "zone1"),
                ),
            )
        assert _serving(endpoint.bootstrap_listen, roots)
    finally:
        if zone is not None:
            zone.stop()
        server.stop()
