"""A zone server as an attacker holds one: the test enrolls it with a real zone-server
token through the real API, and so holds its intermediate key and its TLS credential,
and can mint whatever certificates that key can sign."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyplane.clients.client import CHANNEL_OPTIONS, bootstrap_channel_for
from keyplane.server.domain import certs
from keyplane.v1 import zone_service_pb2, zone_service_pb2_grpc
from tests.test_enrollment import make_csr, p256


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def mtls_channel(
    address: str, chain_pem: bytes, private_key_pem: bytes, roots_pem: bytes
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots_pem, private_key=private_key_pem, certificate_chain=chain_pem
    )
    return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)


@dataclass
class FakeZone:
    """What a zone server holds: its intermediate (key and certificate) and its TLS
    credential (chain and key)."""

    name: str
    intermediate_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_chain_pem: str
    tls_key: ec.EllipticCurvePrivateKey
    tls_chain_pem: str

    def channel(self, address: str, roots_pem: bytes) -> grpc.Channel:
        return mtls_channel(address, self.tls_chain_pem.encode(), key_pem(self.tls_key), roots_pem)

    def mint(
        self,
        cn: str,
        roles: list[str],
        dns: list[str] | None = None,
        server_auth: bool = False,
        serial: int | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A certificate the zone's intermediate signs, saying whatever the zone likes."""
        key = key or p256()
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"urn:keyplane:role:{r}") for r in roles
        ]
        for name in dns or []:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server_auth:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.intermediate_key.public_key()
                ),
                critical=False,
            )
            .sign(self.intermediate_key, hashes.SHA256())
        )
        return cert, key

    def chain(self, cert: x509.Certificate) -> bytes:
        return (certs.to_pem(cert) + certs.to_pem(self.intermediate)).encode()


def enroll_fake_zone(
    bootstrap: str,
    roots_pem: bytes,
    token: str,
    name: str = "attacker-zone",
    listen: str = "10.9.9.9:7443",
    bootstrap_listen: str = "10.9.9.9:7444",
) -> FakeZone:
    intermediate_key, tls_key = p256(), p256()
    request = zone_service_pb2.EnrollZoneServerRequest(
        token=token,
        intermediate_csr=make_csr(intermediate_key, cn=name),
        tls_csr=make_csr(tls_key, cn=name),
        name=name,
        listen=listen,
        bootstrap_listen=bootstrap_listen,
    )
    with bootstrap_channel_for(bootstrap, roots_pem) as channel:
        response = zone_service_pb2_grpc.ZoneServiceStub(channel).EnrollZoneServer(
            request, timeout=30
        )
    intermediate = x509.load_pem_x509_certificates(response.intermediate_chain_pem.encode())[0]
    return FakeZone(
        name,
        intermediate_key,
        intermediate,
        response.intermediate_chain_pem,
        tls_key,
        response.tls_certificate.certificate_chain_pem,
    )
