"""Zone servers: enrolling one (a zone-server token), renewing it (its current
certificate), listing them, and revoking one with everything it issued; what a zone
records is in zone_reports.

A zone's identity is its enrolled key and certificate, never its name: a name is taken
while its zone is live, RenewZoneServer renews only the zone whose current certificate
the caller holds, and every revocation is published in the same transaction.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519

from keyplane.plugins.errors import BackendError
from keyplane.plugins.keys import algorithm_of, fingerprint
from keyplane.server.domain import certs, crl
from keyplane.server.domain.csr_policy import check_csr
from keyplane.server.domain.enrollment import Issued, key_in_use, renew_after
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.inputs import parse_reason
from keyplane.server.domain.roots import SERVER_ACTOR
from keyplane.server.domain.tokens import UNUSABLE, Tokens
from keyplane.server.domain.zone_names import parse_listen, parse_zone_name
from keyplane.server.domain.zone_reports import ZoneReports
from keyplane.server.errors import (
    AlreadyExists,
    ConfirmationRequired,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from keyplane.server.kinds import LIVE_STATES, KeyKind, KeyState, Role
from keyplane.server.store import (
    CertificateRecord,
    KeyRecord,
    Transaction,
    ZoneRecord,
    certificate_row,
)

ZONE_INTERMEDIATE_VALIDITY_KIND = "IntermediateTLS"


@dataclass(frozen=True)
class ZoneView:
    """A zone as ListZoneServers shows it."""

    zone: ZoneRecord
    intermediate: KeyRecord | None
    certificates: int


class Zones:
    """Zone servers, on behalf of the hierarchy."""

    def __init__(self, hierarchy: Hierarchy, tokens: Tokens) -> None:
        self.hierarchy = hierarchy
        self.store = hierarchy.store
        self.clock = hierarchy.clock
        self.tokens = tokens
        # What its zones record (certificates issued, renewals, sightings).
        self.reports = ZoneReports(self)

    # -- enrollment and renewal ----------------------------------------------------------

    def _forbidden_names(self) -> list[str]:
        """The server's real names: a zone may not take them. Loopback addresses are
        every local process's; a zone on the server's own host may listen on them (its
        certificate names the zone, and no address the server answers on)."""
        config = self.hierarchy.config
        names = [config.fqdn, *config.server_names]
        for host in (config.listen_address[0], config.bootstrap_address[0]):
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    names.append(host)
            except ValueError:
                if host not in ("", "localhost"):
                    names.append(host)
        return names

    def _intermediate(self, zone: ZoneRecord, csr_data: bytes) -> KeyRecord:
        """The zone's intermediate, certified by the newest root: agent certificates
        only (clientAuth, names under .invalid)."""
        _, key, _ = check_csr(csr_data)
        if isinstance(key, ed25519.Ed25519PublicKey):
            raise InvalidArgument("a zone intermediate key is EC P-256/P-384 or RSA")
        fp = fingerprint(key)
        if self.store.key(fp) is not None:
            raise AlreadyExists("this intermediate key is known already: make a new key")
        issuer = self.hierarchy.issuing_root()
        validity, _ = self.hierarchy.settings.rotation(ZONE_INTERMEDIATE_VALIDITY_KIND)
        name = f"{zone.name} zone intermediate"
        current = self.clock.now()
        cert = certs.build_intermediate_certificate(
            self.hierarchy.backends.private_key(issuer.key_uri),
            certs.load_pem(issuer.certificate_pem or ""),
            key,
            name,
            current,
            validity,
            crl_url=self.hierarchy.crls.url_for(issuer.fingerprint),
        )
        return KeyRecord(
            fingerprint=fp,
            kind=KeyKind.ZONE_INTERMEDIATE,
            name=name,
            number=None,
            algorithm=algorithm_of(key).value,
            backend="remote",
            key_uri=zone.key_uri,
            state=KeyState.ACTIVE,
            issuer_fingerprint=issuer.fingerprint,
            certificate_pem=certs.to_pem(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            created_at=current,
        )

    def _tls(self, zone: ZoneRecord, csr_data: bytes) -> tuple[Issued, CertificateRecord]:
        """The zone's TLS certificate (zone-server role, serverAuth and clientAuth),
        from the newest root, for the zone's name and its listen hosts."""
        _, key, common_name = check_csr(csr_data)
        if common_name != zone.name:
            raise InvalidArgument("the TLS CSR's common name must be the zone server's name")
        found = self.store.certificates_for_key(fingerprint(key))
        if found:
            raise AlreadyExists(key_in_use(found))
        issuer = self.hierarchy.issuing_root()
        now = self.clock.now()
        validity, window = self.hierarchy.settings.rotation("ClientTLS")
        forbidden = {n.lower() for n in self._forbidden_names()}
        hosts = [zone.name] + [
            h
            for h in (zone.listen.rpartition(":")[0], zone.bootstrap_listen.rpartition(":")[0])
            if h.strip("[]").lower() not in forbidden
        ]
        record = certs.client_record(
            self.hierarchy.backends.private_key(issuer.key_uri),
            certs.load_pem(issuer.certificate_pem or ""),
            issuer.fingerprint,
            key,
            zone.name,
            Role.ZONE_SERVER,
            now,
            validity,
            names=[h.strip("[]") for h in hosts],
            server_auth=True,
            crl_url=self.hierarchy.crls.url_for(issuer.fingerprint),
        )
        issued = Issued(
            chain_pem=record.certificate_pem,
            roots_pem=self.hierarchy.trusted_roots_pem().decode(),
            serial=record.serial,
            not_after=record.not_after,
            renew_after=renew_after(record.not_after, window),
        )
        return issued, record

    def _publish(self, tx: Transaction) -> None:
        self.hierarchy.trust.publish_in(tx, SERVER_ACTOR)

    def enroll(
        self,
        token: str,
        intermediate_csr: bytes,
        tls_csr: bytes,
        name: str,
        listen: str,
        bootstrap_listen: str,
    ) -> tuple[str, Issued]:
        digest = self.tokens.check(token, Role.ZONE_SERVER)  # before anything is parsed
        forbidden = self._forbidden_names()
        name = parse_zone_name(name, forbidden)
        parse_listen("listen", listen, forbidden)
        parse_listen("bootstrap_listen", bootstrap_listen, forbidden)
        actor = f"zone server {name}"
        with self.hierarchy.lock:
            if any(z.name == name for z in self.store.zones()):
                raise AlreadyExists(
                    f"a zone server named {name!r} is enrolled already; to replace it, revoke "
                    f"it first ('keyplane zones revoke {name}')"
                )
            now = self.clock.now()
            # The id comes from the insert; the certificates are made for a record like it.
            draft = ZoneRecord(0, name, listen, bootstrap_listen, None, None, now, now,
                               None, None, None, None)  # fmt: skip
            tls, tls_record = self._tls(draft, tls_csr)
            with self.store.transaction(now) as tx:
                if not tx.consume_token(digest, Role.ZONE_SERVER):
                    raise Unauthenticated(UNUSABLE)
                if any(z.name == name for z in tx.reads.zones()):
                    raise AlreadyExists(f"a zone server named {name!r} is enrolled already")
                zone_id = tx.insert_zone(name, listen, bootstrap_listen)
                zone = next(z for z in tx.reads.zones() if z.id == zone_id)
                intermediate = self._intermediate(zone, intermediate_csr)
                tx.insert_key(intermediate)
                tx.insert_certificates([certificate_row(tls_record, digest)])
                tx.on_commit(lambda: self.hierarchy.metrics.issued(KeyKind.ROOT, 2))
                tx.set_zone_certificate(zone_id, tls_record.serial)
                tx.audit(
                    actor,
                    "zone_server.enroll",
                    name,
                    after_fingerprint=intermediate.fingerprint,
                    zone_id=zone_id,
                    intermediate=intermediate.fingerprint,
                    tls_serial=tls_record.serial,
                    listen=listen,
                    bootstrap_listen=bootstrap_listen,
                )
                self._publish(tx)
        root = self.hierarchy.issuing_root()
        return (intermediate.certificate_pem or "") + (root.certificate_pem or ""), tls

    def current_zone(self, identity: Identity) -> ZoneRecord:
        """The live zone the caller is, by the certificate it holds."""
        if Role.ZONE_SERVER not in identity.roles:
            raise PermissionDenied("only zone servers make this call")
        zone = self.store.zone_of_certificate(identity.serial)
        if zone is None:
            raise PermissionDenied(
                "the caller's certificate is not that of a live zone server (was it revoked?)"
            )
        return zone

    def renew(
        self, identity: Identity, intermediate_csr: bytes, tls_csr: bytes
    ) -> tuple[str, Issued]:
        zone = self.current_zone(identity)
        if zone.tls_serial != identity.serial:
            again = self._renewed_already(zone, identity, intermediate_csr, tls_csr)
            if again is not None:
                return again
            raise PermissionDenied(
                "renew with the zone server's current certificate; this one was replaced already"
            )
        with self.hierarchy.lock:
            tls, tls_record = self._tls(zone, tls_csr)
            now = self.clock.now()
            with self.store.transaction(now) as tx:
                current = next((z for z in tx.reads.zones() if z.id == zone.id), None)
                if current is None or current.tls_serial != identity.serial:
                    raise PermissionDenied("the zone server's certificate was replaced meanwhile")
                if not tx.mark_renewed(identity.serial, tls_record.serial):
                    raise PermissionDenied(f"certificate {identity.serial} was renewed already")
                intermediate = self._intermediate(zone, intermediate_csr)
                for old in tx.reads.keys(KeyKind.ZONE_INTERMEDIATE, (KeyState.ACTIVE,)):
                    if old.key_uri == zone.key_uri:
                        tx.set_key_state(old.fingerprint, KeyState.RETIRED)
                tx.insert_key(intermediate)
                tx.insert_certificate(tls_record)
                tx.on_commit(lambda: self.hierarchy.metrics.issued(KeyKind.ROOT, 2))
                tx.set_zone_certificate(zone.id, tls_record.serial)
                tx.zone_seen(zone.id)
                tx.audit(
                    identity.actor,
                    "zone_server.renew",
                    zone.name,
                    after_fingerprint=intermediate.fingerprint,
                    zone_id=zone.id,
                    intermediate=intermediate.fingerprint,
                    tls_serial=tls_record.serial,
                )
                self._publish(tx)
        root = self.hierarchy.issuing_root()
        return (intermediate.certificate_pem or "") + (root.certificate_pem or ""), tls

    def _renewed_already(
        self, zone: ZoneRecord, identity: Identity, intermediate_csr: bytes, tls_csr: bytes
    ) -> tuple[str, Issued] | None:
        """A renewal asked again after its answer was lost (from the certificate it
        replaced, for the same two new keys): the same intermediate and TLS certificate
        once more, nothing recorded. None for anything else (then PERMISSION_DENIED)."""
        current = self.store.certificate(zone.tls_serial or "")
        if zone.previous_tls_serial != identity.serial or current is None:
            return None
        intermediate = self.store.key(fingerprint(check_csr(intermediate_csr)[1]))
        if (
            current.revoked_at is not None
            or current.fingerprint != fingerprint(check_csr(tls_csr)[1])
            or intermediate is None
            or intermediate.key_uri != zone.key_uri
            or intermediate.state is not KeyState.ACTIVE
        ):
            return None
        root = self.store.key(intermediate.issuer_fingerprint or "")
        _, window = self.hierarchy.settings.rotation("ClientTLS")
        tls = Issued(
            chain_pem=current.certificate_pem,
            roots_pem=self.hierarchy.trusted_roots_pem().decode(),
            serial=current.serial,
            not_after=current.not_after,
            renew_after=renew_after(current.not_after, window),
        )
        chain = (intermediate.certificate_pem or "") + (root.certificate_pem or "" if root else "")
        return chain, tls

    # -- administration ------------------------------------------------------------------

    def list(self, include_revoked: bool = False) -> list[ZoneView]:
        views = []
        intermediates = self.store.keys(KeyKind.ZONE_INTERMEDIATE)
        # Read afresh, not from the cache: last_seen changes without a new generation.
        for zone in self.store.reads.zones(include_revoked):
            mine = [k for k in intermediates if k.key_uri == zone.key_uri]
            active = [k for k in mine if k.state == KeyState.ACTIVE]
            count = sum(self.store.reads.issued_by_count(k.fingerprint) for k in mine)
            views.append(ZoneView(zone, (active or mine)[-1] if mine else None, count))
        return views

    def get(self, name: str) -> ZoneView:
        if not name:
            raise InvalidArgument("name the zone server ('keyplane zones list' shows them)")
        for view in self.list(include_revoked=True):
            if view.zone.name == name and view.zone.revoked_at is None:
                return view
        revoked = [v for v in self.list(include_revoked=True) if v.zone.name == name]
        if revoked:
            return revoked[-1]
        raise NotFound(f"no zone server is named {name!r} ('keyplane zones list' shows them)")

    def revoke(self, actor: str, name: str, reason: str, confirm: bool) -> ZoneView:
        """Revoke a zone for good: its intermediates, everything they issued and its own
        certificates, published in the same transaction."""
        reason = parse_reason(reason)
        if not confirm:
            raise ConfirmationRequired(
                "revoking a zone server revokes its intermediate and every certificate it "
                "issued, and its agents must enroll again; confirm it (--yes)"
            )
        with self.hierarchy.lock:
            zone = next((z for z in self.store.zones() if z.name == name), None)
            if zone is None:
                raise NotFound(f"no live zone server is named {name!r}")
            because = f"zone server {name} revoked: {reason}"
            # The zone's own certificates: the reason given, cessationOfOperation if none;
            # what its intermediates issued: cACompromise if the zone was compromised.
            code = crl.reason_code_of(reason) or crl.CESSATION_OF_OPERATION
            inherited = crl.inherited_reason(code, crl.CESSATION_OF_OPERATION)
            try:
                with self.store.transaction(self.clock.now()) as tx:
                    tx.revoke_zone(zone.id, actor, reason)
                    revoked = 0
                    for key in tx.reads.keys(KeyKind.ZONE_INTERMEDIATE, LIVE_STATES):
                        if key.key_uri == zone.key_uri:
                            tx.revoke_key(
                                key.fingerprint, KeyKind.ZONE_INTERMEDIATE, actor, because, code
                            )
                            revoked += tx.revoke_certificates_issued_by(
                                key.fingerprint, actor, because, inherited
                            )
                    for serial in (zone.tls_serial, zone.previous_tls_serial):
                        if serial and tx.revoke_certificate(serial, actor, because, code):
                            revoked += 1
                    tx.audit(
                        actor,
                        "zone_server.revoke",
                        name,
                        zone_id=zone.id,
                        reason=reason,
                        certificates=revoked,
                    )
                    self.hierarchy.trust.publish_in(tx, actor)
            except BackendError as exc:
                raise Unavailable(
                    f"zone server {name} was not revoked: the trust state that publishes "
                    f"the revocation could not be signed ({exc}); nothing changed, try again"
                ) from None
        return next(v for v in self.list(include_revoked=True) if v.zone.id == zone.id)
