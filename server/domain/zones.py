"""Zone servers: enrolling one (a zone-server token), renewing it (its current
certificate), what it may record (the agent certificates its own intermediate issued,
with the token uses they spend), listing them, and revoking one with everything it
issued.

A zone's identity is its enrolled key and certificate, never its name: a name is taken
while its zone is live, RenewZoneServer renews only the zone whose current certificate
the caller holds, and every revocation is published in the same transaction.
"""

from __future__ import annotations

import ipaddress
from concurrent.futures import Future
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyplane.plugins.errors import BackendError
from keyplane.plugins.keys import algorithm_of, fingerprint
from keyplane.server.domain import authority, certs
from keyplane.server.domain.csr_policy import check_csr
from keyplane.server.domain.enrollment import Issued, key_in_use, renew_after
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.inputs import parse_reason
from keyplane.server.domain.roots import SERVER_ACTOR
from keyplane.server.domain.tokens import UNUSABLE, Tokens
from keyplane.server.domain.zone_names import parse_listen, parse_zone_name
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

MAX_REPORT = 1000
ZONE_INTERMEDIATE_VALIDITY_KIND = "IntermediateTLS"


@dataclass(frozen=True)
class ZoneView:
    """A zone as ListZoneServers shows it."""

    zone: ZoneRecord
    intermediate: KeyRecord | None
    certificates: int


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class Zones:
    """Zone servers, on behalf of the hierarchy."""

    def __init__(self, hierarchy: Hierarchy, tokens: Tokens) -> None:
        self.hierarchy = hierarchy
        self.store = hierarchy.store
        self.clock = hierarchy.clock
        self.tokens = tokens

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

    # -- what a zone records -------------------------------------------------------------

    def _rows(
        self, zone: ZoneRecord, reports: list[tuple[bytes, str]], token_hash: str = ""
    ) -> list[tuple[object, ...]]:
        """Certificate rows for what a zone says it issued: agent certificates its own
        live intermediates signed; INVALID_ARGUMENT or PERMISSION_DENIED otherwise."""
        if len(reports) > MAX_REPORT:
            raise InvalidArgument(f"a report holds at most {MAX_REPORT} certificates")
        # The zone's intermediates by subject, parsed once per report, not per certificate.
        by_subject: dict[x509.Name, list[tuple[KeyRecord, x509.Certificate]]] = {}
        for k in self.store.keys(KeyKind.ZONE_INTERMEDIATE, LIVE_STATES):
            if k.key_uri == zone.key_uri:
                parsed = certs.load_pem(k.certificate_pem or "")
                by_subject.setdefault(parsed.subject, []).append((k, parsed))
        now = self.clock.now()
        rows = []
        for der, component in reports:
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                raise InvalidArgument("a reported certificate does not parse") from None
            issuer = next(
                (k for k, c in by_subject.get(cert.issuer, []) if _signed_by(cert, c)), None
            )
            if issuer is None:
                raise InvalidArgument(
                    "a reported certificate was not issued by this zone server's intermediate"
                )
            authority.check_zone_report(component, certs.roles_of(cert))
            record = certs.record_of(cert, Role.AGENT, issuer.fingerprint, now)
            rows.append(certificate_row(record, token_hash or None))
        return rows

    def redeem_token_pending(
        self, identity: Identity, token: str, subject: str, certificate_der: bytes
    ) -> Future[object]:
        """Spend one use of an agent token presented to a zone server and record the
        certificate the zone issued for it, in one transaction, committed with other
        requests' work; the future completes once it is durable (or fails when the token
        was spent meanwhile, or the key was certified before: then nothing is recorded)."""
        zone = self.current_zone(identity)
        digest = self.tokens.check(token, Role.AGENT)
        if not certificate_der:
            raise InvalidArgument(
                "RedeemEnrollmentToken needs the certificate the zone server issued (DER)"
            )
        rows = self._rows(zone, [(certificate_der, Role.AGENT)], digest)
        serial, key = str(rows[0][0]), str(rows[0][1])
        # The audit log names what the certificate says, so what the zone says must be it
        # (the common name: the subject also holds the O and OU keyplane puts there).
        names = x509.load_der_x509_certificate(certificate_der).subject.get_attributes_for_oid(
            x509.NameOID.COMMON_NAME
        )
        common_name = str(names[0].value) if names else ""
        if common_name != subject:
            raise InvalidArgument(
                "the subject must be the common name of the certificate the zone server "
                f"issued ({common_name[:200]!r}), not {subject[:200]!r}"
            )
        found = self.store.certificates_for_key(key)
        if found:
            raise AlreadyExists(key_in_use(found))

        def spend(tx: Transaction) -> None:
            if digest and not tx.consume_token(digest, Role.AGENT):
                raise Unauthenticated(UNUSABLE)
            found = tx.reads.certificates_for_key(key)
            if found:
                raise AlreadyExists(key_in_use(found))
            tx.insert_certificates(rows)
            tx.zone_seen(zone.id)
            tx.audit(
                identity.actor,
                "token.redeem" if digest else "certificate.report",
                digest[:16] if digest else zone.name,
                subject=subject,
                serial=serial,
            )

        return self.store.group_commit_pending(self.clock.now(), spend)

    def record_reported(self, identity: Identity, reports: list[tuple[bytes, str]]) -> int:
        zone = self.current_zone(identity)
        rows = self._rows(zone, reports)
        with self.store.transaction(self.clock.now()) as tx:
            # A certificate reported again (after a lost answer) is recorded once.
            recorded = tx.insert_certificates_if_new(rows)
            tx.zone_seen(zone.id)
            if recorded:
                tx.audit(identity.actor, "certificate.report", zone.name, count=recorded)
        return recorded

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
            try:
                with self.store.transaction(self.clock.now()) as tx:
                    tx.revoke_zone(zone.id, actor, reason)
                    revoked = 0
                    for key in tx.reads.keys(KeyKind.ZONE_INTERMEDIATE, LIVE_STATES):
                        if key.key_uri == zone.key_uri:
                            tx.revoke_key(
                                key.fingerprint, KeyKind.ZONE_INTERMEDIATE, actor, because
                            )
                            revoked += tx.revoke_certificates_issued_by(
                                key.fingerprint, actor, because
                            )
                    for serial in (zone.tls_serial, zone.previous_tls_serial):
                        if serial and tx.revoke_certificate(serial, actor, because):
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
