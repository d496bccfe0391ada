"""Who is calling: a client admitted by mutual TLS or by a renewal proof, as the domain
sees it. Its roles are the ones its issuer may confer (see authority), never merely
the ones its certificate claims."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from keyplane.server.domain import authority, certs
from keyplane.server.kinds import KeyKind, Role
from keyplane.server.store import Actor


@dataclass(frozen=True)
class Identity:
    """An admitted caller."""

    common_name: str
    serial: str
    roles: frozenset[Role]
    issuer: KeyKind
    certificate: x509.Certificate
    # SHA-256 of the certificate's key (SubjectPublicKeyInfo), lowercase hex.
    key_fingerprint: str = ""
    # The fingerprint of the key that issued it.
    issuer_fingerprint: str = ""

    @property
    def actor(self) -> Actor:
        """How the audit log names this caller, with its certificate key's fingerprint."""
        return Actor(f"{self.common_name} (serial {self.serial})", self.key_fingerprint)

    @classmethod
    def admitted(
        cls, cert: x509.Certificate, issuer: KeyKind, issuer_fingerprint: str = ""
    ) -> Identity:
        """The identity of a certificate `issuer` issued; PERMISSION_DENIED when it claims
        a role that issuer may not confer."""
        return cls(
            common_name=certs.common_name_of(cert),
            serial=certs.serial_hex(cert),
            roles=authority.admitted_roles(issuer, certs.roles_of(cert)),
            issuer=issuer,
            certificate=cert,
            key_fingerprint=certs.key_fingerprint(cert),
            issuer_fingerprint=issuer_fingerprint,
        )
