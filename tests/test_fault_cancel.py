"""Every RPC given up at random moments: the reads, the signatures, the response streams
(CreateBackup, WatchTrustState, health Watch) and the writes that tests/test_cancellation.py
leaves out, in one burst of over 1,000 calls (`make test-long`: ten times that) against a
real `keyplane serve`, each with a deadline of 1 to 100 ms and a quarter cancelled by
the client before it (the TrustService's in tests/test_fault_trust.py). Then every
invariant holds with what was acknowledged, the server answers every RPC at once, and
nothing was an internal error. A table check keeps the bursts covering every RPC the
server serves."""

from __future__ import annotations

import datetime
import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyplane.clients.client import CHANNEL_OPTIONS, bootstrap_channel_for
from keyplane.clients.credentials import load_credential
from keyplane.server.auth import ACCESS
from keyplane.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    backup_service_pb2,
    backup_service_pb2_grpc,
    bundle_service_pb2,
    bundle_service_pb2_grpc,
    certificate_service_pb2,
    certificate_service_pb2_grpc,
    console_service_pb2,
    console_service_pb2_grpc,
    identity_service_pb2,
    identity_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    message_signing_service_pb2,
    message_signing_service_pb2_grpc,
    root_key_service_pb2,
    root_key_service_pb2_grpc,
    settings_service_pb2,
    settings_service_pb2_grpc,
    status_service_pb2,
    status_service_pb2_grpc,
    trust_state_service_pb2,
    trust_state_service_pb2_grpc,
    zone_service_pb2,
    zone_service_pb2_grpc,
)
from tests.bursts import Call, fire
from tests.faultkit import SHORT_RUNS, fault_runs
from tests.invariants import Acknowledged, check_invariants
from tests.serverkit import ServerProcess
from tests.test_cancellation import SERVER_BURST, _quiet
from tests.test_enrollment import make_csr, p256
from tests.test_fault_trust import TRUST_BURST
from tests.test_fleet import wait_until
from tests.zonekit import enroll_fake_zone

SCALE = fault_runs() // SHORT_RUNS
# Calls per RPC in the burst (over 1,000 in all); the writes among them revoke or
# create what the set-up made for them.
BURST = {
    "ListRootKeys": 60, "GetRootKey": 40, "GetLegacyRootKey": 30, "ListKeys": 60,
    "ListSettings": 40, "GetSetting": 40, "GetInitBundle": 50, "GetLegacyPublicKey": 30,
    "ListCertificates": 60, "ListEnrollmentTokens": 40, "ListAuditEvents": 60,
    "VerifyAuditLog": 20, "ListZoneServers": 30, "GetZoneServer": 30, "VerifyBackup": 30,
    "GetTrustState": 60, "WatchTrustState": 80, "ListIdentities": 30, "SignMessage": 80,
    "SignMessages": 40, "CreateBackup": 12, "CreateIdentity": 30, "RevokeIdentity": 20,
    "RevokeEnrollmentToken": 30, "RevokeZoneServer": 6, "RevokeRootKey": 3,
    "Check": 20, "Watch": 20, "GetServerStatus": 20, "GetRootCoverage": 20,
    "GetRotationForecast": 10, "CreateSignInLink": 10, "ListZoneRevocations": 20,
    "PublishZoneCrl": 20,
}  # fmt: skip
BURST = {rpc: n * SCALE for rpc, n in BURST.items()}
# Served only by a locked server (tests/test_locked_start.py), or by its health service.
ELSEWHERE = {"Unlock", "List", "ServerReflectionInfo"}
# What a call given up, or racing another for the same thing, may end with.
EXPECTED = {
    "OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "NOT_FOUND",
    "FAILED_PRECONDITION", "ALREADY_EXISTS",
}  # fmt: skip


def test_the_two_bursts_cover_every_rpc() -> None:
    served = {method.rsplit("/", 1)[1] for method in ACCESS}
    covered = set(BURST) | set(SERVER_BURST) | set(TRUST_BURST) | ELSEWHERE
    covered |= {"Renew", "RenewWithProof"}  # in test_cancellation's bursts of holders
    assert served - covered == set(), "add the RPCs to a burst"


class _Stream:
    """A response stream as a future: result() reads it to its end."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def result(self) -> list[Any]:
        return list(self._call)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "data")
    try:
        yield server
    finally:
        assert server.stop() == 0


def _channels(data: Path, listen: str) -> tuple[grpc.Channel, grpc.Channel]:
    credential = load_credential(data / "admin")
    admin = grpc.secure_channel(
        listen,
        grpc.ssl_channel_credentials(
            root_certificates=credential.root_certificates_pem,
            private_key=credential.private_key_pem,
            certificate_chain=credential.certificate_chain_pem,
        ),
        options=CHANNEL_OPTIONS,
    )
    endpoint = json.loads((data / "admin" / "endpoint.json").read_text())
    boot = bootstrap_channel_for(endpoint["bootstrap_listen"], credential.root_certificates_pem)
    for channel in (admin, boot):
        grpc.channel_ready_future(channel).result(timeout=10)
    return admin, boot


def _calls(data: Path, admin: grpc.Channel, boot: grpc.Channel, acks: Acknowledged) -> list[Call]:
    """The burst's calls, after making what its writes need."""
    roots = root_key_service_pb2_grpc.RootKeyServiceStub(admin)
    keys = key_service_pb2_grpc.KeyServiceStub(admin)
    settings = settings_service_pb2_grpc.SettingsServiceStub(admin)
    bundles = bundle_service_pb2_grpc.BundleServiceStub(admin)
    certificates = certificate_service_pb2_grpc.CertificateServiceStub(admin)
    audit = audit_service_pb2_grpc.AuditServiceStub(admin)
    zones = zone_service_pb2_grpc.ZoneServiceStub(admin)
    backups = backup_service_pb2_grpc.BackupServiceStub(admin)
    trust = trust_state_service_pb2_grpc.TrustStateServiceStub(boot)
    identities = identity_service_pb2_grpc.IdentityServiceStub(admin)
    signing = message_signing_service_pb2_grpc.MessageSigningServiceStub(admin)
    health = health_pb2_grpc.HealthStub(boot)
    status = status_service_pb2_grpc.StatusServiceStub(admin)
    console = console_service_pb2_grpc.ConsoleServiceStub(admin)

    old_root = roots.ListRootKeys(root_key_service_pb2.ListRootKeysRequest(), timeout=10)
    old = old_root.active[0].fingerprint
    acks.keys.add(roots.CreateRootKey(root_key_service_pb2.CreateRootKeyRequest(), timeout=30)
                  .root_key.fingerprint)  # fmt: skip
    manifest = _manifest(backups)
    tokens = [
        certificates.CreateEnrollmentToken(
            certificate_service_pb2.CreateEnrollmentTokenRequest(uses=1), timeout=10
        ).token_id
        for _ in range(BURST["RevokeEnrollmentToken"])
    ]
    people = [f"person-{i}" for i in range(BURST["RevokeIdentity"])]
    for name in people:
        identities.CreateIdentity(_identity(name), timeout=10)
    zone_token = certificates.CreateEnrollmentToken(
        certificate_service_pb2.CreateEnrollmentTokenRequest(
            uses=BURST["RevokeZoneServer"] + 1, role="zone-server"
        ),
        timeout=10,
    ).token
    endpoint = json.loads((data / "admin" / "endpoint.json").read_text())
    ca = (data / "admin" / "ca.pem").read_bytes()
    zone_names = [f"cz-{i}" for i in range(BURST["RevokeZoneServer"])]
    for i, name in enumerate(zone_names):
        enroll_fake_zone(
            endpoint["bootstrap_listen"], ca, zone_token, name=name,
            listen=f"127.0.1.{i + 1}:7443", bootstrap_listen=f"127.0.1.{i + 1}:7444",
        )  # fmt: skip

    # One zone stays, for the zone server's own calls (its CRL, what it must list).
    crl_zone = enroll_fake_zone(
        endpoint["bootstrap_listen"], ca, zone_token, name="cz-crl",
        listen="127.0.2.1:7443", bootstrap_listen="127.0.2.1:7444",
    )  # fmt: skip
    own = zone_service_pb2_grpc.ZoneServiceStub(crl_zone.channel(endpoint["listen"], ca))
    crls = [_zone_crl(crl_zone, i + 1) for i in range(BURST["PublishZoneCrl"])]

    def unary(rpc: str, method: Any, make: Callable[[int], Any], ack: Any = None) -> list[Call]:
        return [_unary(rpc, method, make(i), ack) for i in range(BURST[rpc])]

    def stream(rpc: str, method: Any, make: Callable[[int], Any]) -> list[Call]:
        return [_stream(rpc, method, make(i)) for i in range(BURST[rpc])]

    rk, kp, sp, ce = (
        root_key_service_pb2,
        key_service_pb2,
        settings_service_pb2,
        certificate_service_pb2,
    )
    calls = [
        *unary("ListRootKeys", roots.ListRootKeys, lambda i: rk.ListRootKeysRequest()),
        *unary("GetRootKey", roots.GetRootKey, lambda i: rk.GetRootKeyRequest(fingerprint=old)),
        *unary("GetLegacyRootKey", roots.GetLegacyRootKey, lambda i: rk.GetLegacyRootKeyRequest()),
        *unary("ListKeys", keys.ListKeys, lambda i: kp.ListKeysRequest()),
        *unary("ListSettings", settings.ListSettings, lambda i: sp.ListSettingsRequest()),
        *unary("GetSetting", settings.GetSetting,
               lambda i: sp.GetSettingRequest(name="PKIClientTLSKeyValidityHours")),
        *unary("GetInitBundle", bundles.GetInitBundle,
               lambda i: bundle_service_pb2.GetInitBundleRequest()),
        *unary("GetLegacyPublicKey", bundles.GetLegacyPublicKey,
               lambda i: bundle_service_pb2.GetLegacyPublicKeyRequest()),
        *unary("ListCertificates", certificates.ListCertificates,
               lambda i: ce.ListCertificatesRequest()),
        *unary("ListEnrollmentTokens", certificates.ListEnrollmentTokens,
               lambda i: ce.ListEnrollmentTokensRequest()),
        *unary("ListAuditEvents", audit.ListAuditEvents,
               lambda i: audit_service_pb2.ListAuditEventsRequest()),
        *unary("VerifyAuditLog", audit.VerifyAuditLog,
               lambda i: audit_service_pb2.VerifyAuditLogRequest()),
        *unary("ListZoneServers", zones.ListZoneServers,
               lambda i: zone_service_pb2.ListZoneServersRequest()),
        *unary("GetZoneServer", zones.GetZoneServer,
               lambda i: zone_service_pb2.GetZoneServerRequest(name=zone_names[0])),
        *unary("VerifyBackup", backups.VerifyBackup,
               lambda i: backup_service_pb2.VerifyBackupRequest(manifest=manifest)),
        *unary("GetTrustState", trust.GetTrustState,
               lambda i: trust_state_service_pb2.GetTrustStateRequest(since_version=i % 4)),
        *unary("ListIdentities", identities.ListIdentities,
               lambda i: identity_service_pb2.ListIdentitiesRequest()),
        *unary("SignMessage", signing.SignMessage,
               lambda i: message_signing_service_pb2.SignMessageRequest(payload=b"m%d" % i)),
        *unary("SignMessages", signing.SignMessages,
               lambda i: message_signing_service_pb2.SignMessagesRequest(
                   payloads=[b"p%d" % j for j in range(8)])),
        *unary("CreateIdentity", identities.CreateIdentity, lambda i: _identity(f"new-{i}")),
        *unary("Check", health.Check, lambda i: health_pb2.HealthCheckRequest()),
        *unary("GetServerStatus", status.GetServerStatus,
               lambda i: status_service_pb2.GetServerStatusRequest(expiries=i % 10)),
        *unary("GetRootCoverage", roots.GetRootCoverage, lambda i: rk.GetRootCoverageRequest()),
        *unary("GetRotationForecast", keys.GetRotationForecast,
               lambda i: kp.GetRotationForecastRequest(hours=24)),
        *unary("CreateSignInLink", console.CreateSignInLink,
               lambda i: console_service_pb2.CreateSignInLinkRequest()),
        *unary("ListZoneRevocations", own.ListZoneRevocations,
               lambda i: zone_service_pb2.ListZoneRevocationsRequest()),
        *unary("PublishZoneCrl", own.PublishZoneCrl,
               lambda i: zone_service_pb2.PublishZoneCrlRequest(crl_der=crls[i])),
        *stream("CreateBackup", backups.CreateBackup,
                lambda i: backup_service_pb2.CreateBackupRequest()),
        *stream("WatchTrustState", trust.WatchTrustState,
                lambda i: trust_state_service_pb2.WatchTrustStateRequest(since_version=i % 4)),
        *stream("Watch", health.Watch, lambda i: health_pb2.HealthCheckRequest()),
    ]  # fmt: skip
    for token_id in tokens:
        calls.append(_unary(
            "RevokeEnrollmentToken", certificates.RevokeEnrollmentToken,
            ce.RevokeEnrollmentTokenRequest(token_id=token_id),
            lambda r, k=token_id: acks.revoked_tokens.add(k),
        ))  # fmt: skip
    for name in people:
        calls.append(_unary(
            "RevokeIdentity", identities.RevokeIdentity,
            identity_service_pb2.RevokeIdentityRequest(name=name, reason="burst", confirm=True),
        ))  # fmt: skip
    for name in zone_names:
        calls.append(_unary(
            "RevokeZoneServer", zones.RevokeZoneServer,
            zone_service_pb2.RevokeZoneServerRequest(name=name, reason="burst", confirm=True),
            lambda r, n=name: acks.revoked_zones.add(n),
        ))  # fmt: skip
    return calls


def _zone_crl(zone: Any, number: int) -> bytes:
    """An empty CRL the zone's intermediate signs, with CRL number `number`."""
    now = datetime.datetime.now(datetime.UTC)
    issuer = zone.intermediate
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - datetime.timedelta(minutes=1))
        .next_update(now + datetime.timedelta(hours=12))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),
            critical=False,
        )
        .sign(zone.intermediate_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def _unary(rpc: str, method: Any, request: Any, ack: Any = None) -> Call:
    return Call(rpc, lambda t: method.future(request, timeout=t), ack)


def _stream(rpc: str, method: Any, request: Any) -> Call:
    return Call(rpc, lambda t: _Stream(method(request, timeout=t)))


def _root_revocations(admin: grpc.Channel, acks: Acknowledged) -> list[Call]:
    """Revocations of the first root racing each other (one wins), given up like the
    rest: apart from the main burst, as the admin's credential goes with that root."""
    roots = root_key_service_pb2_grpc.RootKeyServiceStub(admin)
    listed = roots.ListRootKeys(root_key_service_pb2.ListRootKeysRequest(), timeout=10)
    old = min(listed.active, key=lambda r: r.number).fingerprint
    request = root_key_service_pb2.RevokeRootKeyRequest(
        fingerprint=old, reason="burst", confirm=True
    )
    return [
        _unary("RevokeRootKey", roots.RevokeRootKey, request,
               lambda r: acks.revoked_keys.add(r.root_key.fingerprint))
        for _ in range(BURST["RevokeRootKey"])
    ]  # fmt: skip


def _identity(name: str) -> identity_service_pb2.CreateIdentityRequest:
    return identity_service_pb2.CreateIdentityRequest(
        name=name, role=identity_service_pb2.IDENTITY_ROLE_AUDITOR, csr=make_csr(p256(), cn=name)
    )


def _manifest(backups: Any) -> bytes:
    from keyplane.clients import backup_archive

    archive = b"".join(
        m.chunk for m in backups.CreateBackup(backup_service_pb2.CreateBackupRequest(), timeout=60)
    )
    path = Path(f"/tmp/keyplane-cancel-{random.getrandbits(32):08x}.tar")
    try:
        path.write_bytes(archive)
        return backup_archive.check_archive(path).manifest_bytes
    finally:
        path.unlink()


def _answers_at_once(admin: grpc.Channel, boot: grpc.Channel) -> None:
    """One call of each kind after the burst, each answered well within 10 s."""
    signing = message_signing_service_pb2_grpc.MessageSigningServiceStub(admin)
    assert signing.SignMessage(
        message_signing_service_pb2.SignMessageRequest(payload=b"after"), timeout=10
    ).signed_message.signature
    certificates = certificate_service_pb2_grpc.CertificateServiceStub(admin)
    certificates.CreateEnrollmentToken(
        certificate_service_pb2.CreateEnrollmentTokenRequest(uses=1), timeout=10
    )
    backups = backup_service_pb2_grpc.BackupServiceStub(admin)
    assert b"".join(
        m.chunk for m in backups.CreateBackup(backup_service_pb2.CreateBackupRequest(), timeout=10)
    )
    trust = trust_state_service_pb2_grpc.TrustStateServiceStub(boot)
    watch = trust.WatchTrustState(trust_state_service_pb2.WatchTrustStateRequest(), timeout=10)
    assert next(iter(watch)).versions
    watch.cancel()
    reply = health_pb2_grpc.HealthStub(boot).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.timeout(240 * SCALE)
def test_every_rpc_given_up_at_random_moments_leaves_the_server_whole(
    served: ServerProcess,
) -> None:
    data = served.data_dir
    acks = Acknowledged()
    admin, boot = _channels(data, served.listen)
    try:
        calls = _calls(data, admin, boot, acks)
        assert len(calls) >= 1000 * SCALE
        started = time.monotonic()
        outcome = fire(calls, seed=77)
        print(
            f"burst of {len(calls)} in {time.monotonic() - started:.1f} s: {outcome.summary()}; "
            f"cancelled by the client: {outcome.cancelled_by_client}"
        )
        assert outcome.total() == len(calls)
        unexpected = {
            rpc: {c: n for c, n in codes.items() if c not in EXPECTED}
            for rpc, codes in outcome.codes.items()
        }
        assert not any(unexpected.values()), unexpected
        _quiet(_Deployment(data))
        # Backups given up go on to their end (each then removes its work dir): at rest.
        wait_until("the backups given up to end", lambda: not list(data.glob(".backup-*")), 60)
        _answers_at_once(admin, boot)
        check_invariants(data, acknowledged=acks)
        revocations = fire(_root_revocations(admin, acks), seed=78)
        print(f"root revocations: {revocations.summary()}")
        _quiet(_Deployment(data))
    finally:
        admin.close()
        boot.close()
    # The admin's credential as the server holds it now (reissued if its root went).
    admin, boot = _channels(data, served.listen)
    try:
        _answers_at_once(admin, boot)
        check_invariants(data, acknowledged=acks)
    finally:
        admin.close()
        boot.close()
    assert "internal error" not in served.output() and "Traceback" not in served.output()


class _Deployment:
    """What test_cancellation._quiet reads: the state DB."""

    def __init__(self, data: Path) -> None:
        self.data = data

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data / 'keyplane.db'}?mode=ro", uri=True)
