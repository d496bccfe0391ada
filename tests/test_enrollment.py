"""Enrollment over real gRPC: every validation rule, tokens, renewal, certificate
records, init bundles and the legacy key file."""

from __future__ import annotations

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from keyplane.clients.bundle import BundleError, load_bundle
from keyplane.clients.client import (
    KeyplaneClient,
    KeyplaneClientError,
    channel_for,
)
from keyplane.clients.credentials import Credential, load_credential
from keyplane.clients.trust import follow
from keyplane.server.domain.clock import ManualClock
from keyplane.v1 import zone_service_pb2
from tests.serverkit import RunningServer


def make_csr(
    key: object,
    cn: str | None = "agent-1",
    extra: list[x509.NameAttribute] | None = None,
    san: list[x509.GeneralName] | None = None,
) -> bytes:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs + (extra or [])))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def certificate_count(server: RunningServer) -> int:
    return len(server.hierarchy.store.certificates(None, 10000))


def expect(code: grpc.StatusCode, call: object, *args: object) -> KeyplaneClientError:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code == code, caught.value
    return caught.value


def test_enrollment_issues_a_verifiable_client_certificate(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    token = admin.create_enrollment_token(uses=4).token
    for key in (
        p256(),
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(65537, 2048),
    ):
        issued = anonymous.enroll(make_csr(key), token)
        chain = x509.load_pem_x509_certificates(issued.certificate_chain_pem.encode())
        leaf, intermediate = chain
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
        leaf.verify_directly_issued_by(intermediate)
        assert (
            intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
            == 0
        )
        not_after = issued.not_after.ToDatetime(tzinfo=datetime.UTC)
        renew_after = issued.renew_after.ToDatetime(tzinfo=datetime.UTC)
        # Renew inside the 4 h window, in its first half (jitter).
        assert not_after - datetime.timedelta(hours=4) <= renew_after
        assert renew_after <= not_after - datetime.timedelta(hours=2)
    listed = admin.list_certificates("agent")
    assert len(listed) == 4


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (lambda: b"", "empty"),
        (lambda: b"not a csr", "does not parse"),
        (lambda: b"x" * (64 * 1024 + 1), "at most 65536"),
        (lambda: make_csr(ec.generate_private_key(ec.SECP521R1())), "curve secp521r1"),
        (lambda: make_csr(ec.generate_private_key(ec.SECP256K1())), "curve secp256k1"),
        (lambda: make_csr(rsa.generate_private_key(65537, 1024)), "1024 bits"),
        (lambda: make_csr(rsa.generate_private_key(3, 2048)), "exponent 3"),
        (lambda: make_csr(p256(), cn=None), "exactly one common name"),
        (lambda: make_csr(p256(), cn="bad name!"), "common name must be"),
        (
            lambda: make_csr(p256(), extra=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]),
            "only a common name",
        ),
        (
            lambda: make_csr(
                p256(), san=[x509.UniformResourceIdentifier("urn:keyplane:role:admin")]
            ),
            "only for DNS names",
        ),
        (
            lambda: make_csr(
                p256(), san=[x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1"))]
            ),
            "only for DNS names",
        ),
        (lambda: tamper_signature(make_csr(p256())), "signature does not verify"),
        (lambda: off_curve(make_csr(p256())), "invalid"),
    ],
)
def test_bad_csrs_are_refused_and_nothing_is_stored(
    server: RunningServer,
    admin: KeyplaneClient,
    anonymous: KeyplaneClient,
    csr: object,
    message: str,
) -> None:
    token = admin.create_enrollment_token(uses=1).token
    before = certificate_count(server)
    error = expect(grpc.StatusCode.INVALID_ARGUMENT, anonymous.enroll, csr(), token)  # type: ignore[operator]
    assert message in error.message
    assert certificate_count(server) == before
    # The token was not spent by the refused request.
    anonymous.enroll(make_csr(p256()), token)


def _der(pem: bytes) -> bytearray:
    return bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))


def tamper_signature(pem: bytes) -> bytes:
    der = _der(pem)
    der[-5] ^= 0x01
    return bytes(der)


def off_curve(pem: bytes) -> bytes:
    csr = x509.load_pem_x509_csr(pem)
    point = csr.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    der = _der(pem)
    at = bytes(der).find(point)
    der[at + len(point) - 1] ^= 0x01  # the last byte of Y: no longer on the curve
    return bytes(der)


def test_tokens_unknown_spent_expired_and_open_enrollment(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient, clock: ManualClock
) -> None:
    expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll, make_csr(p256()), "kpt_nope")
    expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll, make_csr(p256()), "")
    once = admin.create_enrollment_token().token
    anonymous.enroll(make_csr(p256()), once)
    expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll, make_csr(p256()), once)
    short = admin.create_enrollment_token(uses=5, ttl_seconds=60).token
    clock.advance(datetime.timedelta(minutes=2))
    expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll, make_csr(p256()), short)
    zone_token = admin.create_enrollment_token(role="zone-server").token
    expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll, make_csr(p256()), zone_token)
    admin.update_setting("OpenEnrollment", "true")
    assert anonymous.enroll(make_csr(p256()), "").serial
    expect(grpc.StatusCode.INVALID_ARGUMENT, admin.create_enrollment_token, 0, 0, "root")
    expect(grpc.StatusCode.INVALID_ARGUMENT, admin.create_enrollment_token, 2_000_000, 0, "agent")
    # Tokens are stored hashed, never in clear.
    raw = (server.config.data_dir / "keyplane.db").read_bytes()
    assert once.encode() not in raw and short.encode() not in raw


def agent_client(
    server: RunningServer, key: ec.EllipticCurvePrivateKey, issued: object
) -> KeyplaneClient:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    credential = Credential(
        issued.certificate_chain_pem.encode(),
        pem,  # type: ignore[attr-defined]
        issued.roots_pem.encode(),
        server.admin_dir,
    )  # type: ignore[attr-defined]
    return KeyplaneClient(channel_for(server.listen, credential), timeout=10)


def test_renewal_rules_and_revocation(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    token = admin.create_enrollment_token(uses=2).token
    key = p256()
    issued = anonymous.enroll(make_csr(key), token)
    with agent_client(server, key, issued) as agent:
        expect(grpc.StatusCode.INVALID_ARGUMENT, agent.renew, make_csr(key))  # same key
        expect(grpc.StatusCode.INVALID_ARGUMENT, agent.renew, make_csr(p256(), cn="someone-else"))
        renewed = agent.renew(make_csr(p256()))
        assert renewed.serial != issued.serial
        # Agents may not call admin RPCs.
        expect(grpc.StatusCode.PERMISSION_DENIED, agent.list_root_keys)
    # Admins do not renew agent certificates.
    expect(grpc.StatusCode.PERMISSION_DENIED, admin.renew, make_csr(p256()))
    admin.revoke_certificate(issued.serial, "lost laptop")
    with agent_client(server, key, issued) as agent:
        error = expect(grpc.StatusCode.PERMISSION_DENIED, agent.renew, make_csr(p256()))
    assert "revoked" in error.message
    state = follow(None, admin.get_trust_state(0), [server.hierarchy.issuing_root().fingerprint])
    assert issued.serial in state.body.revoked_serials
    expect(grpc.StatusCode.FAILED_PRECONDITION, admin.revoke_certificate, issued.serial, "again")
    expect(grpc.StatusCode.NOT_FOUND, admin.revoke_certificate, "ab" * 16, "unknown")
    expect(grpc.StatusCode.INVALID_ARGUMENT, admin.revoke_certificate, "xyz", "bad")
    records = {c.serial: c for c in admin.list_certificates()}
    assert records[issued.serial].revoke_reason == "lost laptop"
    assert records[renewed.serial].component == "agent"


def test_init_bundle_is_signed_public_and_pins_the_root(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    bundle = admin.get_init_bundle()
    data = bundle.SerializeToString()
    loaded = load_bundle(data)
    root = server.hierarchy.issuing_root()
    assert loaded.root_fingerprints == [root.fingerprint]
    assert [s.bootstrap_listen for s in loaded.body.servers] == [server.bootstrap]
    assert load_bundle(data, "sha256:" + root.fingerprint.upper()).root_fingerprints
    with pytest.raises(BundleError, match="expected fingerprint"):
        load_bundle(data, "ab" * 32)
    tampered = bytearray(data)
    tampered[len(tampered) // 3] ^= 0x01
    with pytest.raises(BundleError):
        load_bundle(bytes(tampered))
    # Nothing secret inside: no PEM private key, and none of the server's key material.
    assert b"-----BEGIN" not in data  # DER only: no PEM block of any kind
    hierarchy = server.hierarchy
    tls_key = serialization.load_pem_private_key(
        hierarchy.backends.tls_private_key_pem(hierarchy.current_server_tls().key_uri), None
    )
    scalar = tls_key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    assert scalar not in data
    admin_key = serialization.load_pem_private_key(
        load_credential(server.admin_dir).private_key_pem, None
    )
    admin_scalar = admin_key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    assert admin_scalar not in data


def test_legacy_key_file_needs_the_setting(admin: KeyplaneClient) -> None:
    error = expect(grpc.StatusCode.FAILED_PRECONDITION, admin.get_legacy_public_key)
    assert "EnableLegacyProtocol" in error.message
    admin.update_setting("EnableLegacyProtocol", "true")
    legacy = admin.get_legacy_public_key()
    assert legacy.public_key_pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert legacy.fingerprint == admin.get_legacy_root_key().fingerprint


def test_zone_enrollment_refuses_bad_requests(
    admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    zone_token = admin.create_enrollment_token(role="zone-server").token
    agent_token = admin.create_enrollment_token().token
    good = dict(
        intermediate_csr=make_csr(p256(), cn="zone-a"),
        tls_csr=make_csr(p256(), cn="zone-a"),
        name="zone-a",
        listen="127.0.0.1:1",
        bootstrap_listen="127.0.0.1:2",
    )
    request = zone_service_pb2.EnrollZoneServerRequest
    expect(
        grpc.StatusCode.UNAUTHENTICATED,
        anonymous.enroll_zone_server,
        request(token=agent_token, **good),
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        anonymous.enroll_zone_server,
        request(token=zone_token, **{**good, "listen": "nowhere"}),
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        anonymous.enroll_zone_server,
        request(token=zone_token, **{**good, "tls_csr": make_csr(p256(), cn="other")}),
    )
    response = anonymous.enroll_zone_server(request(token=zone_token, **good))
    chain = x509.load_pem_x509_certificates(response.intermediate_chain_pem.encode())
    assert chain[0].extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert [
        s.name for s in load_bundle(admin.get_init_bundle().SerializeToString()).body.servers
    ] == [
        "pki.test",
        "zone-a",
    ]
