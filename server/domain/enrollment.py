"""Enrollment at the server: agent certificates from its intermediate (Enroll,
EnrollBatch, Renew, RenewWithProof), the record of every certificate issued, and
revoking one.

Every request is checked before anything is stored (the token first, then the CSR);
a refused request stores nothing, and a token use is spent in the same transaction
that records its certificate. A key is certified once: a CSR for a key that holds or
ever held a certificate here gets ALREADY_EXISTS, and a certificate renews once.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from cryptography import x509

from keyplane.plugins.errors import BackendError
from keyplane.plugins.keys import BackendPrivateKey, fingerprint
from keyplane.server.domain import authority, certs, crl, renewal
from keyplane.server.domain.csr_policy import (
    SubjectKey,
    check_csr,
    check_public_key,
    check_request,
    parse_csr,
)
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.inputs import parse_reason
from keyplane.server.domain.tokens import UNUSABLE, Tokens
from keyplane.server.errors import (
    AlreadyExists,
    AlreadyRevoked,
    ConfirmationRequired,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RevokesCaller,
    Unauthenticated,
    Unavailable,
)
from keyplane.server.kinds import HUMAN_ROLES, KeyKind, Role
from keyplane.server.store import (
    AuditEntry,
    CertificateRecord,
    KeyRecord,
    Transaction,
    certificate_row,
)

MAX_BATCH = 1000
# The longest text ListCertificates searches for.
MAX_SEARCH = 128
_RANDOM = secrets.SystemRandom()


@dataclass(frozen=True)
class Issued:
    """A certificate issued to a component."""

    chain_pem: str
    roots_pem: str
    serial: str
    not_after: datetime.datetime
    renew_after: datetime.datetime


@dataclass(frozen=True)
class _ClientIssuer:
    record: KeyRecord
    key: BackendPrivateKey
    certificate: x509.Certificate
    roots_pem: str


def renew_after(not_after: datetime.datetime, window: datetime.timedelta) -> datetime.datetime:
    """When a client should renew: inside its renewal window, spread over the window's
    first half so that a fleet does not renew at once."""
    jitter = _RANDOM.uniform(0, window.total_seconds() / 2)
    return not_after - window + datetime.timedelta(seconds=jitter)


def key_in_use(records: list[CertificateRecord]) -> str:
    """Why a key that already has certificates cannot get another one."""
    revoked = [r for r in records if r.revoked_at is not None]
    if revoked:
        return (
            f"this key's certificate {revoked[0].serial} was revoked; a revoked key never "
            "gets a certificate again: make a new key"
        )
    return (
        f"this key is enrolled already (certificate {records[0].serial}); a key is "
        "certified once: make a new key"
    )


def check_revocation(
    record: CertificateRecord, confirm: bool, force: bool, caller: Identity | None
) -> None:
    """The rule for revoking a certificate by hand (RevokeCertificate, RevokeIdentity):
    a person's credential needs the admin role and an explicit confirmation, and the
    credential the call is made with needs force as well."""
    if record.role in HUMAN_ROLES:
        if caller is not None and Role.ADMIN not in caller.roles:
            # People's credentials are identities, which only admins manage.
            raise PermissionDenied(
                f"{record.serial} is a person's credential ({record.role}: "
                f"{record.subject}); revoking it needs the admin role"
            )
        if not confirm:
            raise ConfirmationRequired(
                f"{record.serial} is a person's credential ({record.role}: "
                f"{record.subject}); confirm it explicitly (--yes on the command line)"
            )
    if caller is not None and caller.serial == record.serial and not force:
        raise RevokesCaller(
            f"{record.serial} is the credential this call is made with: revoking it locks "
            "you out; use another credential, or confirm with --force"
        )


# How far a revocation follows renewals (a chain is one certificate per renewal window;
# the bound only guards against a cycle that the schema cannot make).
MAX_SUCCESSORS = 10_000


def _revoke_successors(
    tx: Transaction,
    record: CertificateRecord | None,
    actor: str,
    reason: str,
    code: int,
    action: str,
) -> None:
    """Revoke what `record` was renewed into, and on down the chain: whoever held the
    revoked key may have renewed it a moment before (an operator revokes the serial they
    saw), and a renewal must not carry a revoked credential forward."""
    seen = {record.serial} if record is not None else set()
    while record is not None and record.renewed_to and len(seen) < MAX_SUCCESSORS:
        successor = tx.reads.certificate(record.renewed_to)
        if successor is None or successor.serial in seen:
            return
        seen.add(successor.serial)
        if tx.revoke_certificate(successor.serial, actor, reason, code):
            tx.audit(
                actor,
                action,
                successor.serial,
                before_fingerprint=successor.fingerprint,
                reason=reason,
                renewed_from=record.serial,
            )
        record = successor


def revoke_published(
    hierarchy: Hierarchy,
    actor: str,
    serials: Sequence[str],
    reason: str,
    action: str,
    **details: object,
) -> None:
    """Revoke certificates, audit each, and publish the trust-state version that carries
    them, in one transaction: acknowledged only once published, and if the trust state
    cannot be signed nothing is revoked (UNAVAILABLE). Call with the hierarchy's lock."""
    try:
        with hierarchy.store.transaction(hierarchy.clock.now()) as tx:
            code = crl.reason_code_of(reason)
            for serial in serials:
                record = tx.reads.certificate(serial)
                tx.revoke_certificate(serial, actor, reason, code)
                tx.audit(
                    actor,
                    action,
                    serial,
                    before_fingerprint=record.fingerprint if record is not None else "",
                    reason=reason,
                    **details,  # type: ignore[arg-type]
                )
                _revoke_successors(tx, record, actor, reason, code, action)
            hierarchy.trust.publish_in(tx, actor)
    except BackendError as exc:
        what = f"certificate {serials[0]} was" if len(serials) == 1 else "the certificates were"
        raise Unavailable(
            f"{what} not revoked: the trust state that publishes the revocation could "
            f"not be signed ({exc}); nothing changed, try again"
        ) from None


class Enrollment:
    """Issues and tracks component certificates on behalf of the hierarchy."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self.store = hierarchy.store
        self.clock = hierarchy.clock
        self.tokens = Tokens(hierarchy.store, hierarchy.settings, hierarchy.clock)

    # -- issuing -------------------------------------------------------------------------

    def _client_issuer(self) -> _ClientIssuer:
        """The key that signs agent certificates now, with what every answer carries;
        worked out once per change to the hierarchy, not per request."""

        def compute() -> _ClientIssuer:
            record = self.hierarchy.active_key(KeyKind.INTERMEDIATE_TLS)
            return _ClientIssuer(
                record,
                self.hierarchy.backends.private_key(record.key_uri),
                certs.load_pem(record.certificate_pem or ""),
                self.hierarchy.trusted_roots_pem().decode(),
            )

        return self.store.memo(("enrollment.client_issuer",), compute)

    def _refuse_known_key(self, key: SubjectKey) -> str:
        """The key's fingerprint; ALREADY_EXISTS if it was ever certified here."""
        fp = fingerprint(key)
        found = self.store.certificates_for_key(fp)
        if found:
            raise AlreadyExists(key_in_use(found))
        return fp

    def _build(self, key: SubjectKey, common_name: str) -> tuple[Issued, CertificateRecord]:
        """An agent certificate from the server's intermediate."""
        signer = self._client_issuer()
        now = self.clock.now()
        validity, window = self.hierarchy.settings.rotation("ClientTLS")
        record = certs.client_record(
            signer.key,
            signer.certificate,
            signer.record.fingerprint,
            key,
            common_name,
            Role.AGENT,
            now,
            validity,
            names=[authority.AGENT_DNS_NAME],
            crl_url=self.hierarchy.crls.url_for(signer.record.fingerprint),
        )
        return Issued(
            chain_pem=record.certificate_pem + (signer.record.certificate_pem or ""),
            roots_pem=signer.roots_pem,
            serial=record.serial,
            not_after=record.not_after,
            renew_after=renew_after(record.not_after, window),
        ), record

    def _record_pending(
        self,
        actor: str,
        token_digest: str | None,
        records: list[CertificateRecord],
        renews: str | None = None,
        renews_peer: str = "",
    ) -> Future[object]:
        """Spend a token use per certificate (if a token was given) and record them, all
        or nothing, committed with other requests' work in one fsync; the future
        completes once that is durable. `renews` is the serial a renewal replaces: it
        must not have been renewed before."""
        # The rows are made here, so the committer thread only runs the statements.
        rows = [certificate_row(record, token_digest) for record in records]
        keys = [record.fingerprint for record in records]
        audit = [
            AuditEntry(
                actor,
                "certificate.issue",
                record.serial,
                json.dumps(
                    {
                        "issuer": record.issuer_fingerprint,
                        "role": record.role,
                        "subject": record.subject,
                        **({"renews": renews} if renews else {}),
                        **({"renews_for_peer": renews_peer} if renews_peer else {}),
                    }
                ),
                after_fingerprint=record.fingerprint,
            )
            for record in records
        ]

        metrics = self.hierarchy.metrics

        def issued() -> None:
            metrics.issued(KeyKind.INTERMEDIATE_TLS, len(rows))

        def record_issue(tx: Transaction) -> None:
            if token_digest and not tx.consume_token(token_digest, Role.AGENT, uses=len(records)):
                raise Unauthenticated(
                    UNUSABLE
                    if len(records) == 1
                    else f"the enrollment token is unknown, expired or revoked, or has fewer than "
                    f"{len(records)} uses left (one per CSR)"
                )
            for fp in keys:  # again here: a concurrent request may have certified it
                found = tx.reads.certificates_for_key(fp)
                if found:
                    raise AlreadyExists(key_in_use(found))
            if (
                renews is not None
                and not renews_peer
                and not tx.mark_renewed(renews, records[0].serial)
            ):
                raise PermissionDenied(
                    f"certificate {renews} was renewed already; a certificate renews once "
                    "(renew from the newest one, or enroll again with a new token)"
                )
            tx.insert_certificates(rows)
            if (
                renews is not None
                and renews_peer
                and not tx.peers.mark_peer_renewed(renews, records[0].serial, renews_peer)
            ):
                raise PermissionDenied(
                    f"certificate {renews} (issued by the trusted peer {renews_peer}) was "
                    "renewed here already; a certificate renews once per server"
                )
            tx.on_commit(issued)
            tx.audit_many(audit)

        return self.store.group_commit_pending(records[0].issued_at, record_issue)

    def enroll(self, csr_data: bytes, token: str) -> Issued:
        issued, pending = self.enroll_pending(csr_data, token)
        pending.result()
        return issued

    def enroll_pending(self, csr_data: bytes, token: str) -> tuple[Issued, Future[object]]:
        with self.store.snapshot():
            digest = self.tokens.check(token, Role.AGENT)  # before the CSR is looked at
            csr = parse_csr(csr_data)
            key = check_public_key(csr)
            self._refuse_known_key(key)  # before its signature is verified: a replay is cheap
            common_name = check_request(csr)
            issued, record = self._build(key, common_name)
        pending = self._record_pending(f"enrollment ({common_name})", digest or None, [record])
        return issued, pending

    def enroll_batch_pending(
        self, csrs: Sequence[bytes], token: str
    ) -> tuple[list[Issued], Future[object]]:
        """EnrollBatch: every CSR checked as Enroll checks it, then all issued and
        recorded with one token use each, or none."""
        if not csrs:
            raise InvalidArgument("EnrollBatch needs at least one CSR")
        if len(csrs) > MAX_BATCH:
            raise InvalidArgument(
                f"EnrollBatch takes at most {MAX_BATCH} CSRs; this request has {len(csrs)}"
            )
        with self.store.snapshot():
            digest = self.tokens.check(token, Role.AGENT, needed=len(csrs))
            checked = []
            seen: set[str] = set()
            for index, data in enumerate(csrs):
                try:
                    csr = parse_csr(data)
                    key = check_public_key(csr)
                    fp = self._refuse_known_key(key)
                    common_name = check_request(csr)
                except (InvalidArgument, AlreadyExists) as exc:
                    raise type(exc)(f"csrs[{index}]: {exc}") from None
                if fp in seen:
                    raise AlreadyExists(f"csrs[{index}]: this key is in the batch twice")
                seen.add(fp)
                checked.append((key, common_name))
            built = [self._build(key, common_name) for key, common_name in checked]
        actor = f"enrollment batch ({len(built)} CSRs)"
        pending = self._record_pending(actor, digest or None, [r for _, r in built])
        return [issued for issued, _ in built], pending

    # -- renewal -------------------------------------------------------------------------

    def identity_from_chain(self, chain_pem: bytes) -> Identity:
        """The caller of RenewWithProof, from the certificate it sent: admitted as a
        mutual-TLS caller would be."""
        return self.hierarchy.admission.admit(renewal.presented_certificate(chain_pem))

    def check_proof(self, identity: Identity, csr: bytes, proof: bytes, proof_time: int) -> None:
        renewal.check_renewal_proof(
            identity.certificate,
            csr,
            proof,
            self.hierarchy.config.fqdn,
            proof_time,
            self.clock.now(),
        )
        self.hierarchy.sightings.seen(identity)

    def renew(self, identity: Identity, csr_data: bytes) -> Issued:
        issued, pending = self.renew_pending(identity, csr_data)
        pending.result()
        return issued

    def renew_pending(
        self, identity: Identity, csr_data: bytes, repeat: bool = False
    ) -> tuple[Issued, Future[object]]:
        """Renew for the key in the CSR. With `repeat` (Renew, over mutual TLS: only the
        key's holder can ask), a renewal asked again after its answer was lost gets the
        same certificate; RenewWithProof does not repeat, so a recorded request replays
        to nothing."""
        _, key, common_name = check_csr(csr_data)
        renewal.check_renewal(identity, key, common_name)
        if identity.issuer is KeyKind.ZONE_INTERMEDIATE:
            raise FailedPrecondition(
                "this certificate was issued by a zone server: renew it at that zone server "
                "(a certificate renews where its issuer lives)"
            )
        if identity.issuer is KeyKind.PEER_INTERMEDIATE:
            return self._renew_for_peer(identity, key, common_name, repeat)
        with self.store.snapshot():
            again = self._renewed_already(identity, key) if repeat else None
            if again is not None:
                done: Future[object] = Future()
                done.set_result(None)
                return again, done
            self._refuse_known_key(key)
            issued, record = self._build(key, common_name)
        return issued, self._record_pending(identity.actor, None, [record], identity.serial)

    def _renew_for_peer(
        self, identity: Identity, key: SubjectKey, common_name: str, repeat: bool
    ) -> tuple[Issued, Future[object]]:
        """A trusted peer's agent renews here (active/active: its server does not
        answer): from this server's intermediate, recorded here, once per certificate at
        this server. With `repeat`, a renewal asked again gets the same certificate."""
        issuer = self.hierarchy.admission.peers.issuer_of(identity.certificate)
        if issuer is None:
            raise PermissionDenied("the certificate's issuer is no longer a trusted peer's")
        with self.store.snapshot():
            done = self.store.reads.peers.peer_renewal(identity.serial)
            if done is not None:
                successor = self.store.certificate(done[0])
                if (
                    not repeat
                    or successor is None
                    or successor.fingerprint != fingerprint(key)
                    or successor.revoked_at is not None
                ):
                    raise PermissionDenied(
                        f"certificate {identity.serial} was renewed here already; a "
                        "certificate renews once per server (renew from the newest one)"
                    )
                finished: Future[object] = Future()
                finished.set_result(None)
                return self._issued_again(successor), finished
            self._refuse_known_key(key)
            issued, record = self._build(key, common_name)
        pending = self._record_pending(
            identity.actor, None, [record], identity.serial, renews_peer=issuer.peer
        )
        return issued, pending

    def _issued_again(self, successor: CertificateRecord) -> Issued:
        """A certificate issued before, as a renewal answers it."""
        issuer = self.store.key(successor.issuer_fingerprint)
        issuer_pem = (issuer.certificate_pem or "") if issuer is not None else ""
        _, window = self.hierarchy.settings.rotation("ClientTLS")
        return Issued(
            chain_pem=successor.certificate_pem + issuer_pem,
            roots_pem=self.hierarchy.trusted_roots_pem().decode(),
            serial=successor.serial,
            not_after=successor.not_after,
            renew_after=renew_after(successor.not_after, window),
        )

    def _renewed_already(self, identity: Identity, key: SubjectKey) -> Issued | None:
        """A renewal asked again after its answer was lost (the same certificate, a CSR
        for the same new key): the certificate it made, once more; nothing new is
        recorded. For any other key, PERMISSION_DENIED: a certificate renews once."""
        record = self.store.certificate(identity.serial)
        if record is None or record.renewed_to is None:
            return None
        successor = self.store.certificate(record.renewed_to)
        if successor is None or successor.fingerprint != fingerprint(key):
            raise PermissionDenied(
                f"certificate {identity.serial} was renewed already; a certificate renews once "
                "(renew from the newest one)"
            )
        if successor.revoked_at is not None:
            raise PermissionDenied(f"its renewed certificate {successor.serial} was revoked")
        issuer = self.store.key(successor.issuer_fingerprint)
        issuer_pem = (issuer.certificate_pem or "") if issuer is not None else ""
        _, window = self.hierarchy.settings.rotation("ClientTLS")
        return Issued(
            chain_pem=successor.certificate_pem + issuer_pem,
            roots_pem=self.hierarchy.trusted_roots_pem().decode(),
            serial=successor.serial,
            not_after=successor.not_after,
            renew_after=renew_after(successor.not_after, window),
        )

    # -- the record ----------------------------------------------------------------------

    def certificates(self, component: str, limit: int, search: str = "") -> list[CertificateRecord]:
        limit = limit or 1000
        if not 1 <= limit <= 10000:
            raise InvalidArgument("page_size must be between 1 and 10000")
        roles = [r.value for r in Role]
        if component and component not in roles:
            # A typo would list nothing, which reads as "none issued".
            raise InvalidArgument(
                f"unknown component {component[:64]!r}; use one of: {', '.join(roles)}"
            )
        search = search.strip()
        if len(search) > MAX_SEARCH:
            raise InvalidArgument(f"search is at most {MAX_SEARCH} characters")
        return self.store.certificates(component or None, limit, search)

    def _key_with_serial(self, serial: str) -> KeyRecord | None:
        """The hierarchy key whose certificate has this serial (an intermediate...)."""

        def compute() -> dict[str, KeyRecord]:
            found = {}
            for kind in (
                KeyKind.INTERMEDIATE_TLS,
                KeyKind.ZONE_INTERMEDIATE,
                KeyKind.SERVER_TLS,
                KeyKind.MESSAGE_SIGNING,
            ):
                for record in self.store.keys(kind):
                    if record.certificate_pem:
                        found[certs.serial_hex(certs.load_pem(record.certificate_pem))] = record
            return found

        return self.store.memo(("enrollment.keys_by_serial",), compute).get(serial)

    def revoke_certificate(
        self,
        actor: str,
        serial: str,
        reason: str,
        confirm: bool = False,
        force: bool = False,
        caller: Identity | None = None,
    ) -> CertificateRecord:
        serial = serial.strip().lower().removeprefix("0x")
        if not re.fullmatch(r"[0-9a-f]{1,40}", serial):
            raise InvalidArgument("a serial number is hexadecimal (as 'keyplane certs list' shows)")
        serial = serial.rjust(32, "0")
        reason = parse_reason(reason or "revoked by an admin")
        with self.hierarchy.lock:
            record = self.store.certificate(serial)
            if record is None:
                key = self._key_with_serial(serial)
                if key is not None and key.kind == KeyKind.ZONE_INTERMEDIATE:
                    raise FailedPrecondition(
                        f"{serial} is the certificate of {key.name}; revoke the zone server "
                        "with 'keyplane zones revoke NAME', which revokes its intermediate "
                        "and everything it issued"
                    )
                if key is not None:
                    raise FailedPrecondition(
                        f"{serial} is the certificate of the server's {key.kind} key; rotate "
                        "it ('keyplane keys rotate') or revoke its root"
                    )
                raise NotFound(f"no certificate with serial {serial}")
            if record.revoked_at is not None:
                raise AlreadyRevoked(f"certificate {serial} is revoked already")
            if record.role == Role.ZONE_SERVER:
                raise FailedPrecondition(
                    f"{serial} is a zone server's certificate; revoke the zone server with "
                    "'keyplane zones revoke NAME', which revokes its intermediate and "
                    "everything it issued"
                )
            check_revocation(record, confirm, force, caller)
            revoke_published(self.hierarchy, actor, [serial], reason, "certificate.revoke")
        found = self.store.certificate(serial)
        assert found is not None  # noqa: S101
        return found
