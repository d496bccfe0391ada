"""The trusted peers, as the rest of the server sees them: their roots (what the
mutual-TLS listener accepts, and the bundle and trust state carry), their live
intermediates (a certificate one of them issued is admitted as an agent, nothing more),
their revocations, and each one's section of the trust state.

Read from the state DB and parsed once per change (the store's generation); inside a
transaction, from what it has written, so that a change publishes itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from keyplane.server.domain import certs
from keyplane.server.domain.peer_messages import load_roots_pem
from keyplane.server.domain.peer_states import PeerState, load_state
from keyplane.server.store import PeerRecord, StateStore
from keyplane.server.store.reads import Reads
from keyplane.v1 import trust_state_pb2


@dataclass(frozen=True)
class PeerIntermediate:
    """A live intermediate of a trusted peer."""

    fingerprint: str
    certificate: x509.Certificate
    peer: str


@dataclass(frozen=True)
class PeerView:
    """One trusted peer, parsed."""

    record: PeerRecord
    state: PeerState | None
    roots: dict[str, x509.Certificate]
    intermediates: tuple[PeerIntermediate, ...]
    revoked_serials: frozenset[str]
    revoked_keys: frozenset[str]

    @property
    def fqdn(self) -> str:
        return self.record.fqdn

    @property
    def approved_fingerprints(self) -> list[str]:
        return list(load_roots_pem(self.record.peer_roots_pem))

    def roots_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots.values())

    def server(self) -> trust_state_pb2.PeerServer:
        """This peer's section of the trust state."""
        section = trust_state_pb2.PeerServer(
            fqdn=self.record.fqdn,
            listen=self.record.listen,
            bootstrap_listen=self.record.bootstrap_listen,
        )
        if self.state is None:
            section.roots.extend(
                trust_state_pb2.TrustedCertificate(
                    fingerprint=fp,
                    certificate_der=certs.to_der(cert),
                    name=certs.common_name_of(cert),
                    state="active",
                    kind="root",
                )
                for fp, cert in self.roots.items()
            )
            return section
        body = self.state.body
        revoked = set(body.revoked_key_fingerprints)
        section.roots.extend(body.roots)
        section.revoked_root_fingerprints.extend(body.revoked_root_fingerprints)
        section.intermediates.extend(i for i in body.intermediates if i.fingerprint not in revoked)
        section.revoked_key_fingerprints.extend(body.revoked_key_fingerprints)
        section.revoked_serials.extend(body.revoked_serials)
        section.revoked_certificate_key_fingerprints.extend(
            body.revoked_certificate_key_fingerprints
        )
        section.trust_state_version = body.version
        return section


def view_of(record: PeerRecord) -> PeerView:
    state = load_state(record.peer_state) if record.peer_state else None
    if state is None:
        return PeerView(
            record, None, load_roots_pem(record.peer_roots_pem), (), frozenset(), frozenset()
        )
    body = state.body
    revoked_keys = set(body.revoked_key_fingerprints)
    intermediates = tuple(
        PeerIntermediate(
            i.fingerprint, x509.load_der_x509_certificate(i.certificate_der), record.fqdn
        )
        for i in body.intermediates
        if i.fingerprint not in revoked_keys
    )
    return PeerView(
        record,
        state,
        state.roots,
        intermediates,
        frozenset(body.revoked_serials),
        frozenset(revoked_keys | set(body.revoked_certificate_key_fingerprints)),
    )


def trusted_views(reads: Reads) -> list[PeerView]:
    """Every trusted peer, uncached, through `reads` (inside a transaction: what it wrote)."""
    return [view_of(r) for r in reads.peers.trust_peers(("trusted",))]


class TrustedPeers:
    """The trusted peers of this server, parsed once per change of the state DB."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def views(self) -> list[PeerView]:
        return self.store.memo(("peers.trusted",), lambda: trusted_views(self.store.reads))

    def roots_pem(self) -> bytes:
        return b"".join(v.roots_pem() for v in self.views())

    def root_fingerprints(self) -> list[str]:
        return [fp for v in self.views() for fp in v.roots]

    def issuer_of(self, cert: x509.Certificate) -> PeerIntermediate | None:
        """The live peer intermediate that signed `cert`, if one did."""
        for view in self.views():
            for intermediate in view.intermediates:
                if cert.issuer != intermediate.certificate.subject:
                    continue
                try:
                    cert.verify_directly_issued_by(intermediate.certificate)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                return intermediate
        return None

    def view(self, fqdn: str) -> PeerView | None:
        return next((v for v in self.views() if v.fqdn == fqdn), None)
