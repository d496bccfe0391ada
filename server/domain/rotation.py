"""Rotation of the server's own subordinates (server TLS, intermediate TLS, message
signing) and of its admin credential, under the newest root.

Every step is a committed state: the new key is recorded as prepared, published in the
trust state, then made active, and the old one retires (trusted until it expires). A
server killed at any step finishes a prepared rotation on restart instead of starting
another.
"""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.plugins.keys import PublicKey, fingerprint
from keyplane.server.domain import certs
from keyplane.server.domain.roots import SERVER_ACTOR
from keyplane.server.errors import InvalidArgument
from keyplane.server.kinds import SUBORDINATE_KINDS, KeyKind, KeyState, Role
from keyplane.server.store import KeyRecord

if TYPE_CHECKING:
    from keyplane.server.domain.hierarchy import Hierarchy

log = logging.getLogger(__name__)

ADMIN_CREDENTIAL_VALIDITY = datetime.timedelta(days=365)
ADMIN_CREDENTIAL_RENEWAL = datetime.timedelta(days=30)
# The Kind each subordinate's rotation settings are named after.
SETTINGS_KIND = {
    KeyKind.SERVER_TLS: "ServerTLS",
    KeyKind.INTERMEDIATE_TLS: "IntermediateTLS",
    KeyKind.MESSAGE_SIGNING: "MessageSigning",
}
SUBORDINATE_NAMES = {
    KeyKind.SERVER_TLS: "server TLS",
    KeyKind.INTERMEDIATE_TLS: "intermediate TLS",
    KeyKind.MESSAGE_SIGNING: "message signing",
}


def _legacy_eku(record: KeyRecord) -> bool:
    """Whether a message-signing certificate carries keyplane's first EKU."""
    try:
        eku = certs.load_pem(record.certificate_pem or "").extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        )
    except (ValueError, x509.ExtensionNotFound):
        return False
    return certs.LEGACY_MESSAGE_SIGNING_EKU in eku.value


class Rotation:
    """Keeps every subordinate current; what the scheduler runs on each tick."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.h = hierarchy

    def reconcile(self, actor: str = SERVER_ACTOR) -> list[str]:
        """Resume an interrupted rotation, issue what is missing under the newest root,
        rotate keys that entered their renewal window, renew the admin credential, and
        publish a trust-state version if anything changed."""
        with self.h.lock:
            return self.reconcile_unlocked(actor)

    def reconcile_unlocked(self, actor: str) -> list[str]:
        h = self.h
        done: list[str] = []
        h.keys.clean_up()
        h.destroy_revoked_keys()
        issuer = h.issuing_root()
        now = h.clock.now()
        for kind in SUBORDINATE_KINDS:
            done.extend(self._reconcile_kind(actor, kind, issuer, now))
        cert = h.admin_dir.current_certificate()
        record = h.store.certificate(certs.serial_hex(cert)) if cert is not None else None
        if (
            record is None
            or record.revoked_at is not None
            or record.issuer_fingerprint != issuer.fingerprint
            or record.not_after - ADMIN_CREDENTIAL_RENEWAL < now
        ):
            self._issue_admin_credential(actor, issuer)
            done.append("admin_credential")
        h.admin_dir.write_trust(h.trusted_roots_pem())
        h.trust.publish(actor)
        return done

    def _reconcile_kind(
        self, actor: str, kind: KeyKind, issuer: KeyRecord, now: datetime.datetime
    ) -> list[str]:
        h = self.h
        active_roots = {r.fingerprint for r in h.active_roots()}
        for prepared in h.store.keys(kind, (KeyState.PREPARED,)):
            # A rotation that stopped after recording its key: finish it, never start over.
            if prepared.issuer_fingerprint in active_roots:
                h.trust.publish(actor)
                self._activate(actor, prepared)
                return [f"{kind}:resumed"]
        active = h.store.keys(kind, (KeyState.ACTIVE,))
        current = [
            k
            for k in active
            if k.issuer_fingerprint == issuer.fingerprint and k.not_after and k.not_after > now
        ]
        if not current:
            self._rotate(actor, kind, issuer)
            return [kind]
        _, window = h.settings.rotation(SETTINGS_KIND[kind])
        newest = current[-1]
        if newest.not_after is not None and now >= newest.not_after - window:
            self._rotate(actor, kind, issuer)
            return [f"{kind}:renewed"]
        if kind == KeyKind.MESSAGE_SIGNING and _legacy_eku(newest):
            # Go cannot parse the EKU it carries: replace it now, not at its renewal.
            self._rotate(actor, kind, issuer)
            return [f"{kind}:renewed"]
        return []

    def rotate_key(self, actor: str, kind: str) -> KeyRecord:
        """Rotate one kind of subordinate now, under the newest root."""
        if kind not in SUBORDINATE_KINDS:
            raise InvalidArgument(
                f"choose a key kind to rotate: {', '.join(k.value for k in SUBORDINATE_KINDS)}"
            )
        with self.h.lock:
            record = self._rotate(actor, KeyKind(kind), self.h.issuing_root())
            self.reconcile_unlocked(actor)
            current = self.h.store.key(record.fingerprint)
            assert current is not None  # noqa: S101 - just written
            return current

    def _build_certificate(
        self, kind: KeyKind, issuer: KeyRecord, public_key: PublicKey, name: str
    ) -> x509.Certificate:
        h = self.h
        now = h.clock.now()
        validity, _ = h.settings.rotation(SETTINGS_KIND[kind])
        issuer_key = h.backends.private_key(issuer.key_uri)
        issuer_cert = certs.load_pem(issuer.certificate_pem or "")
        crl_url = h.crls.url_for(issuer.fingerprint)
        if kind == KeyKind.SERVER_TLS:
            return certs.build_server_tls_certificate(
                issuer_key,
                issuer_cert,
                public_key,
                h.config.fqdn,
                h.server_names(),
                now,
                validity,
                crl_url=crl_url,
            )
        if kind == KeyKind.INTERMEDIATE_TLS:
            return certs.build_intermediate_certificate(
                issuer_key, issuer_cert, public_key, name, now, validity, crl_url=crl_url
            )
        return certs.build_message_signing_certificate(
            issuer_key, issuer_cert, public_key, name, now, validity, crl_url=crl_url
        )

    def _rotate(self, actor: str, kind: KeyKind, issuer: KeyRecord) -> KeyRecord:
        """New key, certificate from `issuer`; recorded as prepared, published, activated
        (counted as a rotation done, or failed if it stops on an error)."""
        try:
            record = self._rotate_counted(actor, kind, issuer)
        except Exception:
            self.h.metrics.rotation(kind, ok=False)
            raise
        self.h.metrics.rotation(kind, ok=True)
        return record

    def _rotate_counted(self, actor: str, kind: KeyKind, issuer: KeyRecord) -> KeyRecord:
        h = self.h
        backend = h.config.backend_for(kind)
        algorithm = h.config.subordinate_algorithm
        name = f"{h.config.fqdn} {SUBORDINATE_NAMES[kind]}"
        with h.keys.making(backend, name, algorithm) as generated:
            h.faults.checkpoint("subordinate.generated")
            cert = self._build_certificate(kind, issuer, generated.public_key, name)
            now = h.clock.now()
            record = KeyRecord(
                fingerprint=fingerprint(generated.public_key),
                kind=kind,
                name=name,
                number=None,
                algorithm=algorithm.value,
                backend=backend,
                key_uri=generated.uri,
                state=KeyState.PREPARED,
                issuer_fingerprint=issuer.fingerprint,
                certificate_pem=certs.to_pem(cert),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                created_at=now,
            )
            with h.store.transaction(now) as tx:
                tx.insert_key(record)
                tx.on_commit(lambda: h.metrics.issued(KeyKind.ROOT))
                tx.audit(
                    actor,
                    "key.prepare",
                    record.fingerprint,
                    after_fingerprint=record.fingerprint,
                    kind=kind,
                    issuer=issuer.fingerprint,
                    serial=certs.serial_hex(cert),
                    not_after=cert.not_valid_after_utc.isoformat(),
                )
        h.faults.checkpoint("subordinate.prepared")
        # Published before it is used: components learn the new certificate first.
        h.trust.publish(actor)
        h.faults.checkpoint("subordinate.published")
        self._activate(actor, record)
        h.faults.checkpoint("subordinate.activated")
        log.info("rotated %s: %s under %s", kind, record.fingerprint, issuer.name)
        return record

    def _activate(self, actor: str, record: KeyRecord) -> None:
        """The prepared key becomes active; the active ones of its kind retire."""
        h = self.h
        with h.store.transaction(h.clock.now()) as tx:
            retired = []
            for old in tx.reads.keys(record.kind, (KeyState.ACTIVE,)):
                tx.set_key_state(old.fingerprint, KeyState.RETIRED)
                retired.append(old.fingerprint)
            tx.set_key_state(record.fingerprint, KeyState.ACTIVE)
            tx.audit(
                actor,
                "key.activate",
                record.fingerprint,
                before_fingerprint=retired[0] if len(retired) == 1 else "",
                after_fingerprint=record.fingerprint,
                kind=record.kind,
                retired=retired,
            )

    def _issue_admin_credential(self, actor: str, issuer: KeyRecord) -> None:
        # The admin credential is meant to leave the server: it lives in a 0600 file.
        h = self.h
        key = ec.generate_private_key(ec.SECP256R1())
        now = h.clock.now()
        cert = certs.build_client_certificate(
            h.backends.private_key(issuer.key_uri),
            certs.load_pem(issuer.certificate_pem or ""),
            key.public_key(),
            f"admin@{h.config.fqdn}",
            Role.ADMIN,
            now,
            ADMIN_CREDENTIAL_VALIDITY,
            crl_url=h.crls.url_for(issuer.fingerprint),
        )
        record = certs.record_of(cert, Role.ADMIN, issuer.fingerprint, now)
        with h.store.transaction(now) as tx:
            tx.insert_certificate(record)
            tx.on_commit(lambda: h.metrics.issued(KeyKind.ROOT))
            tx.audit(
                actor,
                "admin_credential.issue",
                record.serial,
                after_fingerprint=record.fingerprint,
                issuer=issuer.fingerprint,
            )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        h.admin_dir.write_credential(record.certificate_pem.encode(), key_pem)
