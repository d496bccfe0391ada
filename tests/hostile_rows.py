"""The rows of the hostile-input matrix (tests/test_hostile_input.py runs them): per RPC,
what is sent, by whom, and the status it must get. One line a row."""

# ruff: noqa: E501
from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.renewal import renewal_proof
from keyplane.v1 import audit_service_pb2 as audit_pb
from keyplane.v1 import backup_service_pb2 as backup_pb
from keyplane.v1 import certificate_service_pb2 as cert_pb
from keyplane.v1 import enrollment_service_pb2 as enroll_pb
from keyplane.v1 import (
    identity_service_pb2,
    key_service_pb2,
    message_signing_service_pb2,
    root_key_service_pb2,
    settings_service_pb2,
    status_service_pb2,
    trust_service_pb2,
    trust_state_service_pb2,
    zone_service_pb2,
)
from keyplane.v1 import trust_state_pb2 as ts_pb
from tests.hostile_kit import bad_encodings, csr_der, peer_message, weak_csrs, with_san_twice
from tests.serverkit import FQDN, RunningServer
from tests.sigkit import high_s
from tests.test_enrollment import make_csr, p256
from tests.zonekit import FakeZone

HEALTH = "grpc.health.v1.Health"
MiB = 1024 * 1024


@dataclass
class World:
    """One server and what the rows need of it: callers of each kind, a token with uses
    left, an enrolled agent, a zone, a revoked certificate, a renewal that went through."""

    server: RunningServer
    channels: dict[str, grpc.Channel]
    token: str
    zone_token: str
    agent_key: ec.EllipticCurvePrivateKey
    agent_chain: str
    agent_serial: str
    enrolled_csr: bytes
    revoked_serial: str
    renewed: enroll_pb.RenewWithProofRequest
    mover_key: ec.EllipticCurvePrivateKey
    mover_chain: str
    zone: FakeZone
    root: str
    people_serial: str

    @property
    def data(self) -> Path:
        return self.server.config.data_dir


S = "/keyplane.v1."
Build = Callable[[World], object]


@dataclass(frozen=True)
class Row:
    method: str  # Service/Method
    what: str
    build: Build
    code: str
    says: str = ""  # a phrase the message must hold
    caller: str | None = None

    @property
    def path(self) -> str:
        return S + self.method if not self.method.startswith(HEALTH) else f"/{self.method}"

    def __str__(self) -> str:
        return f"{self.method}: {self.what}"


UNKNOWN_FP = "ab" * 32
UNKNOWN_SERIAL = "0123456789abcdef0123456789abcdef"
GOOD = csr_der(ec.generate_private_key(ec.SECP256R1()), cn="fresh")


def _enroll(csr: bytes, token: Callable[[World], str] = lambda w: w.token) -> Build:
    return lambda w: enroll_pb.EnrollRequest(csr=csr, token=token(w))


def _csr_rows() -> list[Row]:
    """Every damaged encoding and weak key, at every RPC that takes a CSR."""
    rows = []
    encodings = bad_encodings(GOOD)
    cases = {**encodings, **weak_csrs()}
    for what, csr in cases.items():
        says = {"empty": "empty", "oversized": "bytes"}.get(
            what, "CSR" if what in encodings else ""
        )
        rows += [
            Row("EnrollmentService/Enroll", what, _enroll(csr), "INVALID_ARGUMENT", says),
            Row(
                "EnrollmentService/EnrollBatch",
                what,
                lambda w, c=csr: enroll_pb.EnrollBatchRequest(csrs=[GOOD, c], token=w.token),
                "INVALID_ARGUMENT",
                "csrs[1]",
            ),
            Row(
                "EnrollmentService/Renew",
                what,
                lambda w, c=csr: enroll_pb.RenewRequest(csr=c),
                "INVALID_ARGUMENT",
            ),
            Row(
                "IdentityService/CreateIdentity",
                what,
                lambda w, c=csr: identity_service_pb2.CreateIdentityRequest(
                    name="hostile", role=identity_service_pb2.IDENTITY_ROLE_ADMIN, csr=c
                ),
                "INVALID_ARGUMENT",
            ),
            Row(
                "ZoneService/EnrollZoneServer",
                what,
                lambda w, c=csr: zone_service_pb2.EnrollZoneServerRequest(
                    token=w.zone_token,
                    intermediate_csr=c,
                    tls_csr=csr_der(p256(), cn="zone-x"),
                    name="zone-x",
                    listen="10.1.1.1:7443",
                    bootstrap_listen="10.1.1.1:7444",
                ),
                "INVALID_ARGUMENT",
            ),
            Row(
                "ZoneService/RenewZoneServer",
                what,
                lambda w, c=csr: zone_service_pb2.RenewZoneServerRequest(
                    intermediate_csr=csr_der(p256(), cn="zone-h"), tls_csr=c
                ),
                "INVALID_ARGUMENT",
            ),
        ]
    return rows


def _renew_with_proof(
    w: World,
    key: ec.EllipticCurvePrivateKey | None = None,
    chain: str | None = None,
    **changes: Any,
) -> enroll_pb.RenewWithProofRequest:
    """A well-formed RenewWithProof (by the agent, unless `key` and `chain` say whose),
    with `changes` made after signing."""
    key, chain = key or w.agent_key, chain or w.agent_chain
    leaf = x509.load_pem_x509_certificate(chain.encode())
    name = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    csr = make_csr(p256(), cn=str(name))
    proof, made = renewal_proof(key, leaf, csr, changes.pop("audience", FQDN))
    request = enroll_pb.RenewWithProofRequest(
        csr=csr, certificate_chain_pem=chain, proof=proof, proof_time=made
    )
    for name, value in changes.items():
        setattr(request, name, value(request) if callable(value) else value)
    return request


def _high_s_twin(request: enroll_pb.RenewWithProofRequest) -> enroll_pb.RenewWithProofRequest:
    """The same request with the proof's other valid ECDSA form, (r, n - s)."""
    twin = enroll_pb.RenewWithProofRequest()
    twin.CopyFrom(request)
    twin.proof = high_s(request.proof, "secp256r1")
    return twin


def _self_made_chain() -> str:
    key = p256()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "agent-h")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _zone_report(der: bytes, component: str = "agent") -> Build:
    return lambda w: zone_service_pb2.ReportIssuedCertificatesRequest(
        certificates=[
            zone_service_pb2.IssuedCertificateReport(certificate_der=der, component=component)
        ]
    )


def _minted(w: World, roles: list[str] | None = None) -> bytes:
    cert, _ = w.zone.mint("minted", roles or [])
    return cert.public_bytes(serialization.Encoding.DER)


def _san_twice(w: World) -> bytes:
    cert, _ = w.zone.mint("minted", [])
    return with_san_twice(cert, w.zone.intermediate_key)


def _revoke_root(**fields: Any) -> Build:
    return lambda w: root_key_service_pb2.RevokeRootKeyRequest(
        **{"fingerprint": w.root, "reason": "x", "confirm": True, **fields}
    )


def _peer(rpc: str, kind: int, **options: Any) -> Build:
    """A TrustService call carrying a made-up peer's message (to this server unless
    `recipient` says otherwise)."""
    request = getattr(trust_service_pb2, f"{rpc}Request")
    recipient = options.pop("recipient", FQDN)
    return lambda w: request(message=peer_message(kind, recipient, **options))


OFFER, REVEAL, DECISION, END = (
    trust_service_pb2.PEER_MESSAGE_KIND_OFFER,
    trust_service_pb2.PEER_MESSAGE_KIND_REVEAL,
    trust_service_pb2.PEER_MESSAGE_KIND_DECISION,
    trust_service_pb2.PEER_MESSAGE_KIND_END,
)
AN_HOUR_AGO = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)


def _push(sender: str, versions: list[ts_pb.SignedTrustState]) -> Build:
    return lambda w: trust_service_pb2.PushTrustStateRequest(sender_fqdn=sender, versions=versions)


def _health(service: str) -> object:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest(service=service)


# Garbage protobuf, for every served method: a field 1 whose length runs past the end.

# fmt: off
ROWS: list[Row] = [
    Row('RootKeyService/CreateRootKey', 'an unknown algorithm', lambda w: root_key_service_pb2.CreateRootKeyRequest(algorithm=99), 'INVALID_ARGUMENT', 'algorithm'),
    Row('RootKeyService/GetRootKey', 'no fingerprint', lambda w: root_key_service_pb2.GetRootKeyRequest(), 'INVALID_ARGUMENT', 'fingerprint'),
    Row('RootKeyService/GetRootKey', 'not hex', lambda w: root_key_service_pb2.GetRootKeyRequest(fingerprint='zz' * 32), 'INVALID_ARGUMENT'),
    Row('RootKeyService/GetRootKey', 'an unknown fingerprint', lambda w: root_key_service_pb2.GetRootKeyRequest(fingerprint=UNKNOWN_FP), 'NOT_FOUND'),
    Row('RootKeyService/GetRootKey', 'an oversized fingerprint', lambda w: root_key_service_pb2.GetRootKeyRequest(fingerprint='a' * MiB), 'INVALID_ARGUMENT'),
    Row('RootKeyService/RevokeRootKey', 'an unknown fingerprint', _revoke_root(fingerprint=UNKNOWN_FP), 'NOT_FOUND'),
    Row('RootKeyService/RevokeRootKey', 'no reason', _revoke_root(reason=''), 'INVALID_ARGUMENT', 'reason'),
    Row('RootKeyService/RevokeRootKey', 'a reason with a line break', _revoke_root(reason='a\nb'), 'INVALID_ARGUMENT', 'control'),
    Row('RootKeyService/RevokeRootKey', 'an oversized reason', _revoke_root(reason='r' * 5000), 'INVALID_ARGUMENT', 'longer'),
    Row('RootKeyService/RevokeRootKey', 'no confirmation', _revoke_root(confirm=False), 'FAILED_PRECONDITION', 'confirm'),
    Row('RootKeyService/RevokeRootKey', 'the only active root', _revoke_root(), 'FAILED_PRECONDITION', 'only active root'),
    Row('RootKeyService/GetRootCoverage', 'a huge straggler limit', lambda w: root_key_service_pb2.GetRootCoverageRequest(straggler_limit=2 ** 32 - 1), 'INVALID_ARGUMENT', 'straggler'),
    Row('KeyService/GetRotationForecast', 'a forecast past 720 hours', lambda w: key_service_pb2.GetRotationForecastRequest(hours=10 ** 6), 'INVALID_ARGUMENT', '720'),
    Row('StatusService/GetServerStatus', 'more expiries than it lists', lambda w: status_service_pb2.GetServerStatusRequest(expiries=10 ** 6), 'INVALID_ARGUMENT', '100'),
    Row('StatusService/GetServerStatus', 'a negative count of expiries', lambda w: status_service_pb2.GetServerStatusRequest(expiries=-1), 'INVALID_ARGUMENT'),
    Row('ZoneService/PublishZoneCrl', 'garbage DER', lambda w: zone_service_pb2.PublishZoneCrlRequest(crl_der=b'0\x03\x02\x01\x01'), 'INVALID_ARGUMENT', caller='zone'),
    Row('ZoneService/PublishZoneCrl', 'no CRL', lambda w: zone_service_pb2.PublishZoneCrlRequest(), 'INVALID_ARGUMENT', caller='zone'),
    Row('ZoneService/PublishZoneCrl', 'an oversized CRL', lambda w: zone_service_pb2.PublishZoneCrlRequest(crl_der=b'0' * (2 * MiB)), 'INVALID_ARGUMENT', caller='zone'),
    Row('KeyService/ListKeys', 'an unknown kind', lambda w: key_service_pb2.ListKeysRequest(kind=99), 'INVALID_ARGUMENT'),
    Row('KeyService/RotateKey', 'no kind', lambda w: key_service_pb2.RotateKeyRequest(), 'INVALID_ARGUMENT', 'kind'),
    Row('KeyService/RotateKey', 'an unknown kind', lambda w: key_service_pb2.RotateKeyRequest(kind=99), 'INVALID_ARGUMENT'),
    Row('SettingsService/GetSetting', 'no name', lambda w: settings_service_pb2.GetSettingRequest(), 'INVALID_ARGUMENT'),
    Row('SettingsService/GetSetting', 'an unknown name', lambda w: settings_service_pb2.GetSettingRequest(name='NoSuchSetting'), 'INVALID_ARGUMENT', 'NoSuchSetting'),
    Row('SettingsService/UpdateSetting', 'an unknown name', lambda w: settings_service_pb2.UpdateSettingRequest(name='NoSuchSetting', value='1'), 'INVALID_ARGUMENT'),
    Row('SettingsService/UpdateSetting', 'not a number', lambda w: settings_service_pb2.UpdateSettingRequest(name='PKIClientTLSKeyValidityHours', value='seven'), 'INVALID_ARGUMENT'),
    Row('SettingsService/UpdateSetting', 'a negative number', lambda w: settings_service_pb2.UpdateSettingRequest(name='PKIClientTLSKeyValidityHours', value='-5'), 'INVALID_ARGUMENT'),
    Row('SettingsService/UpdateSetting', 'a huge number', lambda w: settings_service_pb2.UpdateSettingRequest(name='PKIClientTLSKeyValidityHours', value='9' * 400), 'INVALID_ARGUMENT'),
    Row('SettingsService/UpdateSetting', 'a window past its validity', lambda w: settings_service_pb2.UpdateSettingRequest(name='PKIClientTLSKeyRenewalWindowHours', value='200'), 'INVALID_ARGUMENT'),
    Row('SettingsService/UpdateSetting', 'not a boolean', lambda w: settings_service_pb2.UpdateSettingRequest(name='OpenEnrollment', value='maybe'), 'INVALID_ARGUMENT'),
    Row('SettingsService/UpdateSetting', 'an oversized value', lambda w: settings_service_pb2.UpdateSettingRequest(name='OpenEnrollment', value='t' * MiB), 'INVALID_ARGUMENT'),
    Row('SettingsService/UpdateSetting', 'a password without a password file', lambda w: settings_service_pb2.UpdateSettingRequest(name='PKIDatabasePassword', value='a long enough password'), 'FAILED_PRECONDITION', 'password_file'),
    Row('SettingsService/UpdateSetting', 'a short password', lambda w: settings_service_pb2.UpdateSettingRequest(name='PKIDatabasePassword', value='short'), 'INVALID_ARGUMENT'),
    Row('MessageSigningService/SignMessage', 'an oversized payload', lambda w: message_signing_service_pb2.SignMessageRequest(payload=b'x' * (4 * MiB + 1)), 'INVALID_ARGUMENT', '4 MiB'),
    Row('MessageSigningService/SignMessage', 'a message past the wire limit', lambda w: message_signing_service_pb2.SignMessageRequest(payload=b'x' * (5 * MiB)), 'RESOURCE_EXHAUSTED'),
    Row('MessageSigningService/SignMessages', 'no payload', lambda w: message_signing_service_pb2.SignMessagesRequest(), 'INVALID_ARGUMENT'),
    Row('MessageSigningService/SignMessages', 'too many payloads', lambda w: message_signing_service_pb2.SignMessagesRequest(payloads=[b'p'] * 1001), 'INVALID_ARGUMENT', '1000'),
    Row('MessageSigningService/SignMessages', 'too many bytes', lambda w: message_signing_service_pb2.SignMessagesRequest(payloads=[b'x' * MiB] * 4 + [b'x' * 10]), 'INVALID_ARGUMENT', '4 MiB'),
    Row('BundleService/GetLegacyPublicKey', 'while the legacy protocol is off', lambda w: b'', 'FAILED_PRECONDITION', 'EnableLegacyProtocol'),
    Row('CertificateService/ListCertificates', 'an unknown component', lambda w: cert_pb.ListCertificatesRequest(component='wizard'), 'INVALID_ARGUMENT'),
    Row('CertificateService/RevokeCertificate', 'no serial', lambda w: cert_pb.RevokeCertificateRequest(reason='x'), 'INVALID_ARGUMENT'),
    Row('CertificateService/RevokeCertificate', 'not hex', lambda w: cert_pb.RevokeCertificateRequest(serial='serial-1', reason='x'), 'INVALID_ARGUMENT'),
    Row('CertificateService/RevokeCertificate', 'an unknown serial', lambda w: cert_pb.RevokeCertificateRequest(serial=UNKNOWN_SERIAL, reason='x'), 'NOT_FOUND'),
    Row('CertificateService/RevokeCertificate', 'revoked already (a replay)', lambda w: cert_pb.RevokeCertificateRequest(serial=w.revoked_serial, reason='again'), 'FAILED_PRECONDITION', 'already'),
    Row('CertificateService/RevokeCertificate', 'an oversized reason', lambda w: cert_pb.RevokeCertificateRequest(serial=w.agent_serial, reason='r' * 5000), 'INVALID_ARGUMENT'),
    Row('CertificateService/RevokeCertificate', "a person's credential unconfirmed", lambda w: cert_pb.RevokeCertificateRequest(serial=w.people_serial, reason='x'), 'FAILED_PRECONDITION', 'confirm'),
    Row('CertificateService/CreateEnrollmentToken', 'too many uses', lambda w: cert_pb.CreateEnrollmentTokenRequest(uses=10 ** 9), 'INVALID_ARGUMENT', 'uses'),
    Row('CertificateService/CreateEnrollmentToken', 'a ttl past a year', lambda w: cert_pb.CreateEnrollmentTokenRequest(ttl_seconds=10 ** 12), 'INVALID_ARGUMENT', 'ttl'),
    Row('CertificateService/CreateEnrollmentToken', 'a role it cannot have', lambda w: cert_pb.CreateEnrollmentTokenRequest(role='admin'), 'INVALID_ARGUMENT'),
    Row('CertificateService/RevokeEnrollmentToken', 'no id', lambda w: cert_pb.RevokeEnrollmentTokenRequest(), 'INVALID_ARGUMENT'),
    Row('CertificateService/RevokeEnrollmentToken', 'an unknown id', lambda w: cert_pb.RevokeEnrollmentTokenRequest(token_id='0123456789abcdef'), 'NOT_FOUND'),
    Row('CertificateService/RevokeEnrollmentToken', 'an oversized id', lambda w: cert_pb.RevokeEnrollmentTokenRequest(token_id='a' * MiB), 'INVALID_ARGUMENT'),
    Row('CertificateService/ListEnrollmentTokens', 'a huge page size', lambda w: cert_pb.ListEnrollmentTokensRequest(page_size=2 ** 32 - 1), 'INVALID_ARGUMENT', 'page_size'),
    Row('AuditService/ListAuditEvents', 'a page token that is not one', lambda w: audit_pb.ListAuditEventsRequest(page_token='not-a-token'), 'INVALID_ARGUMENT'),
    Row('AuditService/ListAuditEvents', 'an oversized actor', lambda w: audit_pb.ListAuditEventsRequest(actor='a' * MiB), 'INVALID_ARGUMENT'),
    Row('EnrollmentService/Enroll', 'no token', _enroll(GOOD, lambda w: ''), 'UNAUTHENTICATED'),
    Row('EnrollmentService/Enroll', 'a wrong token', _enroll(GOOD, lambda w: 'kp-not-a-token'), 'UNAUTHENTICATED'),
    Row('EnrollmentService/Enroll', 'an oversized token', _enroll(GOOD, lambda w: 't' * MiB), 'UNAUTHENTICATED'),
    Row('EnrollmentService/Enroll', 'a zone-server token', _enroll(GOOD, lambda w: w.zone_token), 'UNAUTHENTICATED'),
    Row('EnrollmentService/Enroll', 'a key enrolled already (a replay)', lambda w: enroll_pb.EnrollRequest(csr=w.enrolled_csr, token=w.token), 'ALREADY_EXISTS'),
    Row('EnrollmentService/Enroll', 'two common names', _enroll(make_csr(p256(), cn='a', extra=[x509.NameAttribute(x509.NameOID.COMMON_NAME, 'b')])), 'INVALID_ARGUMENT', 'exactly one common name'),
    Row('EnrollmentService/Enroll', 'an IP address asked for', _enroll(make_csr(p256(), cn='a', san=[x509.IPAddress(ipaddress.ip_address('10.0.0.1'))])), 'INVALID_ARGUMENT', 'DNS names'),
    Row('EnrollmentService/Enroll', 'a role asked for', _enroll(make_csr(p256(), cn='a', san=[x509.UniformResourceIdentifier('urn:keyplane:role:admin')])), 'INVALID_ARGUMENT', 'DNS names'),
    Row('EnrollmentService/EnrollBatch', 'no CSR', lambda w: enroll_pb.EnrollBatchRequest(token=w.token), 'INVALID_ARGUMENT'),
    Row('EnrollmentService/EnrollBatch', 'too many CSRs', lambda w: enroll_pb.EnrollBatchRequest(csrs=[GOOD] * 1001, token=w.token), 'INVALID_ARGUMENT', '1000'),
    Row('EnrollmentService/EnrollBatch', 'one key twice', lambda w: enroll_pb.EnrollBatchRequest(csrs=[GOOD, GOOD], token=w.token), 'ALREADY_EXISTS', 'csrs[1]: this key is in the batch twice'),
    Row('EnrollmentService/EnrollBatch', 'more CSRs than uses left', lambda w: enroll_pb.EnrollBatchRequest(csrs=[csr_der(p256(), cn=f'n{i}') for i in range(60)], token=w.token), 'UNAUTHENTICATED', 'uses left'),
    Row('EnrollmentService/EnrollBatch', 'a wrong token', lambda w: enroll_pb.EnrollBatchRequest(csrs=[GOOD], token='kp-nope'), 'UNAUTHENTICATED'),
    Row('EnrollmentService/Renew', 'the current key again', lambda w: enroll_pb.RenewRequest(csr=w.enrolled_csr), 'INVALID_ARGUMENT', 'new key'),
    Row('EnrollmentService/Renew', 'another name', lambda w: enroll_pb.RenewRequest(csr=make_csr(p256(), cn='someone-else')), 'INVALID_ARGUMENT', 'common name'),
    Row('EnrollmentService/RenewWithProof', 'no chain', lambda w: _renew_with_proof(w, certificate_chain_pem=''), 'UNAUTHENTICATED'),
    Row('EnrollmentService/RenewWithProof', 'a chain that is not PEM', lambda w: _renew_with_proof(w, certificate_chain_pem='garbage'), 'INVALID_ARGUMENT'),
    Row('EnrollmentService/RenewWithProof', 'a truncated chain', lambda w: _renew_with_proof(w, certificate_chain_pem=lambda r: r.certificate_chain_pem[:300]), 'INVALID_ARGUMENT'),
    Row('EnrollmentService/RenewWithProof', 'an oversized chain', lambda w: _renew_with_proof(w, certificate_chain_pem=lambda r: r.certificate_chain_pem * 60), 'INVALID_ARGUMENT', 'bytes'),
    Row('EnrollmentService/RenewWithProof', 'a garbage proof', lambda w: _renew_with_proof(w, proof=b'0\x06\x02\x01\x01\x02\x01\x01'), 'UNAUTHENTICATED'),
    Row('EnrollmentService/RenewWithProof', 'no proof time', lambda w: _renew_with_proof(w, proof_time=0), 'UNAUTHENTICATED', 'time'),
    Row('EnrollmentService/RenewWithProof', 'a proof time past year 9999', lambda w: _renew_with_proof(w, proof_time=2 ** 62), 'UNAUTHENTICATED', 'time'),
    Row('EnrollmentService/RenewWithProof', 'a proof for another server', lambda w: _renew_with_proof(w, audience='zone-h'), 'UNAUTHENTICATED'),
    Row('EnrollmentService/RenewWithProof', 'a proof for another CSR', lambda w: _renew_with_proof(w, csr=make_csr(p256(), cn='agent-h')), 'UNAUTHENTICATED'),
    Row('EnrollmentService/RenewWithProof', 'a certificate from nowhere', lambda w: _renew_with_proof(w, certificate_chain_pem=_self_made_chain()), 'PERMISSION_DENIED', 'no record of issuing it'),
    Row('EnrollmentService/RenewWithProof', 'a recorded renewal replayed', lambda w: w.renewed, 'ALREADY_EXISTS', 'certified once'),
    Row('EnrollmentService/RenewWithProof', 'a recorded renewal replayed with its high-S twin', lambda w: _high_s_twin(w.renewed), 'ALREADY_EXISTS', 'certified once'),
    Row('EnrollmentService/RenewWithProof', 'a second renewal from a renewed certificate', lambda w: _renew_with_proof(w, key=w.mover_key, chain=w.mover_chain), 'PERMISSION_DENIED', 'renews once'),
    Row('ZoneService/EnrollZoneServer', 'a wrong token', lambda w: zone_service_pb2.EnrollZoneServerRequest(token='kp-nope', intermediate_csr=GOOD, tls_csr=GOOD, name='z2', listen='10.0.0.2:1', bootstrap_listen='10.0.0.2:2'), 'UNAUTHENTICATED'),
    Row('ZoneService/EnrollZoneServer', 'an agent token', lambda w: zone_service_pb2.EnrollZoneServerRequest(token=w.token, intermediate_csr=csr_der(p256(), cn='z2'), tls_csr=csr_der(p256(), cn='z2'), name='z2', listen='10.0.0.2:1', bootstrap_listen='10.0.0.2:2'), 'UNAUTHENTICATED'),
    Row('ZoneService/EnrollZoneServer', "a live zone's name", lambda w: zone_service_pb2.EnrollZoneServerRequest(token=w.zone_token, intermediate_csr=csr_der(p256(), cn='zone-h'), tls_csr=csr_der(p256(), cn='zone-h'), name='zone-h', listen='10.0.0.2:1', bootstrap_listen='10.0.0.2:2'), 'ALREADY_EXISTS'),
    Row('ZoneService/EnrollZoneServer', 'a wildcard address', lambda w: zone_service_pb2.EnrollZoneServerRequest(token=w.zone_token, intermediate_csr=csr_der(p256(), cn='z3'), tls_csr=csr_der(p256(), cn='z3'), name='z3', listen='0.0.0.0:7443', bootstrap_listen='10.0.0.3:2'), 'INVALID_ARGUMENT'),
    Row('ZoneService/EnrollZoneServer', 'an address that is not one', lambda w: zone_service_pb2.EnrollZoneServerRequest(token=w.zone_token, intermediate_csr=csr_der(p256(), cn='z3'), tls_csr=csr_der(p256(), cn='z3'), name='z3', listen='x' * 300, bootstrap_listen='10.0.0.3:2'), 'INVALID_ARGUMENT'),
    Row('ZoneService/EnrollZoneServer', 'a name that is not a host name', lambda w: zone_service_pb2.EnrollZoneServerRequest(token=w.zone_token, intermediate_csr=csr_der(p256(), cn='z 3'), tls_csr=csr_der(p256(), cn='z 3'), name='z 3/..', listen='10.0.0.3:1', bootstrap_listen='10.0.0.3:2'), 'INVALID_ARGUMENT'),
    Row('ZoneService/EnrollZoneServer', 'one key for both CSRs', lambda w: zone_service_pb2.EnrollZoneServerRequest(token=w.zone_token, intermediate_csr=GOOD, tls_csr=GOOD, name='z4', listen='10.0.0.4:1', bootstrap_listen='10.0.0.4:2'), 'INVALID_ARGUMENT'),
    Row('ZoneService/RenewZoneServer', 'no CSR', lambda w: zone_service_pb2.RenewZoneServerRequest(), 'INVALID_ARGUMENT'),
    Row('ZoneService/ReportIssuedCertificates', 'garbage DER', _zone_report(b'0\x03\x02\x01\x01'), 'INVALID_ARGUMENT'),
    Row('ZoneService/ReportIssuedCertificates', 'a certificate another CA signed', lambda w: _zone_report(x509.load_pem_x509_certificate(_self_made_chain().encode()).public_bytes(serialization.Encoding.DER))(w), 'INVALID_ARGUMENT', 'not issued by this zone'),
    Row('ZoneService/ReportIssuedCertificates', 'a certificate with its SAN twice', lambda w: _zone_report(_san_twice(w))(w), 'INVALID_ARGUMENT', 'extensions'),
    Row('ZoneService/RedeemEnrollmentToken', 'a certificate with its SAN twice', lambda w: zone_service_pb2.RedeemEnrollmentTokenRequest(token=w.token, subject='minted', certificate_der=_san_twice(w)), 'INVALID_ARGUMENT', 'extensions'),
    Row('ZoneService/ReportIssuedCertificates', 'an admin certificate it minted', lambda w: _zone_report(_minted(w, ['admin']), 'admin')(w), 'PERMISSION_DENIED'),
    Row('ZoneService/ReportIssuedCertificates', 'too many certificates', lambda w: zone_service_pb2.ReportIssuedCertificatesRequest(certificates=[zone_service_pb2.IssuedCertificateReport(certificate_der=b'x', component='agent')] * 1001), 'INVALID_ARGUMENT', '1000'),
    Row('ZoneService/RedeemEnrollmentToken', 'a wrong token', lambda w: zone_service_pb2.RedeemEnrollmentTokenRequest(token='kp-nope', subject='minted', certificate_der=_minted(w)), 'UNAUTHENTICATED'),
    Row('ZoneService/RedeemEnrollmentToken', 'garbage DER', lambda w: zone_service_pb2.RedeemEnrollmentTokenRequest(token=w.token, subject='minted', certificate_der=b'0\x00'), 'INVALID_ARGUMENT'),
    Row('ZoneService/RedeemEnrollmentToken', 'another subject', lambda w: zone_service_pb2.RedeemEnrollmentTokenRequest(token=w.token, subject='someone', certificate_der=_minted(w)), 'INVALID_ARGUMENT'),
    Row('ZoneService/GetZoneServer', 'no name', lambda w: zone_service_pb2.GetZoneServerRequest(), 'INVALID_ARGUMENT'),
    Row('ZoneService/GetZoneServer', 'an unknown name', lambda w: zone_service_pb2.GetZoneServerRequest(name='no-such-zone'), 'NOT_FOUND'),
    Row('ZoneService/RevokeZoneServer', 'an unknown name', lambda w: zone_service_pb2.RevokeZoneServerRequest(name='no-such-zone', reason='x', confirm=True), 'NOT_FOUND'),
    Row('ZoneService/RevokeZoneServer', 'no reason', lambda w: zone_service_pb2.RevokeZoneServerRequest(name='zone-h', confirm=True), 'INVALID_ARGUMENT'),
    Row('ZoneService/RevokeZoneServer', 'no confirmation', lambda w: zone_service_pb2.RevokeZoneServerRequest(name='zone-h', reason='x'), 'FAILED_PRECONDITION', 'confirm'),
    Row('BackupService/VerifyBackup', 'a manifest that is not JSON', lambda w: backup_pb.VerifyBackupRequest(manifest=b'\x00garbage'), 'INVALID_ARGUMENT', 'manifest'),
    Row('BackupService/VerifyBackup', 'no manifest', lambda w: backup_pb.VerifyBackupRequest(), 'INVALID_ARGUMENT'),
    Row('BackupService/VerifyBackup', 'another format', lambda w: backup_pb.VerifyBackupRequest(manifest=json.dumps({'format': 'keyplane-backup', 'format_version': 99}).encode()), 'INVALID_ARGUMENT', 'format version'),
    Row('BackupService/VerifyBackup', 'a manifest of the wrong shape', lambda w: backup_pb.VerifyBackupRequest(manifest=json.dumps({'format': 'keyplane-backup', 'format_version': 1, 'created': 'x'}).encode()), 'INVALID_ARGUMENT', 'malformed'),
    Row('BackupService/VerifyBackup', 'an oversized manifest', lambda w: backup_pb.VerifyBackupRequest(manifest=b' ' * (4 * MiB + 1)), 'INVALID_ARGUMENT'),
    Row('TrustStateService/GetTrustState', 'a version from the future', lambda w: trust_state_service_pb2.GetTrustStateRequest(since_version=2 ** 63), 'OK'),
    Row('TrustStateService/WatchTrustState', 'a version it will not reach: it waits, sending nothing', lambda w: trust_state_service_pb2.WatchTrustStateRequest(since_version=2 ** 64 - 1), 'DEADLINE_EXCEEDED'),
    Row('IdentityService/CreateIdentity', 'no name', lambda w: identity_service_pb2.CreateIdentityRequest(role=identity_service_pb2.IDENTITY_ROLE_AUDITOR, csr=GOOD), 'INVALID_ARGUMENT'),
    Row('IdentityService/CreateIdentity', 'an unknown role', lambda w: identity_service_pb2.CreateIdentityRequest(name='eve', role=99, csr=GOOD), 'INVALID_ARGUMENT', 'role'),
    Row('IdentityService/CreateIdentity', 'a name taken', lambda w: identity_service_pb2.CreateIdentityRequest(name='pat@example.org', role=identity_service_pb2.IDENTITY_ROLE_AUDITOR, csr=csr_der(p256(), cn='pat@example.org')), 'ALREADY_EXISTS'),
    Row('IdentityService/RevokeIdentity', 'an unknown name', lambda w: identity_service_pb2.RevokeIdentityRequest(name='nobody@example.org', reason='x', confirm=True), 'NOT_FOUND'),
    Row('IdentityService/RevokeIdentity', 'no confirmation', lambda w: identity_service_pb2.RevokeIdentityRequest(name='pat@example.org', reason='x'), 'FAILED_PRECONDITION', 'confirm'),
    Row('TrustService/RequestTrust', 'no peer', lambda w: trust_service_pb2.RequestTrustRequest(peer_fingerprint=UNKNOWN_FP), 'INVALID_ARGUMENT', 'peer'),
    Row('TrustService/RequestTrust', 'a peer that is not HOST:PORT', lambda w: trust_service_pb2.RequestTrustRequest(peer='x' * 300, peer_fingerprint=UNKNOWN_FP), 'INVALID_ARGUMENT'),
    Row('TrustService/RequestTrust', 'a fingerprint that is not one', lambda w: trust_service_pb2.RequestTrustRequest(peer='127.0.0.1:9', peer_fingerprint='zz'), 'INVALID_ARGUMENT', 'fingerprint'),
    Row('TrustService/ListTrust', 'a huge history', lambda w: trust_service_pb2.ListTrustRequest(history_size=2 ** 32 - 1), 'INVALID_ARGUMENT'),
    Row('TrustService/ApproveTrust', 'no id', lambda w: trust_service_pb2.ApproveTrustRequest(), 'INVALID_ARGUMENT', '32 hex digits'),
    Row('TrustService/ApproveTrust', 'an unknown id', lambda w: trust_service_pb2.ApproveTrustRequest(id=UNKNOWN_SERIAL), 'NOT_FOUND'),
    Row('TrustService/RejectTrust', 'an unknown id', lambda w: trust_service_pb2.RejectTrustRequest(id=UNKNOWN_SERIAL, reason='x'), 'NOT_FOUND'),
    Row('TrustService/RejectTrust', 'an oversized id', lambda w: trust_service_pb2.RejectTrustRequest(id='a' * MiB, reason='x'), 'INVALID_ARGUMENT'),
    Row('TrustService/RevokeTrust', 'an unknown peer', lambda w: trust_service_pb2.RevokeTrustRequest(peer='nobody.test', reason='x'), 'NOT_FOUND'),
    Row('TrustService/RevokeTrust', 'an oversized reason', lambda w: trust_service_pb2.RevokeTrustRequest(peer='nobody.test', reason='r' * 5000), 'INVALID_ARGUMENT'),
    Row('TrustService/OfferTrust', 'no message', lambda w: trust_service_pb2.OfferTrustRequest(), 'INVALID_ARGUMENT', 'missing'),
    Row('TrustService/OfferTrust', 'a body that is not a PeerMessageBody', lambda w: trust_service_pb2.OfferTrustRequest(message=trust_service_pb2.SignedPeerMessage(body=b'\x0a\xff\xff')), 'INVALID_ARGUMENT'),
    Row('TrustService/OfferTrust', 'an oversized body', lambda w: trust_service_pb2.OfferTrustRequest(message=trust_service_pb2.SignedPeerMessage(body=b'\x00' * (65 * 1024))), 'INVALID_ARGUMENT', 'bytes'),
    Row('TrustService/OfferTrust', 'a nonce reveal, not an offer', _peer('OfferTrust', REVEAL), 'INVALID_ARGUMENT', 'expected an offer'),
    Row('TrustService/OfferTrust', 'a request id that is not one', _peer('OfferTrust', OFFER, request_id='../x'), 'INVALID_ARGUMENT', 'request_id'),
    Row('TrustService/OfferTrust', 'an offer for another server', _peer('OfferTrust', OFFER, recipient='other.test'), 'PERMISSION_DENIED', 'not this server'),
    Row('TrustService/OfferTrust', 'an offer sent an hour ago (a replay)', _peer('OfferTrust', OFFER, sent=AN_HOUR_AGO), 'FAILED_PRECONDITION', 'minutes'),
    Row('TrustService/OfferTrust', 'a bit flipped in its signature', lambda w: _peer('OfferTrust', OFFER, flip=True, recipient_root_fingerprint=w.root)(w), 'PERMISSION_DENIED', 'not signed by every root'),
    Row('TrustService/OfferTrust', 'three roots', _peer('OfferTrust', OFFER, roots=3), 'INVALID_ARGUMENT', 'roots'),
    Row('TrustService/OfferTrust', "a fingerprint of none of this server's roots", _peer('OfferTrust', OFFER, recipient_root_fingerprint=UNKNOWN_FP), 'PERMISSION_DENIED', 'pinned a root fingerprint'),
    Row('TrustService/RevealTrustNonce', 'an unknown request', _peer('RevealTrustNonce', REVEAL, nonce=b'n' * 32), 'NOT_FOUND'),
    Row('TrustService/RevealTrustNonce', 'an offer, not a reveal', _peer('RevealTrustNonce', OFFER), 'INVALID_ARGUMENT'),
    Row('TrustService/DecideTrust', 'an unknown request', _peer('DecideTrust', DECISION, approved=True), 'NOT_FOUND'),
    Row('TrustService/DecideTrust', 'no message', lambda w: trust_service_pb2.DecideTrustRequest(), 'INVALID_ARGUMENT'),
    Row('TrustService/EndTrust', 'an unknown request', _peer('EndTrust', END, reason='x'), 'NOT_FOUND'),
    Row('TrustService/EndTrust', 'an end for another server', _peer('EndTrust', END, recipient='other.test'), 'PERMISSION_DENIED'),
    Row('TrustService/PushTrustState', 'from a server it does not trust', _push('peer.test', []), 'FAILED_PRECONDITION', 'does not trust'),
    Row('TrustService/PushTrustState', 'its own trust state, as if from a peer', lambda w: _push(FQDN, list(w.server.admin_client().get_trust_state()))(w), 'FAILED_PRECONDITION', 'does not trust'),
    Row('TrustService/PushTrustState', 'garbage versions from an untrusted server', _push('peer.test', [ts_pb.SignedTrustState(body=b'\x0a\xff')] * 1001), 'FAILED_PRECONDITION'),
    Row(f'{HEALTH}/Check', 'an unknown service', lambda w: _health('no.such.Service'), 'NOT_FOUND'),
    Row('SettingsService/ListSettings', 'reveal, as an auditor', lambda w: settings_service_pb2.ListSettingsRequest(reveal=True), 'PERMISSION_DENIED', 'admin role', caller='auditor'),
    Row('SettingsService/GetSetting', 'reveal a password, as an auditor', lambda w: settings_service_pb2.GetSettingRequest(name='PKIDatabasePassword', reveal=True), 'PERMISSION_DENIED', 'admin role', caller='auditor'),
    Row('ZoneService/ListZoneServers', 'revoked ones too, as the zone itself', lambda w: zone_service_pb2.ListZoneServersRequest(include_revoked=True), 'PERMISSION_DENIED', caller='zone'),
    Row('IdentityService/ListIdentities', 'revoked ones too, as an agent', lambda w: identity_service_pb2.ListIdentitiesRequest(include_revoked=True), 'PERMISSION_DENIED', caller='agent'),
    *_csr_rows(),
]
# fmt: on
