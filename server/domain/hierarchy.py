"""The key hierarchy of one server: its parts (roots, rotation, admission, the trust
state, settings) over one state DB and one set of key backends, the queries they share,
and what the TLS listeners serve.

After every change the server's own subordinates are reconciled: the server TLS key and
the admin credential are always issued by the newest active root, and `ca.pem` lists the
active roots.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from keyplane.plugins.errors import BackendError, KeyNotFoundError
from keyplane.plugins.keys import PublicKey
from keyplane.plugins.manager import KeyBackends
from keyplane.server.config import ServerConfig
from keyplane.server.domain.admission import Admission
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.credentials import AdminCredentialDir
from keyplane.server.domain.crls import CrlPublisher
from keyplane.server.domain.faults import Faults
from keyplane.server.domain.inputs import resolve_fingerprint
from keyplane.server.domain.key_intents import KeyMaker
from keyplane.server.domain.peers import trusted_views
from keyplane.server.domain.roots import SERVER_ACTOR, Roots
from keyplane.server.domain.rotation import Rotation
from keyplane.server.domain.settings import Setting, Settings
from keyplane.server.domain.sightings import Sightings
from keyplane.server.domain.trust import TrustStatePublisher
from keyplane.server.errors import FailedPrecondition, NotFound
from keyplane.server.kinds import SUBORDINATE_KINDS, KeyKind, KeyState
from keyplane.server.metrics import Metrics
from keyplane.server.store import KeyRecord, StateStore

log = logging.getLogger(__name__)

# Kinds whose private keys this server holds and destroys once revoked.
DESTROYED_WHEN_REVOKED = (KeyKind.ROOT, *SUBORDINATE_KINDS)


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
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        # What this process counts (certificates issued, rotations): see server/metrics.py.
        self.metrics = metrics or Metrics()
        self.store = store
        self.backends = backends
        self.clock = clock
        self.faults = faults or Faults(
            config.kill_at, config.fail_at, config.slow_at, config.slow_ms
        )
        self.settings = Settings(store, backends.secret_store(), self.faults.checkpoint)
        self.crls = CrlPublisher(store, backends, self.settings, clock)
        self.trust = TrustStatePublisher(
            config.fqdn, store, backends, self.settings, clock, self.faults, self.crls
        )
        self.admin_dir = AdminCredentialDir(config.data_dir / "admin")
        self.roots = Roots(self)
        self.rotation = Rotation(self)
        self.admission = Admission(store, clock)
        # Who called (in memory), written in one batch every sightings_seconds.
        self.sightings = Sightings(clock)
        self.trust.peer_sections = lambda reads: [v.server() for v in trusted_views(reads)]
        self.keys = KeyMaker(store, backends, clock, config.data_dir)
        self._lock = threading.RLock()

    @property
    def lock(self) -> threading.RLock:
        """Held by every change to the hierarchy, so changes never interleave."""
        return self._lock

    def start(self) -> StartReport:
        """Initialise an empty data dir, or check and reconcile an existing one."""
        created: list[str] = []
        with self._lock:
            # Keys a killed process made and never recorded go first.
            self.keys.clean_up()
            if not self.store.keys(KeyKind.ROOT):
                self.roots.create_unlocked(SERVER_ACTOR, self.config.root_algorithm)
                created.append("root")
            if not self.store.keys(KeyKind.LEGACY_ROOT):
                self.roots.create_legacy()
                created.append("legacy_root")
            created.extend(self.rotation.reconcile_unlocked(SERVER_ACTOR))
            return StartReport(tuple(created), self.issuing_root())

    def reconcile(self, actor: str = SERVER_ACTOR) -> list[str]:
        """What the scheduler runs on each tick (see Rotation.reconcile)."""
        return self.rotation.reconcile(actor)

    def update_setting(self, actor: str, name: str, value: str) -> Setting:
        """Change a setting; rotation and client settings take effect at once."""
        with self._lock:
            setting = self.settings.set(name, value, actor, self.clock.now())
            self.rotation.reconcile_unlocked(actor)
            return setting

    def write_sightings(self) -> int:
        """Write who was seen since the last batch, in one transaction (kept for the next
        batch if it fails); how many certificates."""
        taken = self.sightings.take()
        if not taken:
            return 0
        try:
            with self.store.transaction(self.clock.now()) as tx:
                tx.record_sightings([(serial, s.at) for serial, s in taken.items()])
        except BaseException:
            self.sightings.put_back(taken)
            raise
        return len(taken)

    # -- queries -------------------------------------------------------------------------

    def active_roots(self) -> list[KeyRecord]:
        return self.store.keys(KeyKind.ROOT, (KeyState.ACTIVE,))

    def issuing_root(self) -> KeyRecord:
        """The newest active root: it issues every new subordinate."""
        return max(self.active_roots(), key=lambda r: r.number or 0)

    def revoked_roots(self) -> list[KeyRecord]:
        return self.store.keys(KeyKind.ROOT, (KeyState.REVOKED,))

    def root_fingerprint(self, fingerprint_text: str) -> str:
        """The root (or legacy root) that `fingerprint_text` names: all 64 hex digits,
        or an unambiguous prefix of 8 or more."""
        known = [
            r.fingerprint
            for kind in (KeyKind.ROOT, KeyKind.LEGACY_ROOT)
            for r in self.store.keys(kind)
        ]
        return resolve_fingerprint(fingerprint_text, known, "root key")

    def root(self, fingerprint_text: str) -> KeyRecord:
        fp = self.root_fingerprint(fingerprint_text)
        record = self.store.key(fp)
        if record is not None and record.kind == KeyKind.LEGACY_ROOT:
            return record
        if record is None or record.kind != KeyKind.ROOT:
            raise NotFound(f"no root key has fingerprint {fp}")
        return record

    def legacy_root(self) -> KeyRecord:
        roots = self.store.keys(KeyKind.LEGACY_ROOT)
        if not roots:
            raise NotFound("this server has no legacy root yet")
        return roots[0]

    def subordinate_keys(self, kind: str | None = None) -> list[KeyRecord]:
        kinds = [KeyKind(kind)] if kind else list(SUBORDINATE_KINDS)
        found: list[KeyRecord] = []
        for k in kinds:
            found.extend(reversed(self.store.keys(k)))
        return found

    def active_key(self, kind: KeyKind) -> KeyRecord:
        """The key of `kind` in use now: active, under the newest root."""
        issuer = self.issuing_root()
        active = self.store.keys(kind, (KeyState.ACTIVE,))
        for record in reversed(active):
            if record.issuer_fingerprint == issuer.fingerprint:
                return record
        if active:
            return active[-1]
        raise FailedPrecondition(f"this server has no active {kind} key yet")

    def public_key_of(self, record: KeyRecord) -> PublicKey:
        return self.backends.public_key(record.key_uri)

    def server_names(self) -> list[str]:
        """The names the server's TLS certificate is for: no zone may use these."""
        names = [self.config.fqdn, *self.config.server_names, "localhost", "127.0.0.1", "::1"]
        hosts = [self.config.listen_address[0]]
        if self.config.console_address is not None:  # the console serves the same certificate
            hosts.append(self.config.console_address[0])
        for host in hosts:
            if host not in ("0.0.0.0", "::", "") and host not in names:  # noqa: S104 - compared
                names.append(host)
        return names

    # -- keys that go ----------------------------------------------------------------------

    def destroy_revoked_keys(self) -> None:
        """Destroy the private keys of revoked records (again after a crash or outage)."""
        for kind in DESTROYED_WHEN_REVOKED:
            for record in self.store.keys(kind, (KeyState.REVOKED,)):
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
                    tx.audit(
                        SERVER_ACTOR,
                        "key.destroy",
                        record.fingerprint,
                        before_fingerprint=record.fingerprint,
                        kind=kind,
                    )

    # -- what the TLS listeners serve ----------------------------------------------------

    def trusted_roots_pem(self) -> bytes:
        return "".join(r.certificate_pem or "" for r in self.active_roots()).encode()

    def tls_version(self) -> tuple[str, ...]:
        """Changes whenever the server certificate, the set of active roots or the
        trusted peers' roots change."""
        server = self.current_server_tls()
        return (
            server.fingerprint,
            *(r.fingerprint for r in self.active_roots()),
            "peers:",
            *self.admission.peers.root_fingerprints(),
        )

    def current_server_tls(self) -> KeyRecord:
        return self.active_key(KeyKind.SERVER_TLS)

    def tls_material(self) -> TlsMaterial:
        server = self.current_server_tls()
        issuer = self.store.key(server.issuer_fingerprint or "")
        chain = (server.certificate_pem or "") + ((issuer.certificate_pem or "") if issuer else "")
        return TlsMaterial(
            version=self.tls_version(),
            certificate_chain_pem=chain.encode(),
            private_key_pem=self.backends.tls_private_key_pem(server.key_uri),
            # A trusted peer's agents fail over here (mutual TLS both ways).
            client_ca_pem=self.trusted_roots_pem() + self.admission.peers.roots_pem(),
        )
