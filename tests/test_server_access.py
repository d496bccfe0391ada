"""Who may call what: the two listeners, roles, health checks and reflection."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.plugins.keys import fingerprint
from keyplane.server.domain import certs
from keyplane.server.store import CertificateRecord
from keyplane.v1 import root_key_service_pb2, root_key_service_pb2_grpc
from tests.serverkit import RunningServer, running_server
from tests.test_enrollment import make_csr


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data") as running:
        yield running


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue_client(server: RunningServer, role: str, record: bool = True) -> tuple[bytes, bytes]:
    """A client certificate from the server's issuing root, with `role`."""
    hierarchy = server.hierarchy
    issuer = hierarchy.issuing_root()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = certs.build_client_certificate(
        hierarchy.backends.private_key(issuer.key_uri),
        certs.load_pem(issuer.certificate_pem),
        key.public_key(),
        f"{role}-1",
        role,
        now,
        datetime.timedelta(hours=1),
    )
    if record:
        with hierarchy.store.transaction(now) as tx:
            tx.insert_certificate(
                CertificateRecord(
                    certs.serial_hex(cert),
                    fingerprint(key.public_key()),
                    cert.subject.rfc4514_string(),
                    role,
                    issuer.fingerprint,
                    cert.not_valid_before_utc,
                    cert.not_valid_after_utc,
                    certs.to_pem(cert),
                    now,
                )
            )
            tx.audit("test", "certificate.issue", certs.serial_hex(cert))
    return certs.to_pem(cert).encode(), _pem(key)


def call_list(
    server: RunningServer, chain: bytes | None, key: bytes | None, address: str | None = None
) -> KeyplaneClientError | None:
    roots = (server.admin_dir / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(roots, key, chain)
    with grpc.secure_channel(address or server.listen, creds) as channel:
        try:
            KeyplaneClient(channel, timeout=10).list_root_keys()
        except KeyplaneClientError as exc:
            return exc
    return None


def test_admin_calls_on_the_bootstrap_listener_are_unauthenticated(server: RunningServer) -> None:
    with server.bootstrap_channel() as channel:
        stub = root_key_service_pb2_grpc.RootKeyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListRootKeys(root_key_service_pb2.ListRootKeysRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate" in caught.value.details()


def test_mutual_tls_listener_requires_a_client_certificate(server: RunningServer) -> None:
    error = call_list(server, None, None)
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_without_the_admin_role_is_permission_denied(server: RunningServer) -> None:
    with server.admin_client() as admin:
        token = admin.create_enrollment_token().token
    key = ec.generate_private_key(ec.SECP256R1())
    with KeyplaneClient(server.bootstrap_channel()) as anonymous:
        issued = anonymous.enroll(make_csr(key, cn="agent-1"), token)
    error = call_list(server, issued.certificate_chain_pem.encode(), _pem(key))
    assert error is not None
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs the admin or auditor or operator role" in error.message


def test_a_root_issued_certificate_claiming_the_agent_role_is_refused(
    server: RunningServer,
) -> None:
    """Roles come from the issuer: a root confers admin, operator, auditor and
    zone-server, never agent, whatever the certificate says."""
    chain, key = issue_client(server, "agent")
    error = call_list(server, chain, key)
    assert error is not None
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "which a root may not confer" in error.message


def test_an_unrecorded_certificate_is_refused(server: RunningServer) -> None:
    chain, key = issue_client(server, "admin", record=False)
    error = call_list(server, chain, key)
    assert error is not None and error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "no record" in error.message


def test_a_certificate_from_another_ca_fails_the_handshake(server: RunningServer) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:keyplane:role:admin")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    error = call_list(server, cert.public_bytes(serialization.Encoding.PEM), _pem(ca_key))
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE


def test_health_is_served_on_both_listeners(server: RunningServer) -> None:
    with server.bootstrap_channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service="keyplane.v1.RootKeyService"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with server.admin_client() as client:
        stub = health_pb2_grpc.HealthStub(client._channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1


def test_reflection_lists_and_describes_every_service(server: RunningServer) -> None:
    with server.bootstrap_channel() as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "keyplane.v1.RootKeyService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("keyplane.v1.RootKeyService")
        assert {m.name for m in service.methods} == {
            "CreateRootKey",
            "ListRootKeys",
            "GetRootKey",
            "RevokeRootKey",
            "GetRootCoverage",
            "GetLegacyRootKey",
        }
        revoke = pool.FindMessageTypeByName("keyplane.v1.RevokeRootKeyRequest")
        assert {f.name for f in revoke.fields} == {
            "fingerprint",
            "reason",
            "confirm",
            "dry_run",
            "force",
        }
        # What the new messages are made of comes through reflection too.
        plan = pool.FindMessageTypeByName("keyplane.v1.RevocationPlan")
        assert {"verdict", "stranded", "first_stranded", "peers"} <= {f.name for f in plan.fields}
