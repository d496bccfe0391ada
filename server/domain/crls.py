"""The server's CRLs: one per CA it holds (every root and every intermediate TLS key not
expired), signed by that CA through the backend facade, kept in the state DB, and signed
anew in the very transaction that revokes something under it (a revocation whose CRL
cannot be signed does not happen) or once half its life is gone. Zone servers send the
CRLs of their own intermediates here too (`accept_zone_crl`), so that one base URL
serves every CRL of the hierarchy."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyplane.plugins.manager import KeyBackends
from keyplane.server.domain import certs, crl
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.settings import Settings
from keyplane.server.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from keyplane.server.kinds import LIVE_STATES, KeyKind, KeyState
from keyplane.server.store import CrlRecord, KeyRecord, RevokedEntry, StateStore, Transaction
from keyplane.server.store.reads import Reads
from keyplane.server.store.records import ts

log = logging.getLogger(__name__)

# The kinds of key whose CRL this server signs.
SIGNING_KINDS = (KeyKind.ROOT, KeyKind.INTERMEDIATE_TLS)
MAX_CRL_BYTES = 4 * 1024 * 1024
# How far a zone's CRL may claim to be ahead of the server's clock.
CLOCK_SKEW = datetime.timedelta(minutes=5)


def live_entries(found: Sequence[RevokedEntry], now: datetime.datetime) -> list[crl.Entry]:
    """The entries a CRL lists: revoked certificates that have not expired (RFC 5280
    lets an expired one go)."""
    entries = []
    for row in found:
        if row.not_after is not None and row.not_after <= now:
            continue
        serial = row.serial
        if serial is None:
            serial = certs.serial_hex(certs.load_pem(row.certificate_pem or ""))
        entries.append(crl.Entry(serial, row.revoked_at, row.reason_code or crl.UNSPECIFIED))
    return entries


class CrlPublisher:
    """Signs, stores and serves the CRLs of the server's CAs."""

    def __init__(
        self, store: StateStore, backends: KeyBackends, settings: Settings, clock: Clock
    ) -> None:
        self.store = store
        self.backends = backends
        self.settings = settings
        self.clock = clock

    # -- what certificates name -------------------------------------------------------

    def url_for(self, issuer_fingerprint: str) -> str | None:
        """The distribution point a certificate from this issuer carries (None: no
        PKICRLBaseURL set)."""
        return crl.crl_url(self.settings.value(crl.CRL_BASE_URL_SETTING), issuer_fingerprint)

    # -- signing --------------------------------------------------------------------------

    def _signers(self, reads: Reads, now: datetime.datetime) -> list[KeyRecord]:
        """The CAs whose CRL this server signs: roots and intermediates not revoked and
        not expired, and one revoked in this very transaction (its last CRL, listing
        everything that went with it, before its key is destroyed)."""
        at = ts(now)
        found = []
        for kind in SIGNING_KINDS:
            for record in reads.keys(kind):
                if record.certificate_pem is None:
                    continue
                if record.not_after is not None and record.not_after <= now:
                    continue
                if record.state in LIVE_STATES or (
                    record.state == KeyState.REVOKED and ts(record.revoked_at) == at
                ):
                    found.append(record)
        return found

    def refresh_in(self, tx: Transaction, actor: str) -> list[int]:
        """Sign anew, inside `tx`, the CRL of each CA whose revoked set changed (as `tx`
        has it so far) or that is past half its life; the CRL numbers signed. A backend
        that cannot sign raises, and `tx` rolls back with whatever it revoked."""
        now = tx.now
        hours = int(self.settings.value(crl.CRL_VALIDITY_SETTING))
        stored = {r.issuer_fingerprint: r for r in tx.reads.crls()}
        signed = []
        for ca in self._signers(tx.reads, now):
            entries = live_entries(tx.reads.revoked_under(ca.fingerprint), now)
            digest = crl.digest(ca.fingerprint, entries, hours)
            old = stored.get(ca.fingerprint)
            if (
                old is not None
                and old.content_digest == digest
                and not crl.due(old.this_update, old.next_update, now)
            ):
                continue
            number = crl.next_number(old.crl_number if old else None, now)
            next_update = now + datetime.timedelta(hours=hours)
            der = crl.build(
                self.backends.private_key(ca.key_uri),
                certs.load_pem(ca.certificate_pem or ""),
                entries,
                number,
                now,
                next_update,
            )
            tx.put_crl(CrlRecord(ca.fingerprint, number, digest, now, next_update, der))
            tx.audit(
                actor,
                "crl.sign",
                ca.fingerprint,
                crl_number=number,
                entries=len(entries),
                next_update=next_update.isoformat(),
            )
            signed.append(number)
        return signed

    # -- what is served -----------------------------------------------------------------

    def served(self, issuer_fingerprint: str) -> CrlRecord | None:
        """The newest CRL of the CA with this fingerprint, if there is one."""
        return self.store.memo(("crls",), self._by_issuer).get(issuer_fingerprint)

    def _by_issuer(self) -> dict[str, CrlRecord]:
        return {r.issuer_fingerprint: r for r in self.store.reads.crls()}

    # -- zones' CRLs ----------------------------------------------------------------------

    def accept_zone_crl(
        self, tx: Transaction, actor: str, intermediates: Sequence[KeyRecord], data: bytes
    ) -> CrlRecord:
        """Keep a CRL a zone signed with one of its live `intermediates`: it must verify
        under that intermediate's key, carry a CRL number above the one kept, have a
        sane thisUpdate and nextUpdate, and list every certificate of that issuer the
        server knows to be revoked (a zone cannot leave one out)."""
        if len(data) > MAX_CRL_BYTES:
            raise InvalidArgument(f"the CRL is larger than {MAX_CRL_BYTES} bytes")
        try:
            parsed = x509.load_der_x509_crl(data)
            number = parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except (ValueError, x509.ExtensionNotFound):
            raise InvalidArgument("not a DER X.509 CRL with a CRL number") from None
        issuer = next((k for k in intermediates if _signed_by(parsed, k)), None)
        if issuer is None:
            raise PermissionDenied(
                "the CRL is not signed by a live intermediate of the calling zone server"
            )
        now = tx.now
        this_update = parsed.last_update_utc
        next_update = parsed.next_update_utc
        if next_update is None or this_update > now + CLOCK_SKEW or next_update <= now:
            raise InvalidArgument("the CRL's thisUpdate is in the future or it has expired")
        if next_update - this_update > datetime.timedelta(hours=crl.MAX_VALIDITY_HOURS):
            raise InvalidArgument(f"a CRL is valid for at most {crl.MAX_VALIDITY_HOURS} hours")
        listed = {f"{r.serial_number:032x}" for r in parsed}
        missing = [
            e.serial
            for e in live_entries(tx.reads.revoked_under(issuer.fingerprint), now)
            if e.serial not in listed
        ]
        if missing:
            raise FailedPrecondition(
                f"the CRL leaves out {len(missing)} revoked certificate(s) of its issuer, "
                f"such as {missing[0]}: fetch the revocations again and sign a new CRL"
            )
        digest = crl.digest(issuer.fingerprint, [], 0) + ":" + str(len(listed))
        record = CrlRecord(issuer.fingerprint, number, digest, this_update, next_update, data)
        if not tx.put_crl(record):
            raise FailedPrecondition(
                f"CRL number {number} is not above the last one kept for this issuer; "
                "a CRL number is never reused"
            )
        tx.audit(actor, "crl.publish", issuer.fingerprint, crl_number=number, entries=len(listed))
        return record


def _signed_by(parsed: x509.CertificateRevocationList, key: KeyRecord) -> bool:
    """Whether the key of this intermediate record signed the CRL."""
    if key.certificate_pem is None:
        return False
    cert = certs.load_pem(key.certificate_pem)
    if parsed.issuer != cert.subject:
        return False
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    try:
        return parsed.is_signature_valid(public_key)
    except (InvalidSignature, TypeError, ValueError):
        return False
