"""What a zone server does for its clients: admits them (by the trust state it relays,
with the server's authority rules; a trusted peer's agents as agents), enrolls them (its
server spends the token and records the certificate), and renews the certificates its
own intermediate (or a trusted peer) issued, each once, without a round trip to the
server."""

from __future__ import annotations

import datetime
import logging
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from keyplane.clients.client import KeyplaneClientError
from keyplane.plugins.keys import BackendPrivateKey, fingerprint
from keyplane.server.domain import authority, certs, crl, renewal
from keyplane.server.domain.csr_policy import SubjectKey, check_csr
from keyplane.server.domain.enrollment import Issued, renew_after
from keyplane.server.domain.identity import Identity
from keyplane.server.domain.tokens import MAX_TOKEN_LENGTH, TOKEN_PREFIX
from keyplane.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from keyplane.server.kinds import KeyKind, Role
from keyplane.server.logs import log_event

if TYPE_CHECKING:
    from keyplane.zone.runtime import ZoneServer

log = logging.getLogger(__name__)

VERDICT_CACHE_SIZE = 100_000
_PASSED_ON: dict[grpc.StatusCode, type[Exception]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
}


def refuse(reason: str) -> PermissionDenied:
    return PermissionDenied(f"the certificate is refused: {reason}")


class ZoneIssuer:
    """The zone's EnrollmentService backend, and its admission."""

    def __init__(self, zone: ZoneServer) -> None:
        self.zone = zone
        self._lock = threading.Lock()
        self._issuer_cache: tuple[x509.Certificate, BackendPrivateKey] | None = None
        self._issuer_pem = ""
        self._issuer_fingerprint: tuple[x509.Certificate, str] | None = None
        self._verdicts: dict[bytes, tuple[tuple[int, int], Identity]] = {}

    # -- the intermediate ----------------------------------------------------------------

    def intermediate(self) -> x509.Certificate:
        return self._issuer()[0]

    def issuer(self) -> tuple[x509.Certificate, BackendPrivateKey]:
        """The intermediate's certificate and key (its CRL is signed with it)."""
        return self._issuer()

    def _crl_url(self, issuer_cert: x509.Certificate) -> str | None:
        """The distribution point of what the zone issues: the intermediate's CRL under
        the server's PKICRLBaseURL, which the trust state carries."""
        state = self.zone.relay.state
        base = state.body.zone_settings.get(crl.CRL_BASE_URL_SETTING, "") if state else ""
        if not base:
            return None
        with self._lock:
            cached = self._issuer_fingerprint
            if cached is None or cached[0] is not issuer_cert:
                cached = (issuer_cert, certs.key_fingerprint(issuer_cert))
                self._issuer_fingerprint = cached
        return crl.crl_url(base, cached[1])

    def _issuer(self) -> tuple[x509.Certificate, BackendPrivateKey]:
        """The intermediate's certificate and key, parsed once per intermediate. zone.db
        is asked on every call, so that a worker issues from a renewed intermediate as
        soon as worker 0 has stored it, even before this worker's trust state shows the
        new root."""
        store = self.zone.store
        chain_pem = store.get("intermediate_chain_pem") or ""
        with self._lock:
            cached = self._issuer_cache
            if cached is None or self._issuer_pem != chain_pem:
                cached = (
                    x509.load_pem_x509_certificates(chain_pem.encode())[0],
                    self.zone.backends.private_key(store.get("intermediate_uri") or ""),
                )
                self._issuer_cache, self._issuer_pem = cached, chain_pem
            return cached

    def _settings_hours(self, name: str, default: int) -> datetime.timedelta:
        state = self.zone.relay.state
        value = state.body.zone_settings.get(name) if state else None
        return datetime.timedelta(hours=int(value) if value else default)

    def _build(self, key: SubjectKey, common_name: str) -> tuple[Issued, x509.Certificate]:
        """An agent certificate from the zone's intermediate."""
        issuer_cert, issuer_key = self._issuer()
        state = self.zone.relay.state
        roots_pem = (state.roots_pem() if state else b"").decode()
        validity = self._settings_hours("PKIClientTLSKeyValidityHours", 168)
        window = self._settings_hours("PKIClientTLSKeyRenewalWindowHours", 4)
        cert = certs.build_client_certificate(
            issuer_key,
            issuer_cert,
            key,
            common_name,
            Role.AGENT,
            self.zone.clock.now(),
            validity,
            names=[authority.AGENT_DNS_NAME],
            crl_url=self._crl_url(issuer_cert),
        )
        return Issued(
            chain_pem=certs.to_pem(cert) + certs.to_pem(issuer_cert),
            roots_pem=roots_pem,
            serial=certs.serial_hex(cert),
            not_after=cert.not_valid_after_utc,
            renew_after=renew_after(cert.not_valid_after_utc, window),
        ), cert

    # -- enrollment and renewal ----------------------------------------------------------

    def _refuse_if_revoked(self) -> None:
        if self.zone.revoked_because is not None:
            raise Unavailable(f"{self.zone.revoked_because}; enroll with another server")

    def enroll(self, csr_data: bytes, token: str) -> Issued:
        """Issue, then have the server spend the token and record the certificate in one
        transaction; only then is the certificate handed out."""
        self._refuse_if_revoked()
        if token and (len(token) > MAX_TOKEN_LENGTH or not token.startswith(TOKEN_PREFIX)):
            raise Unauthenticated("the enrollment token is unknown, spent or expired")
        _, key, common_name = check_csr(csr_data)
        view = self.zone.relay.view()
        if view is not None and fingerprint(key) in view.revoked_keys:
            raise AlreadyExists("this key's certificate was revoked: make a new key")
        issued, cert = self._build(key, common_name)
        try:
            self.zone.upstream.shared_client().redeem_enrollment_token(
                token, common_name, certs.to_der(cert)
            )
        except KeyplaneClientError as exc:
            # The server's answer about the token or the key is the client's answer.
            error = _PASSED_ON.get(exc.code)
            if error is not None:
                raise error(exc.message) from None
            raise Unavailable(
                f"the zone server cannot reach its server to check the token ({exc.code.name})"
            ) from None
        self._issued(issued, cert, common_name)
        return issued

    def _issued(
        self, issued: Issued, cert: x509.Certificate, subject: str, renews: str = ""
    ) -> None:
        """Count and log a certificate this zone issued (the server audits it as well,
        once the zone reports it)."""
        self.zone.metrics.issued(KeyKind.ZONE_INTERMEDIATE)
        log_event(
            "certificate.issue",
            "certificate.issue %s for %s",
            issued.serial,
            subject,
            target=issued.serial,
            fingerprint=certs.key_fingerprint(cert),
            details={
                "subject": subject,
                "role": Role.AGENT.value,
                **({"renews": renews} if renews else {}),
            },
        )

    def renew_pending(
        self, identity: Identity, csr_data: bytes, repeat: bool = False
    ) -> tuple[Issued, Future[object]]:
        """Renew a certificate this zone's intermediate issued: once, for a new key never
        revoked. The future completes once the renewal and its report are durable. With
        `repeat` (Renew over mutual TLS), a renewal asked again after its answer was lost
        gets the same certificate."""
        self._refuse_if_revoked()
        _, key, common_name = check_csr(csr_data)
        renewal.check_renewal(identity, key, common_name)
        # A trusted peer's agent (active/active) renews here too: from this zone's own
        # intermediate, reported to its server, once per certificate at this zone.
        peer_agent = identity.issuer is KeyKind.PEER_INTERMEDIATE
        if not peer_agent and identity.issuer_fingerprint not in self.zone.store.intermediates():
            raise FailedPrecondition(
                "this certificate was not issued by this zone server: renew it where it "
                "was issued (a certificate renews where its issuer lives)"
            )
        again = self.zone.store.renewal_of(identity.serial) if repeat else None
        if again is not None and certs.key_fingerprint(
            successor := x509.load_der_x509_certificate(again)
        ) == fingerprint(key):
            done: Future[object] = Future()
            done.set_result(None)
            return self._issued_again(successor), done
        if self.zone.store.renewed(identity.serial):
            raise PermissionDenied(
                f"certificate {identity.serial} was renewed already; a certificate renews "
                "once (renew from the newest one)"
            )
        view = self.zone.relay.view()
        if view is not None and fingerprint(key) in view.revoked_keys:
            raise AlreadyExists("this key's certificate was revoked: make a new key")
        issued, cert = self._build(key, common_name)
        durable = self.zone.store.queue_report_pending(
            issued.serial, certs.to_der(cert), Role.AGENT, renews=identity.serial
        )

        def recorded(done: Future[object]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._issued(issued, cert, common_name, renews=identity.serial)

        durable.add_done_callback(recorded)
        return issued, durable

    def _issued_again(self, cert: x509.Certificate) -> Issued:
        """A certificate this zone issued before, as Renew answers it, with the
        intermediate (of those the zone has held) that issued it."""
        issuer_cert, _ = self._issuer()
        for pem in self.zone.store.intermediate_certificates():
            if certs.issued_by(cert, pem):
                issuer_cert = certs.load_pem(pem)
                break
        state = self.zone.relay.state
        window = self._settings_hours("PKIClientTLSKeyRenewalWindowHours", 4)
        return Issued(
            chain_pem=certs.to_pem(cert) + certs.to_pem(issuer_cert),
            roots_pem=(state.roots_pem() if state else b"").decode(),
            serial=certs.serial_hex(cert),
            not_after=cert.not_valid_after_utc,
            renew_after=renew_after(cert.not_valid_after_utc, window),
        )

    def identity_from_chain(self, chain_pem: bytes) -> Identity:
        """The caller of RenewWithProof: admitted as a mutual-TLS caller would be."""
        return self.admit(renewal.presented_certificate(chain_pem))

    def check_proof(self, identity: Identity, csr: bytes, proof: bytes, proof_time: int) -> None:
        renewal.check_renewal_proof(
            identity.certificate, csr, proof, self.zone.options.name, proof_time,
            self.zone.clock.now(),
        )  # fmt: skip
        self.zone.sightings.seen(identity)

    # -- admission -----------------------------------------------------------------------

    def admit(self, cert: x509.Certificate) -> Identity:
        """The identity of a client holding `cert`, by the trust state: issued by a live
        intermediate it lists, unexpired, not revoked, its key never revoked, and only
        the roles an intermediate may confer (agent). PERMISSION_DENIED otherwise."""
        view = self.zone.relay.view()
        if view is None:
            raise refuse("the zone server has no trust state yet")
        if cert.not_valid_after_utc < self.zone.clock.now():
            raise refuse("it has expired")
        if certs.serial_hex(cert) in view.revoked_serials:
            raise refuse("it was revoked")
        if certs.key_fingerprint(cert) in view.revoked_keys:
            raise refuse("its key was revoked")
        # A verdict holds until the next trust-state version. It is keyed by the whole
        # certificate, not its serial: RenewWithProof certificates come unverified.
        digest = cert.fingerprint(hashes.SHA256())
        hit = self._verdicts.get(digest)
        if hit is not None and hit[0] == view.version:
            return hit[1]
        for issuer in view.by_subject.get(cert.issuer, ()):
            try:
                cert.verify_directly_issued_by(issuer.certificate)
            except (ValueError, TypeError, InvalidSignature):
                continue
            try:
                identity = Identity.admitted(cert, issuer.kind, issuer.fingerprint)
            except PermissionDenied as exc:
                raise refuse(str(exc).removeprefix("the certificate ")) from None
            if len(self._verdicts) > VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[digest] = (view.version, identity)
            return identity
        raise refuse("its issuer is not a trusted intermediate")
