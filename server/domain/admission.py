"""Admission at the server: which certificates may call it, and with which roles.

The TLS stack (or, for RenewWithProof, this module) has checked that a certificate
chains to an active root. Here: the certificate is the one recorded under its serial
(or one a live zone intermediate of this hierarchy signed), it is unexpired and
unrevoked, its key was never revoked, its issuer is live, and it claims only roles its
issuer may confer (authority). A zone server's certificate must be one of its live
zone's. Verdicts are remembered until the hierarchy changes (any revocation bumps the
generation), so they cost a dictionary lookup per call.
"""

from __future__ import annotations

import datetime
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from keyplane.server.domain import certs
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.peers import TrustedPeers
from keyplane.server.errors import PermissionDenied
from keyplane.server.kinds import KeyKind, KeyState, Role
from keyplane.server.store import KeyRecord, StateStore, ZoneRecord

VERDICT_CACHE_SIZE = 100_000


class Admission:
    """Admits callers by their certificates."""

    def __init__(self, store: StateStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._verdicts: dict[bytes, tuple[int, Identity]] = {}
        self.peers = TrustedPeers(store)

    def admit(self, cert: x509.Certificate) -> Identity:
        """The identity of a caller holding `cert`; PERMISSION_DENIED with the reason
        when it must be refused."""
        now = self.clock.now()
        if cert.not_valid_after_utc < now:
            raise PermissionDenied("the client certificate is refused: it has expired")
        digest = cert.fingerprint(hashes.SHA256())
        generation = self.store.generation()
        hit = self._verdicts.get(digest)
        if hit is not None and hit[0] == generation:
            return hit[1]
        identity = self._admit(cert, now)
        if len(self._verdicts) > VERDICT_CACHE_SIZE:
            self._verdicts.clear()
        self._verdicts[digest] = (generation, identity)
        return identity

    def _admit(self, cert: x509.Certificate, now: datetime.datetime) -> Identity:
        serial = certs.serial_hex(cert)
        record = self.store.certificate(serial)
        if record is not None:
            # A certificate with a recorded serial must be that very certificate: a zone
            # (or anyone) minting one with an admin's serial gets nothing from it.
            if certs.to_der(certs.load_pem(record.certificate_pem)) != certs.to_der(cert):
                refuse("it is not the certificate issued with its serial number")
            if record.revoked_at is not None:
                refuse(f"it was revoked ({record.revoke_reason})")
            issuer = self.store.key(record.issuer_fingerprint)
        else:
            if serial in set(self.store.revoked_serials(now)):
                refuse("it was revoked")
            issuer = self._zone_issuer(cert)
            if issuer is None:
                return self._admit_peer_agent(cert)
        if issuer is None or issuer.state == KeyState.REVOKED:
            refuse("its issuer is revoked")
        if issuer.kind == KeyKind.ROOT and issuer.state != KeyState.ACTIVE:
            refuse("its issuer is no longer active")
        if certs.key_fingerprint(cert) in self.store.revoked_certificate_keys():
            refuse("its key was revoked")
        try:
            identity = Identity.admitted(cert, issuer.kind, issuer.fingerprint)
        except PermissionDenied as exc:
            refuse(str(exc).removeprefix("the certificate "))
        if record is not None and identity.roles != {Role(record.role)}:
            refuse("its roles are not the ones it was issued with")
        if Role.ZONE_SERVER in identity.roles and self.zone_of(identity) is None:
            refuse("it is not the certificate of a live zone server (was the zone revoked?)")
        return identity

    def _admit_peer_agent(self, cert: x509.Certificate) -> Identity:
        """A trusted peer's agent (active/active): issued by one of the peer's live
        intermediates, not revoked by the peer; an agent here, whatever else it claims
        is refused."""
        issuer = self.peers.issuer_of(cert)
        if issuer is None:
            refuse("this server has no record of issuing it")
        if issuer.certificate.not_valid_after_utc < self.clock.now():
            refuse(f"its issuer, an intermediate of the trusted peer {issuer.peer}, has expired")
        view = self.peers.view(issuer.peer)
        if view is not None and certs.serial_hex(cert) in view.revoked_serials:
            refuse(f"it was revoked by its server, the trusted peer {issuer.peer}")
        if view is not None and certs.key_fingerprint(cert) in view.revoked_keys:
            refuse(f"its key was revoked by its server, the trusted peer {issuer.peer}")
        try:
            return Identity.admitted(cert, KeyKind.PEER_INTERMEDIATE, issuer.fingerprint)
        except PermissionDenied as exc:
            refuse(str(exc).removeprefix("the certificate "))

    def _zone_issuer(self, cert: x509.Certificate) -> KeyRecord | None:
        """The live zone intermediate that signed `cert`, if one did."""
        for key in self.store.keys(KeyKind.ZONE_INTERMEDIATE, (KeyState.ACTIVE, KeyState.RETIRED)):
            if certs.issued_by(cert, key.certificate_pem):
                return key
        return None

    def zone_of(self, identity: Identity) -> ZoneRecord | None:
        """The live zone whose current or previous TLS certificate the caller holds."""
        return self.store.zone_of_certificate(identity.serial)


def refuse(reason: str) -> NoReturn:
    raise PermissionDenied(f"the client certificate is refused: {reason}")
