"""Enrollment: tokens, CSR validation, client certificates, zone servers, init bundles.

Every request is validated before anything is stored; a refused request stores
nothing, and a token is spent in the same transaction that records the certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from keyplane.plugins.keys import BackendPrivateKey, KeyAlgorithm, algorithm_of, fingerprint
from keyplane.server.domain import certs
from keyplane.server.domain.hierarchy import SERVER_ACTOR, Hierarchy, parse_reason
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.trust import sign_with
from keyplane.server.errors import (
    AlreadyRevoked,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from keyplane.server.store import CertificateRecord, KeyRecord, Transaction, certificate_row
from keyplane.v1 import bundle_service_pb2, trust_state_pb2

MAX_CSR_BYTES = 64 * 1024
MAX_CHAIN_BYTES = 64 * 1024
# What a renewal proof signs before the CSR bytes (RenewWithProof).
RENEWAL_PROOF_CONTEXT = b"keyplane-renew-v1\0"
TOKEN_PREFIX = "kpt_"  # noqa: S105 - a marker, not a secret
ROLES = ("agent", "zone-server")
MAX_TOKEN_USES = 1_000_000
MAX_BATCH = 1000
MAX_TOKEN_TTL = datetime.timedelta(days=365)
BUNDLE_CONTEXT = b"keyplane-init-bundle-v1\0"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
ZONE_INTERMEDIATE_VALIDITY_KIND = "IntermediateTLS"
_RANDOM = secrets.SystemRandom()

SubjectKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A PKCS#10 request from PEM or DER; INVALID_ARGUMENT with the reason otherwise."""
    if not data:
        raise InvalidArgument("the CSR is empty")
    if len(data) > MAX_CSR_BYTES:
        raise InvalidArgument(f"the CSR is {len(data)} bytes; at most {MAX_CSR_BYTES} are accepted")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise InvalidArgument(f"the CSR does not parse as PEM or DER PKCS#10 ({exc})") from None
    return csr


def check_public_key(csr: x509.CertificateSigningRequest) -> SubjectKey:
    """The CSR's key if keyplane accepts it: EC P-256/P-384, RSA 2048-4096, Ed25519."""
    try:
        key = csr.public_key()
    except ValueError as exc:
        # cryptography refuses points that are not on the curve when it loads them.
        raise InvalidArgument(f"the CSR's public key is invalid ({exc})") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise InvalidArgument(f"EC curve {key.curve.name} is not accepted; use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        if not 2048 <= key.key_size <= 4096:
            raise InvalidArgument(
                f"RSA keys of {key.key_size} bits are not accepted; use 2048 to 4096 bits"
            )
        if numbers.e < 65537 or numbers.e % 2 == 0:
            raise InvalidArgument(
                f"RSA public exponent {numbers.e} is refused (small or even); use 65537"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise InvalidArgument(
        f"{type(key).__name__} keys are not accepted; use EC P-256/P-384, RSA 2048-4096 or Ed25519"
    )


def check_csr(data: bytes) -> tuple[x509.CertificateSigningRequest, SubjectKey, str]:
    """Parse and validate a CSR: (request, its key, its common name)."""
    csr = parse_csr(data)
    key = check_public_key(csr)
    if not csr.is_signature_valid:
        raise InvalidArgument("the CSR's signature does not verify (proof of possession)")
    subject = csr.subject  # built anew on every access: read it once
    names = subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if len(names) != 1:
        raise InvalidArgument("the CSR subject needs exactly one common name (CN)")
    common_name = str(names[0].value)
    if not _NAME.fullmatch(common_name):
        raise InvalidArgument(
            "the CSR common name must be 1-128 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    if len(subject) != 1:
        raise InvalidArgument("the CSR subject may hold only a common name (CN)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for entry in san:
            if not isinstance(entry, x509.DNSName) or not _HOSTNAME.fullmatch(entry.value):
                raise InvalidArgument(
                    "the CSR may ask only for DNS names in its SAN; roles and addresses "
                    "are assigned by the server"
                )
    return csr, key, common_name


def presented_certificate(chain_pem: bytes) -> x509.Certificate:
    """The leaf of a certificate chain sent in a request (RenewWithProof)."""
    if not chain_pem:
        raise Unauthenticated("RenewWithProof needs the current certificate chain (PEM)")
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise InvalidArgument(f"the certificate chain is over {MAX_CHAIN_BYTES} bytes")
    try:
        return x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError:
        raise InvalidArgument("the certificate chain is not PEM certificates") from None


def check_renewal_proof(cert: x509.Certificate, csr_data: bytes, proof: bytes) -> None:
    """That `proof` is the certificate key's signature over RENEWAL_PROOF_CONTEXT + the
    CSR bytes: ECDSA with SHA-256 (SHA-384 for P-384), RSA PKCS#1 v1.5 with SHA-256, or
    Ed25519. UNAUTHENTICATED otherwise."""
    key = cert.public_key()
    message = RENEWAL_PROOF_CONTEXT + csr_data
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            digest = hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256()
            key.verify(proof, message, ec.ECDSA(digest))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(proof, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(proof, message)
        else:
            raise Unauthenticated("the certificate's key type cannot sign a renewal proof")
    except InvalidSignature:
        raise Unauthenticated(
            "the renewal proof does not verify with the certificate's key: sign "
            "'keyplane-renew-v1\\0' followed by the CSR bytes, as sent, with the current key"
        ) from None


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


@dataclass(frozen=True)
class Token:
    """A new enrollment token; the secret is returned once."""

    token: str
    token_id: str
    role: str
    uses: int
    expires_at: datetime.datetime


class Enrollment:
    """Issues and tracks component certificates on behalf of the hierarchy."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self.store = hierarchy.store
        self.clock = hierarchy.clock

    # -- tokens --------------------------------------------------------------------------

    def create_token(self, actor: str, uses: int, ttl_seconds: int, role: str) -> Token:
        role = role or "agent"
        if role not in ROLES:
            raise InvalidArgument(f"a token's role is one of: {', '.join(ROLES)}")
        uses = uses or 1
        if not 1 <= uses <= MAX_TOKEN_USES:
            raise InvalidArgument(f"uses must be between 1 and {MAX_TOKEN_USES}")
        ttl = datetime.timedelta(seconds=ttl_seconds or 86400)
        if not datetime.timedelta(seconds=1) <= ttl <= MAX_TOKEN_TTL:
            raise InvalidArgument("the token's ttl must be between 1 second and 365 days")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        now = self.clock.now()
        with self.store.transaction(now) as tx:
            tx.insert_token(digest, role, uses, now + ttl, actor)
            tx.audit(
                actor,
                "token.create",
                digest[:16],
                role=role,
                uses=uses,
                expires=(now + ttl).isoformat(),
            )
        return Token(token, digest[:16], role, uses, now + ttl)

    def _check_token(self, token: str, role: str, needed: int = 1) -> str:
        """The token's hash if it can be used `needed` times; UNAUTHENTICATED otherwise.
        Spends nothing."""
        if not token:
            if role == "agent" and self.hierarchy.settings.flag("OpenEnrollment"):
                return ""
            raise Unauthenticated("enrollment needs a token ('keyplane tokens create')")
        digest = token_hash(token)
        left = self.store.token_uses_left(digest)
        if left is None or left <= 0:
            raise Unauthenticated("the enrollment token is unknown, spent or expired")
        if left < needed:
            raise Unauthenticated(
                f"the enrollment token has {left} uses left; this batch needs {needed} "
                "(one per CSR)"
            )
        return digest

    # -- client certificates -------------------------------------------------------------

    def _renew_after(self, not_after: datetime.datetime) -> datetime.datetime:
        _, window = self.hierarchy.settings.rotation("ClientTLS")
        # Inside the renewal window, spread over its first half so a fleet does not
        # renew at once.
        jitter = _RANDOM.uniform(0, window.total_seconds() / 2)
        return not_after - window + datetime.timedelta(seconds=jitter)

    def _client_issuer(self) -> _ClientIssuer:
        """The key that signs client certificates now, with what every answer carries;
        worked out once per change to the hierarchy, not per request."""

        def compute() -> _ClientIssuer:
            record = self.hierarchy.active_key("intermediate_tls")
            return _ClientIssuer(
                record,
                self.hierarchy.backends.private_key(record.key_uri),
                certs.load_pem(record.certificate_pem or ""),
                self.hierarchy.trusted_roots_pem().decode(),
            )

        return self.store.memo(("enrollment.client_issuer",), compute)

    def _issue(
        self,
        actor: str,
        key: SubjectKey,
        common_name: str,
        role: str,
        token_digest: str | None,
        names: list[str] | None = None,
    ) -> Issued:
        issued, pending = self._issue_pending(actor, key, common_name, role, token_digest, names)
        pending.result()
        return issued

    def _issue_pending(
        self,
        actor: str,
        key: SubjectKey,
        common_name: str,
        role: str,
        token_digest: str | None,
        names: list[str] | None = None,
    ) -> tuple[Issued, Future[object]]:
        """Build and sign now; the record commits with others (the future completes once
        it is durable, or fails, e.g. when the token was spent meanwhile)."""
        issued, record = self._build(key, common_name, role, names)
        pending = self._record_pending(actor, role, token_digest, [record])
        return issued, pending

    def _build(
        self, key: SubjectKey, common_name: str, role: str, names: list[str] | None = None
    ) -> tuple[Issued, CertificateRecord]:
        signer = self._client_issuer()
        now = self.clock.now()
        validity, _ = self.hierarchy.settings.rotation("ClientTLS")
        record = certs.client_record(
            signer.key,
            signer.certificate,
            signer.record.fingerprint,
            key,
            common_name,
            role,
            now,
            validity,
            names=names,
            server_auth=role == "zone-server",
        )
        return Issued(
            chain_pem=record.certificate_pem + (signer.record.certificate_pem or ""),
            roots_pem=signer.roots_pem,
            serial=record.serial,
            not_after=record.not_after,
            renew_after=self._renew_after(record.not_after),
        ), record

    def _record_pending(
        self,
        actor: str,
        role: str,
        token_digest: str | None,
        records: list[CertificateRecord],
    ) -> Future[object]:
        """Spend a token use per certificate (if a token was given) and record them, all
        or nothing, committed with other requests' work in one fsync; the future
        completes once that is durable."""

        # The rows are made here, so the committer thread only runs the statements.
        rows = [certificate_row(record, token_digest) for record in records]
        audit = [
            (
                actor,
                "certificate.issue",
                record.serial,
                json.dumps(
                    {"issuer": record.issuer_fingerprint, "role": role, "subject": record.subject}
                ),
            )
            for record in records
        ]

        def record_issue(tx: Transaction) -> None:
            if token_digest and not tx.consume_token(
                token_digest, _token_role(role), uses=len(records)
            ):
                raise Unauthenticated(
                    "the enrollment token is unknown, spent or expired"
                    if len(records) == 1
                    else f"the enrollment token is unknown or expired, or has fewer than "
                    f"{len(records)} uses left (one per CSR)"
                )
            tx.insert_certificates(rows)
            tx.audit_many(audit)

        return self.store.group_commit_pending(records[0].issued_at, record_issue)

    def enroll(self, csr_data: bytes, token: str) -> Issued:
        issued, pending = self.enroll_pending(csr_data, token)
        pending.result()
        return issued

    def enroll_pending(self, csr_data: bytes, token: str) -> tuple[Issued, Future[object]]:
        _, key, common_name = check_csr(csr_data)
        with self.store.snapshot():
            digest = self._check_token(token, "agent")
            actor = f"enrollment ({common_name})"
            return self._issue_pending(actor, key, common_name, "agent", digest or None)

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
        checked = []
        for index, data in enumerate(csrs):
            try:
                _, key, common_name = check_csr(data)
            except InvalidArgument as exc:
                raise InvalidArgument(f"csrs[{index}]: {exc}") from None
            checked.append((key, common_name))
        with self.store.snapshot():
            digest = self._check_token(token, "agent", needed=len(checked))
            built = [self._build(key, common_name, "agent") for key, common_name in checked]
        actor = f"enrollment batch ({len(built)} CSRs)"
        pending = self._record_pending(actor, "agent", digest or None, [r for _, r in built])
        return [issued for issued, _ in built], pending

    def identity_from_chain(self, chain_pem: bytes) -> Identity:
        """The caller of RenewWithProof, from the certificate it sent: one this hierarchy
        (or one of its zone servers) issued, unexpired and unrevoked."""
        cert = presented_certificate(chain_pem)
        problem = self.hierarchy.check_presented_certificate(cert)
        if problem is not None:
            raise PermissionDenied(f"the certificate is refused: {problem}")
        return Identity.of(cert)

    def renew(self, identity: Identity, csr_data: bytes) -> Issued:
        issued, pending = self.renew_pending(identity, csr_data)
        pending.result()
        return issued

    def renew_pending(self, identity: Identity, csr_data: bytes) -> tuple[Issued, Future[object]]:
        _, key, common_name = check_csr(csr_data)
        role = "agent"
        if role not in identity.roles:
            raise PermissionDenied(
                "only agents renew certificates here; zone servers use RenewZoneServer"
            )
        if common_name != identity.common_name:
            raise InvalidArgument(
                f"the CSR's common name {common_name!r} differs from the certificate's "
                f"{identity.common_name!r}; renew keeps the same name"
            )
        if fingerprint(key) == fingerprint(identity.certificate.public_key()):  # type: ignore[arg-type]
            raise InvalidArgument("renewal needs a new key; the CSR reuses the current one")
        with self.store.snapshot():
            return self._issue_pending(identity.actor, key, common_name, role, None)

    # -- certificates --------------------------------------------------------------------

    def certificates(self, component: str, limit: int) -> list[CertificateRecord]:
        limit = limit or 1000
        if not 1 <= limit <= 10000:
            raise InvalidArgument("page_size must be between 1 and 10000")
        return self.store.certificates(component or None, limit)

    def revoke_certificate(self, actor: str, serial: str, reason: str) -> CertificateRecord:
        serial = serial.strip().lower().removeprefix("0x")
        if not re.fullmatch(r"[0-9a-f]{1,40}", serial):
            raise InvalidArgument("a serial number is hexadecimal (as 'keyplane certs list' shows)")
        serial = serial.rjust(32, "0")
        reason = parse_reason(reason or "revoked by an admin")
        with self.hierarchy.lock:
            record = self.store.certificate(serial)
            if record is None:
                raise NotFound(f"no certificate with serial {serial}")
            if record.revoked_at is not None:
                raise AlreadyRevoked(f"certificate {serial} is revoked already")
            with self.store.transaction(self.clock.now()) as tx:
                tx.revoke_certificate(serial, actor, reason)
                tx.audit(actor, "certificate.revoke", serial, reason=reason)
            self.hierarchy.trust.publish(actor)
        found = self.store.certificate(serial)
        assert found is not None  # noqa: S101
        return found

    # -- zone servers --------------------------------------------------------------------

    def _zone_intermediate(self, actor: str, zone: str, csr_data: bytes) -> tuple[KeyRecord, str]:
        _, key, _ = check_csr(csr_data)
        if isinstance(key, ed25519.Ed25519PublicKey):
            raise InvalidArgument("a zone intermediate key is EC P-256/P-384 or RSA")
        issuer = self.hierarchy.issuing_root()
        now = self.clock.now()
        validity, _ = self.hierarchy.settings.rotation(ZONE_INTERMEDIATE_VALIDITY_KIND)
        name = f"{zone} zone intermediate"
        cert = certs.build_intermediate_certificate(
            self.hierarchy.backends.private_key(issuer.key_uri),
            certs.load_pem(issuer.certificate_pem or ""),
            key,
            name,
            now,
            validity,
        )
        record = KeyRecord(
            fingerprint=fingerprint(key),
            kind="zone_intermediate",
            name=name,
            number=None,
            algorithm=algorithm_of(key).value,
            backend="remote",
            key_uri=f"zone:{zone}",
            state="active",
            issuer_fingerprint=issuer.fingerprint,
            certificate_pem=certs.to_pem(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            created_at=now,
        )
        return record, record.certificate_pem + (issuer.certificate_pem or "")  # type: ignore[operator]

    def enroll_zone_server(
        self,
        token: str,
        intermediate_csr: bytes,
        tls_csr: bytes,
        name: str,
        listen: str,
        bootstrap_listen: str,
    ) -> tuple[str, Issued]:
        if not _NAME.fullmatch(name or ""):
            raise InvalidArgument("a zone server's name is 1-128 letters, digits, '.', '_' or '-'")
        for label, address in (("listen", listen), ("bootstrap_listen", bootstrap_listen)):
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise InvalidArgument(f"{label} must be HOST:PORT, not {address!r}")
        _, tls_key, tls_name = check_csr(tls_csr)
        if tls_name != name:
            raise InvalidArgument("the TLS CSR's common name must be the zone server's name")
        digest = self._check_token(token, "zone-server")
        actor = f"zone server {name}"
        with self.hierarchy.lock:
            record, chain = self._zone_intermediate(actor, name, intermediate_csr)
            hosts = [name] + [a.rpartition(":")[0].strip("[]") for a in (listen, bootstrap_listen)]
            issued = self._issue(actor, tls_key, name, "zone-server", digest, names=hosts)
            with self.store.transaction(self.clock.now()) as tx:
                for old in self.store.keys("zone_intermediate", ("active",)):
                    if old.key_uri == record.key_uri:
                        tx.set_key_state(old.fingerprint, "retired")
                tx.insert_key(record)
                tx.upsert_zone_server(name, listen, bootstrap_listen)
                tx.audit(
                    actor,
                    "zone_server.enroll",
                    name,
                    intermediate=record.fingerprint,
                    listen=listen,
                    bootstrap_listen=bootstrap_listen,
                )
            self.hierarchy.trust.publish(SERVER_ACTOR)
        return chain, issued

    def renew_zone_server(
        self, identity: Identity, intermediate_csr: bytes, tls_csr: bytes
    ) -> tuple[str, Issued]:
        if "zone-server" not in identity.roles:
            raise PermissionDenied("only zone servers renew zone intermediates")
        name = identity.common_name
        zone = {z.name: z for z in self.store.zone_servers()}.get(name)
        if zone is None:
            raise FailedPrecondition(f"zone server {name!r} is not registered here")
        _, tls_key, tls_name = check_csr(tls_csr)
        if tls_name != name:
            raise InvalidArgument("the TLS CSR's common name must be the zone server's name")
        with self.hierarchy.lock:
            record, chain = self._zone_intermediate(identity.actor, name, intermediate_csr)
            hosts = [name] + [
                a.rpartition(":")[0].strip("[]") for a in (zone.listen, zone.bootstrap_listen)
            ]
            issued = self._issue(identity.actor, tls_key, name, "zone-server", None, names=hosts)
            with self.store.transaction(self.clock.now()) as tx:
                for old in self.store.keys("zone_intermediate", ("active",)):
                    if old.key_uri == record.key_uri:
                        tx.set_key_state(old.fingerprint, "retired")
                tx.insert_key(record)
                tx.audit(identity.actor, "zone_server.renew", name, intermediate=record.fingerprint)
            self.hierarchy.trust.publish(SERVER_ACTOR)
        return chain, issued

    def redeem_token_pending(
        self, identity: Identity, token: str, subject: str, certificate_der: bytes
    ) -> Future[object]:
        """Spend one use of an agent token presented to a zone server and record the
        certificate the zone issued for it, in one transaction, committed with other
        requests' work; the future completes once it is durable (or fails when the token
        was spent meanwhile: then nothing is recorded)."""
        if "zone-server" not in identity.roles:
            raise PermissionDenied("only zone servers redeem tokens")
        if not certificate_der:
            raise InvalidArgument(
                "RedeemEnrollmentToken needs the certificate the zone server issued (DER)"
            )
        digest = self._check_token(token, "agent")
        rows = self._zone_certificate_rows(identity, [(certificate_der, "agent")], digest)

        def spend(tx: Transaction) -> None:
            if digest and not tx.consume_token(digest, "agent"):
                raise Unauthenticated("the enrollment token is unknown, spent or expired")
            tx.insert_certificates_if_new(rows)
            tx.audit(
                identity.actor,
                "token.redeem" if digest else "certificate.report",
                digest[:16] if digest else identity.common_name,
                subject=subject[:200],
                serial=str(rows[0][0]),
            )

        return self.store.group_commit_pending(self.clock.now(), spend)

    def _zone_certificate_rows(
        self, identity: Identity, reports: list[tuple[bytes, str]], token_hash: str = ""
    ) -> list[tuple[object, ...]]:
        """Certificate rows for what a zone server says it issued, each checked to be
        signed by that zone's own intermediate; INVALID_ARGUMENT otherwise."""
        intermediates = [
            k
            for k in self.store.keys("zone_intermediate")
            if k.key_uri == f"zone:{identity.common_name}" and k.state != "revoked"
        ]
        # The zone's intermediates by subject, parsed once per report, not per certificate.
        by_subject: dict[x509.Name, list[tuple[KeyRecord, x509.Certificate]]] = {}
        for k in intermediates:
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
            record = certs.record_of(cert, component or "agent", issuer.fingerprint, now)
            rows.append(certificate_row(record, token_hash or None))
        return rows

    def record_reported(self, identity: Identity, reports: list[tuple[bytes, str]]) -> int:
        if "zone-server" not in identity.roles:
            raise PermissionDenied("only zone servers report issued certificates")
        rows = self._zone_certificate_rows(identity, reports)
        with self.store.transaction(self.clock.now()) as tx:
            # A certificate reported again (after a lost answer) is recorded once.
            recorded = tx.insert_certificates_if_new(rows)
            if recorded:
                tx.audit(identity.actor, "certificate.report", identity.common_name, count=recorded)
        return recorded

    # -- bundles -------------------------------------------------------------------------

    def init_bundle(self, listen: str, bootstrap_listen: str) -> bundle_service_pb2.InitBundle:
        hierarchy = self.hierarchy
        body = bundle_service_pb2.InitBundleBody(
            format=1, trust_state_version=hierarchy.trust.latest_version()
        )
        body.create_time.FromDatetime(self.clock.now())
        roots = hierarchy.active_roots()
        for root in roots:
            body.roots.append(
                trust_state_pb2.TrustedCertificate(
                    fingerprint=root.fingerprint,
                    name=root.name,
                    state="active",
                    certificate_der=certs.to_der(certs.load_pem(root.certificate_pem or "")),
                )
            )
        body.servers.add(
            name=hierarchy.config.fqdn, listen=listen, bootstrap_listen=bootstrap_listen
        )
        for zone in self.store.zone_servers():
            body.servers.add(
                name=zone.name,
                listen=zone.listen,
                bootstrap_listen=zone.bootstrap_listen,
                zone=True,
            )
        body_bytes = body.SerializeToString(deterministic=True)
        bundle = bundle_service_pb2.InitBundle(body=body_bytes)
        for root in roots:
            key = hierarchy.backends.private_key(root.key_uri)
            bundle.signatures.add(
                root_fingerprint=root.fingerprint,
                signature=sign_with(key, KeyAlgorithm(root.algorithm), BUNDLE_CONTEXT + body_bytes),
            )
        return bundle

    def legacy_public_key(self) -> tuple[str, str]:
        if not self.hierarchy.settings.flag("EnableLegacyProtocol"):
            raise FailedPrecondition(
                "the legacy public key is served only while the setting EnableLegacyProtocol "
                "is true ('keyplane settings set EnableLegacyProtocol true')"
            )
        legacy = self.hierarchy.legacy_root()
        pem = self.hierarchy.public_key_of(legacy).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode(), legacy.fingerprint


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _token_role(role: str) -> str:
    return "zone-server" if role == "zone-server" else "agent"
