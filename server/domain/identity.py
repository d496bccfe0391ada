"""Who is calling: a client verified by mutual TLS, as the domain sees it."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509


@dataclass(frozen=True)
class Identity:
    """A caller verified by mutual TLS."""

    common_name: str
    serial: str
    roles: frozenset[str]
    issuer_subject: str
    certificate: x509.Certificate

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"{self.common_name} (serial {self.serial})"
