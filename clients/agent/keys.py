"""The agent's keys and certificates: a fresh key and CSR, what the server sent (checked:
our key, our name, a chain), and which root a chain goes up to."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyplane.clients.agent.errors import AgentError
from keyplane.v1 import enrollment_service_pb2


def _iso(value: datetime.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key_and_csr(name: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PKCS#8 PEM) and a CSR for it with CN=`name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


@dataclass(frozen=True)
class Issued:
    """The agent's certificate: its key, chain, the roots sent with it, and its schedule."""

    key_pem: bytes
    chain_pem: bytes
    roots_pem: bytes
    serial: str
    not_after: datetime.datetime
    renew_after: datetime.datetime
    renewals: int

    @property
    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.chain_pem)

    def issued_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "not_after": _iso(self.not_after),
            "renew_after": _iso(self.renew_after),
            "renewals": self.renewals,
        }


def issued_from(
    certificate: enrollment_service_pb2.IssuedCertificate, key_pem: bytes, name: str, renewals: int
) -> Issued:
    """Check what the server sent (for our key, our name, a chain) and keep it."""
    try:
        chain = x509.load_pem_x509_certificates(certificate.certificate_chain_pem.encode())
    except ValueError:
        raise AgentError("the server sent a certificate chain that does not parse") from None
    leaf = chain[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise AgentError("the server sent a certificate for another key")
    if _common_name(leaf) != name:
        raise AgentError(f"the server sent a certificate for {_common_name(leaf)!r}, not {name!r}")
    return Issued(
        key_pem=key_pem,
        chain_pem=certificate.certificate_chain_pem.encode(),
        roots_pem=certificate.roots_pem.encode(),
        serial=certificate.serial or f"{leaf.serial_number:032x}",
        not_after=certificate.not_after.ToDatetime(tzinfo=datetime.UTC),
        renew_after=certificate.renew_after.ToDatetime(tzinfo=datetime.UTC),
        renewals=renewals,
    )


def chain_root(chain: list[x509.Certificate], roots: dict[str, x509.Certificate]) -> str | None:
    """The fingerprint of the root among `roots` that issued the chain's top certificate."""
    top = chain[-1]
    for fingerprint, root in roots.items():
        try:
            top.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return fingerprint
    return None
