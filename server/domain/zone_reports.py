"""What a zone server records at its server: the agent certificates its own
intermediates issued (ReportIssuedCertificates, and RedeemEnrollmentToken with the
token use it spends), which certificate each renewal renews, and when it saw its agents.
A zone names only certificates of its own: anything else refuses the whole report."""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from keyplane.server.domain import authority, certs
from keyplane.server.domain.der import UNPARSED
from keyplane.server.domain.enrollment import key_in_use
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.tokens import UNUSABLE
from keyplane.server.errors import AlreadyExists, InvalidArgument, PermissionDenied, Unauthenticated
from keyplane.server.kinds import LIVE_STATES, KeyKind, Role
from keyplane.server.store import KeyRecord, Transaction, ZoneRecord, certificate_row

if TYPE_CHECKING:
    from keyplane.server.domain.zones import Zones

MAX_REPORT = 1000
MAX_SIGHTINGS = 10_000
_SERIAL = re.compile(r"[0-9a-f]{1,64}")


def _serial(text: str, what: str) -> str:
    """A certificate serial as the server records it (lowercase hex, 32 digits at least)."""
    serial = text.strip().lower()
    if not _SERIAL.fullmatch(serial):
        raise InvalidArgument(f"{what} must be a serial in hex, not {text[:80]!r}")
    return serial.rjust(32, "0")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class ZoneReports:
    """The records of one server's zones (Zones.reports)."""

    def __init__(self, zones: Zones) -> None:
        self.zones = zones
        self.store = zones.store
        self.clock = zones.clock

    def rows(
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
            except UNPARSED:
                raise InvalidArgument("a reported certificate does not parse") from None
            issuer = next(
                (k for k, c in by_subject.get(cert.issuer, []) if _signed_by(cert, c)), None
            )
            if issuer is None:
                raise InvalidArgument(
                    "a reported certificate was not issued by this zone server's intermediate"
                )
            try:
                roles = certs.roles_of(cert)
                record = certs.record_of(cert, Role.AGENT, issuer.fingerprint, now)
            except UNPARSED:
                # The zone's intermediate signs whatever the zone likes: a key that does
                # not parse, an extension twice.
                raise InvalidArgument(
                    "a reported certificate's key, subject or extensions do not parse"
                ) from None
            authority.check_zone_report(component, roles)
            rows.append(certificate_row(record, token_hash or None))
        return rows

    def redeem_token_pending(
        self, identity: Identity, token: str, subject: str, certificate_der: bytes
    ) -> Future[object]:
        """Spend one use of an agent token presented to a zone server and record the
        certificate the zone issued for it, in one transaction, committed with other
        requests' work; the future completes once it is durable (or fails when the token
        was spent meanwhile, or the key was certified before: then nothing is recorded)."""
        zone = self.zones.current_zone(identity)
        digest = self.zones.tokens.check(token, Role.AGENT)
        if not certificate_der:
            raise InvalidArgument(
                "RedeemEnrollmentToken needs the certificate the zone server issued (DER)"
            )
        rows = self.rows(zone, [(certificate_der, Role.AGENT)], digest)
        serial, key = str(rows[0][0]), str(rows[0][1])
        # The audit log names what the certificate says, so what the zone says must be its
        # common name (the certificate parsed in rows; its subject also has OU and O).
        names = x509.load_der_x509_certificate(certificate_der).subject
        common = [str(a.value) for a in names.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        if common != [subject]:
            raise InvalidArgument(
                "the subject must be the common name of the certificate the zone server "
                f"issued ({', '.join(common)[:200]!r}), not {subject[:200]!r}"
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

    def _own_intermediates(self, zone: ZoneRecord) -> list[str]:
        """Every intermediate this zone has had (any state): what it issued is its own."""
        return sorted(
            k.fingerprint
            for k in self.store.keys(KeyKind.ZONE_INTERMEDIATE)
            if k.key_uri == zone.key_uri
        )

    def record_reported(
        self,
        identity: Identity,
        reports: Sequence[tuple[bytes, str, str]],
        sightings: Sequence[tuple[str, datetime.datetime]] = (),
    ) -> int:
        """Record what a zone issued ((DER, component, the serial a renewal renews)) and
        when it saw its agents; how many certificates were new. Renewals and sightings
        may name only certificates this zone's own intermediates issued: one of the
        server's or another zone's refuses the whole report (PERMISSION_DENIED)."""
        zone = self.zones.current_zone(identity)
        if len(sightings) > MAX_SIGHTINGS:
            raise InvalidArgument(f"a report holds at most {MAX_SIGHTINGS} sightings")
        rows = self.rows(zone, [(der, component) for der, component, _ in reports])
        renewals = [
            (str(row[0]), _serial(renews, "renews_serial"))
            for row, (_, _, renews) in zip(rows, reports, strict=True)
            if renews
        ]
        now = self.clock.now()
        seen = [(_serial(serial, "a sighting's serial"), min(at, now)) for serial, at in sightings]
        own = self._own_intermediates(zone)
        named = [old for _, old in renewals] + [serial for serial, _ in seen]
        others = sorted(
            serial
            for serial, issuer in self.store.reads.coverage.issuers_of(named).items()
            if issuer not in own
        )
        if others:
            raise PermissionDenied(
                f"certificate {others[0]} was not issued by this zone server: a zone server "
                "reports renewals and sightings of its own certificates only; nothing of "
                "the report was recorded"
            )
        with self.store.transaction(now) as tx:
            # A certificate reported again (after a lost answer) is recorded once.
            recorded = tx.insert_certificates_if_new(rows)
            for successor, renewed in renewals:
                # Checked again here, in SQL: only what this zone's intermediates issued.
                tx.mark_renewed_within(renewed, successor, own)
            tx.record_sightings(seen, own)
            tx.zone_seen(zone.id)
            if recorded:
                tx.audit(identity.actor, "certificate.report", zone.name, count=recorded)
        return recorded
