"""Who is calling: a client verified by mutual TLS, as the domain sees it."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from keyplane.server.domain import certs


@dataclass(frozen=True)
class Identity:
    """A caller verified by mutual TLS, or by a renewal proof (RenewWithProof)."""

    common_name: str
    serial: str
    roles: frozenset[str]
    issuer_subject: str
    certificate: x509.Certificate

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"{self.common_name} (serial {self.serial})"

    @classmethod
    def of(cls, cert: x509.Certificate) -> Identity:
        """The identity a verified client certificate carries."""
        return cls(
            common_name=certs.common_name_of(cert),
            serial=certs.serial_hex(cert),
            roles=certs.roles_of(cert),
            issuer_subject=cert.issuer.rfc4514_string(),
            certificate=cert,
        )
