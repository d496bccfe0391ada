"""The key hierarchy of one server: roots, the legacy root, the server's TLS key and
the admin credential, kept consistent after every change.

Every change commits with its audit record in one transaction. After each change the
server's own subordinates are reconciled: the server TLS key and the admin credential
are always issued by the newest active root, and `ca.pem` lists the active roots.
"""

from __future__ import annotations

import datetime
import logging
import re
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.plugins.errors import BackendError, KeyNotFoundError
from keyplane.plugins.keys import KeyAlgorithm, PublicKey, fingerprint
from keyplane.plugins.manager import KeyBackends
from keyplane.server.config import ServerConfig
from keyplane.server.domain import certs
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.credentials import AdminCredentialDir
from keyplane.server.domain.faults import Faults
from keyplane.server.domain.settings import Setting, Settings
from keyplane.server.domain.trust import TrustStatePublisher
from keyplane.server.errors import (
    AlreadyRevoked,
    ConfirmationRequired,
    FailedPrecondition,
    InvalidArgument,
    LastActiveRoot,
    LegacyRootImmutable,
    NotFound,
    RootLimitReached,
)
from keyplane.server.store import KeyRecord, StateStore

log = logging.getLogger(__name__)

MAX_ACTIVE_ROOTS = 2
ACCEPTED_CACHE_SIZE = 100_000
LEGACY_ROOT_NAME = "legacy-root"
SERVER_ACTOR = "keyplane-server"
ADMIN_ROLE = "admin"
ADMIN_CREDENTIAL_VALIDITY = datetime.timedelta(days=365)
ADMIN_CREDENTIAL_RENEWAL = datetime.timedelta(days=30)
# Subordinate key kinds and the Kind their rotation settings are named after.
SUBORDINATE_KINDS = {
    "server_tls": "ServerTLS",
    "intermediate_tls": "IntermediateTLS",
    "message_signing": "MessageSigning",
}
SUBORDINATE_NAMES = {
    "server_tls": "server TLS",
    "intermediate_tls": "intermediate TLS",
    "message_signing": "message signing",
}
MAX_REASON_LENGTH = 1024
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def parse_fingerprint(text: str) -> str:
    """Normalise a key fingerprint: 64 hex digits, optionally prefixed `sha256:`."""
    value = text.strip().lower()
    value = value.removeprefix("sha256:")
    if not _FINGERPRINT.fullmatch(value):
        raise InvalidArgument(
            "a fingerprint is 64 hex digits (SHA-256 of the key's SubjectPublicKeyInfo), "
            "optionally prefixed 'sha256:'"
        )
    return value


def parse_reason(text: str) -> str:
    reason = text.strip()
    if not reason:
        raise InvalidArgument("give a reason for the revocation (it is kept in the audit log)")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    if any(ord(c) < 32 and c not in "\t" for c in reason):
        raise InvalidArgument("the reason must not contain control characters or line breaks")
    return reason


@dataclass(frozen=True)
class TlsMaterial:
    """What the TLS listeners serve: the server's chain and key, and the client CAs."""

    version: tuple[str, ...]
    certificate_chain_pem: bytes
    private_key_pem: bytes
    client_ca_pem: bytes


@dataclass(frozen=True)
class StartReport:
    """What a server start created (empty on a restart over an initialised data dir)."""

    created: tuple[str, ...]
    issuing_root: KeyRecord


class Hierarchy:
    """Root keys and the server's own subordinates, over the state DB and the backends."""

    def __init__(
        self,
        config: ServerConfig,
        store: StateStore,
        backends: KeyBackends,
        clock: Clock,
        faults: Faults | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.backends = backends
        self.clock = clock
        self.faults = faults or Faults(config.kill_at)
        self.settings = Settings(store, backends.secret_store())
        self.trust = TrustStatePublisher(
            config.fqdn, store, backends, self.settings, clock, self.faults
        )
        self.admin_dir = AdminCredentialDir(config.data_dir / "admin")
        self._lock = threading.RLock()
        self._accepted: dict[str, int] = {}

    @property
    def lock(self) -> threading.RLock:
        """Held by every change to the hierarchy, so changes never interleave."""
        return self._lock

    # -- start ---------------------------------------------------------------------------

    def start(self) -> StartReport:
        """Initialise an empty data dir, or check and reconcile an existing one."""
        created: list[str] = []
        with self._lock:
            if not self.store.keys("root"):
                self._create_root(SERVER_ACTOR, self.config.root_algorithm)
                created.append("root")
            if not self.store.keys("legacy_root"):
                self._create_legacy_root()
                created.append("legacy_root")
            self._destroy_revoked_keys()
            created.extend(self._reconcile(SERVER_ACTOR))
            return StartReport(tuple(created), self.issuing_root())

    # -- roots ---------------------------------------------------------------------------

    def active_roots(self) -> list[KeyRecord]:
        return self.store.keys("root", ("active",))

    def issuing_root(self) -> KeyRecord:
        """The newest active root: it issues every new subordinate."""
        roots = self.active_roots()
        return max(roots, key=lambda r: r.number or 0)

    def revoked_roots(self) -> list[KeyRecord]:
        return self.store.keys("root", ("revoked",))

    def root(self, fingerprint_text: str) -> KeyRecord:
        fp = parse_fingerprint(fingerprint_text)
        record = self.store.key(fp)
        if record is not None and record.kind == "legacy_root":
            return record
        if record is None or record.kind != "root":
            raise NotFound(f"no root key has fingerprint {fp}")
        return record

    def legacy_root(self) -> KeyRecord:
        roots = self.store.keys("legacy_root")
        if not roots:
            raise NotFound("this server has no legacy root yet")
        return roots[0]

    def create_root(self, actor: str, algorithm: KeyAlgorithm | None = None) -> KeyRecord:
        """Create `<fqdn> Root <n>` and re-issue the server's subordinates under it."""
        with self._lock:
            record = self._create_root(actor, algorithm or self.config.root_algorithm)
            self._reconcile(actor)
            return record

    def _check_root_limit(self, active: list[KeyRecord]) -> None:
        if len(active) >= MAX_ACTIVE_ROOTS:
            names = ", ".join(r.name for r in active)
            raise RootLimitReached(
                f"{len(active)} root keys are active already ({names}); revoke one with "
                "'keyplane roots revoke FINGERPRINT' before creating another"
            )

    def _create_root(self, actor: str, algorithm: KeyAlgorithm) -> KeyRecord:
        self._check_root_limit(self.active_roots())
        with self.store.transaction(self.clock.now()) as tx:
            number = tx.next_root_number()
        name = f"{self.config.fqdn} Root {number}"
        backend = self.config.backend_for("root")
        generated = self.backends.generate_key(backend, name, algorithm)
        self.faults.checkpoint("root.generated")
        try:
            now = self.clock.now()
            key = self.backends.private_key(generated.uri)
            cert = certs.build_root_certificate(key, name, now)
            record = KeyRecord(
                fingerprint=fingerprint(generated.public_key),
                kind="root",
                name=name,
                number=number,
                algorithm=algorithm.value,
                backend=backend,
                key_uri=generated.uri,
                state="active",
                issuer_fingerprint=None,
                certificate_pem=certs.to_pem(cert),
                not_before=cert.not_valid_before_utc,
                not_after=None,
                created_at=now,
            )
            with self.store.transaction(now) as tx:
                # Checked again inside the write lock: another worker may have won.
                self._check_root_limit(self.active_roots())
                tx.insert_key(record)
                tx.audit(
                    actor,
                    "root.create",
                    record.fingerprint,
                    name=name,
                    backend=backend,
                    algorithm=algorithm.value,
                    key_uri=generated.uri,
                )
        except BaseException:
            # No key is left behind for a root that was not recorded.
            self._destroy_quietly(generated.uri)
            raise
        self.faults.checkpoint("root.recorded")
        log.info("created root key %s (%s) in %s", name, record.fingerprint, backend)
        return record

    def _create_legacy_root(self) -> KeyRecord:
        backend = self.config.backend_for("legacy_root")
        algorithm = self.config.root_algorithm
        generated = self.backends.generate_key(backend, LEGACY_ROOT_NAME, algorithm)
        now = self.clock.now()
        record = KeyRecord(
            fingerprint=fingerprint(generated.public_key),
            kind="legacy_root",
            name=LEGACY_ROOT_NAME,
            number=None,
            algorithm=algorithm.value,
            backend=backend,
            key_uri=generated.uri,
            state="active",
            issuer_fingerprint=None,
            certificate_pem=None,
            not_before=now,
            not_after=None,
            created_at=now,
        )
        try:
            with self.store.transaction(now) as tx:
                tx.insert_key(record)
                tx.audit(SERVER_ACTOR, "legacy_root.create", record.fingerprint)
        except BaseException:
            self._destroy_quietly(generated.uri)
            raise
        return record

    def revoke_root(
        self, actor: str, fingerprint_text: str, reason: str, confirm: bool
    ) -> KeyRecord:
        """Revoke a root for good, with everything it issued, and destroy its key."""
        fp = parse_fingerprint(fingerprint_text)
        reason = parse_reason(reason)
        if not confirm:
            raise ConfirmationRequired(
                "revoking a root is permanent and destroys its private key; "
                "confirm it explicitly (--yes on the command line)"
            )
        with self._lock:
            record = self.root(fp)
            if record.kind == "legacy_root":
                raise LegacyRootImmutable("the legacy root is never revoked or rotated")
            if record.state == "revoked":
                raise AlreadyRevoked(f"{record.name} ({fp}) is revoked already")
            active = self.active_roots()
            if len(active) <= 1:
                raise LastActiveRoot(
                    f"{record.name} is the only active root; create a new root with "
                    "'keyplane roots create' first, then revoke this one"
                )
            subordinates = [
                k
                for kind in (
                    "server_tls",
                    "intermediate_tls",
                    "message_signing",
                    "zone_intermediate",
                )
                for k in self.store.keys(kind, ("prepared", "active", "retired"))
                if k.issuer_fingerprint == fp
            ]
            with self.store.transaction(self.clock.now()) as tx:
                tx.revoke_key(fp, "root", actor, reason)
                for sub in subordinates:
                    tx.revoke_key(
                        sub.fingerprint, sub.kind, actor, f"issuing root revoked: {reason}"
                    )
                certificates = tx.revoke_certificates_issued_by(
                    fp, actor, f"issuing root revoked: {reason}"
                )
                for sub in subordinates:
                    # Everything the root's intermediates issued goes with them.
                    certificates += tx.revoke_certificates_issued_by(
                        sub.fingerprint, actor, f"issuing root revoked: {reason}"
                    )
                tx.audit(
                    actor,
                    "root.revoke",
                    fp,
                    name=record.name,
                    reason=reason,
                    subordinates=[s.fingerprint for s in subordinates],
                    certificates=certificates,
                )
            self.faults.checkpoint("revoke.recorded")
            log.info("revoked root key %s (%s): %s", record.name, fp, reason)
            self._destroy_revoked_keys()
            self._reconcile(actor)
            revoked = self.store.key(fp)
            assert revoked is not None  # noqa: S101 - just written
            return revoked

    # -- the server's own subordinates ---------------------------------------------------

    def _destroy_quietly(self, uri: str) -> None:
        try:
            self.backends.destroy_key(uri)
        except KeyNotFoundError:
            pass
        except BackendError as exc:
            log.error("could not destroy key %s: %s", uri, exc)

    def _destroy_revoked_keys(self) -> None:
        """Destroy the private keys of revoked records (again after a crash or outage)."""
        for kind in ("root", "server_tls", "intermediate_tls", "message_signing"):
            for record in self.store.keys(kind, ("revoked",)):
                if self.store.key_destroyed(record.fingerprint):
                    continue
                try:
                    self.backends.destroy_key(record.key_uri)
                except KeyNotFoundError:
                    pass
                except BackendError as exc:
                    # Revoked in the DB, so never used again; retried at the next start.
                    log.error("could not destroy revoked key %s yet: %s", record.name, exc)
                    continue
                with self.store.transaction(self.clock.now()) as tx:
                    tx.mark_key_destroyed(record.fingerprint)
                    tx.audit(SERVER_ACTOR, "key.destroy", record.fingerprint, kind=kind)

    def _server_names(self) -> list[str]:
        names = [self.config.fqdn, *self.config.server_names, "localhost", "127.0.0.1", "::1"]
        host, _ = self.config.listen_address
        if host not in ("0.0.0.0", "::", ""):  # noqa: S104 - compared, not bound
            names.append(host)
        return names

    def reconcile(self, actor: str = SERVER_ACTOR) -> list[str]:
        """Bring every subordinate up to date; what the scheduler runs on each tick.

        Resumes an interrupted rotation, issues what is missing under the newest root,
        rotates keys that entered their renewal window, renews the admin credential,
        and publishes a trust-state version if anything changed.
        """
        with self._lock:
            return self._reconcile(actor)

    def _reconcile(self, actor: str) -> list[str]:
        done: list[str] = []
        self._destroy_revoked_keys()
        issuer = self.issuing_root()
        now = self.clock.now()
        for kind in SUBORDINATE_KINDS:
            done.extend(self._reconcile_kind(actor, kind, issuer, now))
        cert = self.admin_dir.current_certificate()
        record = self.store.certificate(certs.serial_hex(cert)) if cert is not None else None
        if (
            record is None
            or record.revoked_at is not None
            or record.issuer_fingerprint != issuer.fingerprint
            or record.not_after - ADMIN_CREDENTIAL_RENEWAL < now
        ):
            self._issue_admin_credential(actor, issuer)
            done.append("admin_credential")
        self.admin_dir.write_trust(self.trusted_roots_pem())
        self.trust.publish(actor)
        return done

    def _reconcile_kind(
        self, actor: str, kind: str, issuer: KeyRecord, now: datetime.datetime
    ) -> list[str]:
        active_roots = {r.fingerprint for r in self.active_roots()}
        for prepared in self.store.keys(kind, ("prepared",)):
            # A rotation that stopped after recording its key: finish it, never start over.
            if prepared.issuer_fingerprint in active_roots:
                self.trust.publish(actor)
                self._activate(actor, prepared)
                return [f"{kind}:resumed"]
        active = self.store.keys(kind, ("active",))
        current = [
            k
            for k in active
            if k.issuer_fingerprint == issuer.fingerprint and k.not_after and k.not_after > now
        ]
        if not current:
            self._rotate(actor, kind, issuer)
            return [kind]
        _, window = self.settings.rotation(SUBORDINATE_KINDS[kind])
        newest = current[-1]
        if newest.not_after is not None and now >= newest.not_after - window:
            self._rotate(actor, kind, issuer)
            return [f"{kind}:renewed"]
        return []

    def rotate_key(self, actor: str, kind: str) -> KeyRecord:
        """Rotate one kind of subordinate now, under the newest root."""
        if kind not in SUBORDINATE_KINDS:
            raise InvalidArgument(f"choose a key kind to rotate: {', '.join(SUBORDINATE_KINDS)}")
        with self._lock:
            record = self._rotate(actor, kind, self.issuing_root())
            self._reconcile(actor)
            current = self.store.key(record.fingerprint)
            assert current is not None  # noqa: S101 - just written
            return current

    def _build_certificate(
        self, kind: str, issuer: KeyRecord, public_key: PublicKey, name: str
    ) -> x509.Certificate:
        now = self.clock.now()
        validity, _ = self.settings.rotation(SUBORDINATE_KINDS[kind])
        issuer_key = self.backends.private_key(issuer.key_uri)
        issuer_cert = certs.load_pem(issuer.certificate_pem or "")
        if kind == "server_tls":
            return certs.build_server_tls_certificate(
                issuer_key,
                issuer_cert,
                public_key,
                self.config.fqdn,
                self._server_names(),
                now,
                validity,
            )
        if kind == "intermediate_tls":
            return certs.build_intermediate_certificate(
                issuer_key, issuer_cert, public_key, name, now, validity
            )
        return certs.build_message_signing_certificate(
            issuer_key, issuer_cert, public_key, name, now, validity
        )

    def _rotate(self, actor: str, kind: str, issuer: KeyRecord) -> KeyRecord:
        """New key, certificate from `issuer`; recorded as prepared, published, activated."""
        backend = self.config.backend_for(kind)
        algorithm = self.config.subordinate_algorithm
        name = f"{self.config.fqdn} {SUBORDINATE_NAMES[kind]}"
        generated = self.backends.generate_key(backend, name, algorithm)
        self.faults.checkpoint("subordinate.generated")
        try:
            cert = self._build_certificate(kind, issuer, generated.public_key, name)
            now = self.clock.now()
            record = KeyRecord(
                fingerprint=fingerprint(generated.public_key),
                kind=kind,
                name=name,
                number=None,
                algorithm=algorithm.value,
                backend=backend,
                key_uri=generated.uri,
                state="prepared",
                issuer_fingerprint=issuer.fingerprint,
                certificate_pem=certs.to_pem(cert),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                created_at=now,
            )
            with self.store.transaction(now) as tx:
                tx.insert_key(record)
                tx.audit(
                    actor,
                    "key.prepare",
                    record.fingerprint,
                    kind=kind,
                    issuer=issuer.fingerprint,
                    serial=certs.serial_hex(cert),
                    not_after=cert.not_valid_after_utc.isoformat(),
                )
        except BaseException:
            self._destroy_quietly(generated.uri)
            raise
        self.faults.checkpoint("subordinate.prepared")
        # Published before it is used: components learn the new certificate first.
        self.trust.publish(actor)
        self.faults.checkpoint("subordinate.published")
        self._activate(actor, record)
        self.faults.checkpoint("subordinate.activated")
        log.info("rotated %s: %s under %s", kind, record.fingerprint, issuer.name)
        return record

    def _activate(self, actor: str, record: KeyRecord) -> None:
        """The prepared key becomes active; the active ones of its kind retire."""
        with self.store.transaction(self.clock.now()) as tx:
            retired = []
            for old in self.store.keys(record.kind, ("active",)):
                tx.set_key_state(old.fingerprint, "retired")
                retired.append(old.fingerprint)
            tx.set_key_state(record.fingerprint, "active")
            tx.audit(actor, "key.activate", record.fingerprint, kind=record.kind, retired=retired)

    def update_setting(self, actor: str, name: str, value: str) -> Setting:
        """Change a setting; rotation and client settings take effect at once."""
        with self._lock:
            setting = self.settings.set(name, value, actor, self.clock.now())
            self._reconcile(actor)
            return setting

    def subordinate_keys(self, kind: str | None = None) -> list[KeyRecord]:
        kinds = [kind] if kind else list(SUBORDINATE_KINDS)
        found: list[KeyRecord] = []
        for k in kinds:
            found.extend(reversed(self.store.keys(k)))
        return found

    def active_key(self, kind: str) -> KeyRecord:
        """The key of `kind` in use now: active, under the newest root."""
        issuer = self.issuing_root()
        active = self.store.keys(kind, ("active",))
        for record in reversed(active):
            if record.issuer_fingerprint == issuer.fingerprint:
                return record
        if active:
            return active[-1]
        raise FailedPrecondition(f"this server has no active {kind} key yet")

    def _issue_admin_credential(self, actor: str, issuer: KeyRecord) -> None:
        # The admin credential is meant to leave the server: it lives in a 0600 file.
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.clock.now()
        cert = certs.build_client_certificate(
            self.backends.private_key(issuer.key_uri),
            certs.load_pem(issuer.certificate_pem or ""),
            key.public_key(),
            f"admin@{self.config.fqdn}",
            ADMIN_ROLE,
            now,
            ADMIN_CREDENTIAL_VALIDITY,
        )
        record = certs.record_of(cert, ADMIN_ROLE, issuer.fingerprint, now)
        with self.store.transaction(now) as tx:
            tx.insert_certificate(record)
            tx.audit(actor, "admin_credential.issue", record.serial, issuer=issuer.fingerprint)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.admin_dir.write_credential(record.certificate_pem.encode(), key_pem)

    # -- what the TLS listeners serve ----------------------------------------------------

    def trusted_roots_pem(self) -> bytes:
        return "".join(r.certificate_pem or "" for r in self.active_roots()).encode()

    def tls_version(self) -> tuple[str, ...]:
        """Changes whenever the server certificate or the set of active roots changes."""
        server = self.current_server_tls()
        return (server.fingerprint, *(r.fingerprint for r in self.active_roots()))

    def current_server_tls(self) -> KeyRecord:
        return self.active_key("server_tls")

    def tls_material(self) -> TlsMaterial:
        server = self.current_server_tls()
        issuer = self.store.key(server.issuer_fingerprint or "")
        chain = (server.certificate_pem or "") + ((issuer.certificate_pem or "") if issuer else "")
        return TlsMaterial(
            version=self.tls_version(),
            certificate_chain_pem=chain.encode(),
            private_key_pem=self.backends.tls_private_key_pem(server.key_uri),
            client_ca_pem=self.trusted_roots_pem(),
        )

    def check_client_certificate(self, cert: x509.Certificate) -> str | None:
        """Why a TLS-verified client certificate must be refused, or None if it is good.

        The TLS stack has checked the chain to an active root. Here: not expired, not
        revoked, and issued by a key of this hierarchy that is not revoked. A certificate
        from a zone server's intermediate may not be reported yet; it is accepted when
        that intermediate issued it.
        """
        now = self.clock.now()
        if cert.not_valid_after_utc < now:
            return "it has expired"
        serial = certs.serial_hex(cert)
        # A certificate found good stays good until the hierarchy changes (a revocation
        # bumps the generation); only then is it looked up again.
        generation = self.store.generation()
        if self._accepted.get(serial) == generation:
            return None
        problem = self._check_client_certificate(cert, serial, now)
        if problem is None:
            if len(self._accepted) > ACCEPTED_CACHE_SIZE:
                self._accepted.clear()
            self._accepted[serial] = generation
        return problem

    def check_presented_certificate(self, cert: x509.Certificate) -> str | None:
        """check_client_certificate for a certificate no TLS stack verified (sent in a
        request): first that it is the very certificate issued under this serial, or one
        a zone intermediate of this hierarchy signed."""
        record = self.store.certificate(certs.serial_hex(cert))
        if record is not None:
            if certs.to_der(certs.load_pem(record.certificate_pem)) != certs.to_der(cert):
                return "it is not the certificate issued with its serial number"
        elif not any(
            certs.issued_by(cert, k.certificate_pem)
            for k in self.store.keys("zone_intermediate", ("active", "retired"))
        ):
            return "this server has no record of issuing it"
        return self.check_client_certificate(cert)

    def _check_client_certificate(
        self, cert: x509.Certificate, serial: str, now: datetime.datetime
    ) -> str | None:
        record = self.store.certificate(serial)
        if record is not None:
            if record.revoked_at is not None:
                return f"it was revoked ({record.revoke_reason})"
            issuer = self.store.key(record.issuer_fingerprint)
        else:
            if serial in set(self.store.revoked_serials(now)):
                return "it was revoked"
            issuer = next(
                (
                    k
                    for k in self.store.keys("zone_intermediate", ("active", "retired"))
                    if certs.issued_by(cert, k.certificate_pem)
                ),
                None,
            )
            if issuer is None:
                return "this server has no record of issuing it"
        if issuer is None or issuer.state == "revoked":
            return "its issuer is revoked"
        if issuer.kind == "root" and issuer.state != "active":
            return "its issuer is no longer active"
        return None

    def public_key_of(self, record: KeyRecord) -> PublicKey:
        return self.backends.public_key(record.key_uri)
