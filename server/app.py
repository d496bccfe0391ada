"""The keyplane server process: a grpc.aio server with two TLS listeners.

`--listen` requires a client certificate from this hierarchy (mutual TLS) and carries
every authenticated call; `--bootstrap-listen` is server-authenticated TLS only, for
what a component needs before it has a certificate. Both serve the same services behind
the same interceptor. Certificates are served through dynamic credentials, so a new
server certificate or a changed set of roots applies to the next handshake without a
restart.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from keyplane.plugins.manager import KeyBackends
from keyplane.plugins.password import Password, backends_with_password
from keyplane.server.backend_health import BackendHealth
from keyplane.server.config import ServerConfig, format_address
from keyplane.server.console.host import ConsoleHost
from keyplane.server.crl_http import CrlSite
from keyplane.server.datadir import DataDir, DataDirState, private_umask
from keyplane.server.domain.audit import AuditLog, RefusalRecorder
from keyplane.server.domain.backups import Backups, clean_up_workdirs
from keyplane.server.domain.bundles import Bundles
from keyplane.server.domain.clock import Clock, SystemClock
from keyplane.server.domain.console_sessions import ConsoleSignIn
from keyplane.server.domain.enrollment import Enrollment
from keyplane.server.domain.exchange import TrustExchange
from keyplane.server.domain.faults import Faults
from keyplane.server.domain.hierarchy import Hierarchy, StartReport, TlsMaterial
from keyplane.server.domain.identities import Identities
from keyplane.server.domain.signing import MessageSigner
from keyplane.server.domain.status import Status
from keyplane.server.domain.zones import Zones
from keyplane.server.grpc_options import server_options
from keyplane.server.http_listen import raise_descriptor_limit
from keyplane.server.interceptor import CallLimits, KeyplaneInterceptor
from keyplane.server.key_usage import UsageRecorder
from keyplane.server.kinds import KeyKind, KeyState
from keyplane.server.logs import quiet_client_cancellations
from keyplane.server.metrics import Exposition, KeyExpiry, LiveReading, Metrics
from keyplane.server.metrics_http import MetricsEndpoint
from keyplane.server.peer_link import PeerLink
from keyplane.server.peer_transport import GrpcPeerTransport
from keyplane.server.ports import add_listener
from keyplane.server.services.audit import AuditServicer
from keyplane.server.services.backups import BackupServicer
from keyplane.server.services.bundles import BundleServicer
from keyplane.server.services.certificates import CertificateServicer
from keyplane.server.services.console import ConsoleServicer
from keyplane.server.services.enrollment import EnrollmentServicer
from keyplane.server.services.identities import IdentityServicer
from keyplane.server.services.keys import KeyServicer
from keyplane.server.services.message_signing import MessageSigningServicer
from keyplane.server.services.root_keys import RootKeyServicer
from keyplane.server.services.settings import SettingsServicer
from keyplane.server.services.status import StatusServicer
from keyplane.server.services.trust import TrustServicer
from keyplane.server.services.trust_state import TrustStateServicer, VersionNotifier
from keyplane.server.services.zones import ZoneServicer
from keyplane.server.store import StateStore
from keyplane.server.vitals import Vitals
from keyplane.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    backup_service_pb2,
    backup_service_pb2_grpc,
    bundle_service_pb2,
    bundle_service_pb2_grpc,
    certificate_service_pb2,
    certificate_service_pb2_grpc,
    console_service_pb2,
    console_service_pb2_grpc,
    enrollment_service_pb2,
    enrollment_service_pb2_grpc,
    identity_service_pb2,
    identity_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    message_signing_service_pb2,
    message_signing_service_pb2_grpc,
    root_key_service_pb2,
    root_key_service_pb2_grpc,
    settings_service_pb2,
    settings_service_pb2_grpc,
    status_service_pb2,
    status_service_pb2_grpc,
    trust_service_pb2,
    trust_service_pb2_grpc,
    trust_state_service_pb2,
    trust_state_service_pb2_grpc,
    zone_service_pb2,
    zone_service_pb2_grpc,
)

log = logging.getLogger(__name__)

_SERVICE_MODULES = (
    root_key_service_pb2,
    key_service_pb2,
    settings_service_pb2,
    trust_state_service_pb2,
    message_signing_service_pb2,
    enrollment_service_pb2,
    zone_service_pb2,
    certificate_service_pb2,
    bundle_service_pb2,
    identity_service_pb2,
    backup_service_pb2,
    audit_service_pb2,
    trust_service_pb2,
    status_service_pb2,
    console_service_pb2,
)
# Every keyplane service, by full name.
SERVICES = {
    service.full_name: service
    for module in _SERVICE_MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
}
SERVICE_NAMES = tuple(SERVICES)
# How often each process looks for trust-state versions that other workers published.
VERSION_POLL_SECONDS = 0.1


def _service_of(servicer: object) -> str:
    """The full name of the service a servicer implements (by its generated base)."""
    for base in type(servicer).__mro__:
        name = f"keyplane.v1.{base.__name__.removesuffix('Servicer')}"
        if base.__name__.endswith("Servicer") and name in SERVICES:
            return name
    raise TypeError(f"{type(servicer).__name__} implements no keyplane service")


@dataclass(frozen=True)
class Endpoints:
    """The bound addresses (ports resolved when 0 was asked for)."""

    listen: str
    bootstrap_listen: str
    connect_listen: str
    connect_bootstrap: str
    crl_listen: str = ""  # the CRL listener (HTTP), when one is configured
    metrics_listen: str = ""


class KeyplaneServer:
    """Owns the store, the backends, the hierarchy and the gRPC server of one process."""

    def __init__(self, config: ServerConfig, clock: Clock | None = None, worker: int = 0) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        # Worker 0 initialises, runs the rotation scheduler and writes the endpoint note;
        # further workers (keyplane serve --workers N) only serve.
        self.worker = worker
        self._store: StateStore | None = None
        self._backends: KeyBackends | None = None
        self._server: grpc.aio.Server | None = None
        self.hierarchy: Hierarchy | None = None
        self.endpoints: Endpoints | None = None
        self.report: StartReport | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.vitals = Vitals()
        self._health: health.aio.HealthServicer | None = None
        self._vital_part_died: asyncio.Event | None = None
        self.peer_link: PeerLink | None = None
        self._crl_site: CrlSite | None = None
        self.metrics = Metrics()
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._backend_health: BackendHealth | None = None
        self._usage: UsageRecorder | None = None
        self.console = ConsoleHost(config, self.clock, self.vitals)

    def open(self, password: Password | None = None) -> StartReport:
        """Open the data dir and its key backends: initialise an empty one, finish an
        interrupted first start, reuse a complete one; refuse (DataDirIncomplete, nothing
        changed) one that holds only part of a state (see server/datadir.py). `password`
        opens a password-protected pki.db that was given none (unlock); without one such
        a pki.db raises PasswordRequiredError and nothing is opened."""
        private_umask()
        data_dir = DataDir.of_server(self.config.data_dir, self.config.backends["software"])
        found = data_dir.check()
        if found is DataDirState.EMPTY:
            data_dir.begin_first_start()
        elif found is DataDirState.UNFINISHED:
            log.warning("the first start of %s did not finish; finishing it", data_dir.path)
        data_dir.tighten_modes()
        self._backends = KeyBackends(
            backends_with_password(self.config.backends, password),
            self.config.data_dir,
            observe=self.metrics.key_operation,
        )
        Faults(self.config.kill_at).checkpoint("start.backends_opened")
        self._store = StateStore(self.config.data_dir / "keyplane.db")
        if self.config.commit_thread_dies_after is not None:
            self._store.committer.die_after_batches = self.config.commit_thread_dies_after
        self.hierarchy = Hierarchy(
            self.config, self._store, self._backends, self.clock, metrics=self.metrics
        )
        self._usage = UsageRecorder(self._backends, self._store, self.clock)
        self._backend_health = BackendHealth(
            self._backends, self.metrics, self._set_health, self.config.backend_check_seconds
        )
        if self.worker == 0:
            self.report = self.hierarchy.start()
            data_dir.first_start_done()
        else:
            # A worker restarted after a kill cleans up the key it may have been making.
            self.hierarchy.keys.clean_up()
            self.report = StartReport((), self.hierarchy.issuing_root())
        clean_up_workdirs(self.config.data_dir)  # and the backup it may have been making
        return self.report

    def _credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        hierarchy = self.hierarchy
        assert hierarchy is not None  # noqa: S101 - open() ran
        material = hierarchy.tls_material()
        served = {"version": material.version}

        def configuration(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(m.private_key_pem, m.certificate_chain_pem)],
                root_certificates=m.client_ca_pem,
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each handshake: None keeps what is served.
            try:
                version = hierarchy.tls_version()
                if version == served["version"]:
                    return None
                fresh = hierarchy.tls_material()
                served["version"] = fresh.version
                return configuration(fresh)
            except Exception:
                log.exception("could not refresh the TLS certificate; keeping the current one")
                return None

        return grpc.dynamic_ssl_server_credentials(
            configuration(material), fetch, require_client_authentication=require_client_auth
        )

    def _advertised(self) -> tuple[str, str]:
        """The addresses components should use: the bound ports, on a connectable host."""
        assert self.endpoints is not None  # noqa: S101 - start() ran
        return self.endpoints.connect_listen, self.endpoints.connect_bootstrap

    def console_url(self) -> str | None:
        """Where a browser opens the console (None when it is off, or not bound yet)."""
        return self.console.url()

    async def start(self) -> Endpoints:
        # The listeners' caps (server/http_listen.py) leave gRPC and SQLite descriptors
        # within the limit; a raised limit leaves them more.
        raise_descriptor_limit()
        if self.hierarchy is None:
            await asyncio.to_thread(self.open)
        assert self.hierarchy is not None  # noqa: S101
        hierarchy = self.hierarchy
        quiet_client_cancellations()
        loop = asyncio.get_running_loop()
        # Enough threads that concurrent requests share a group commit.
        loop.set_default_executor(ThreadPoolExecutor(32, thread_name_prefix="keyplane"))
        refusals = RefusalRecorder(hierarchy.store, self.clock)
        server = grpc.aio.server(
            interceptors=[
                KeyplaneInterceptor(
                    hierarchy.admission.admit,
                    CallLimits(self.config.max_calls_per_listener, self.config.max_streams),
                    refusals.refused,
                    self.metrics,
                    hierarchy.sightings,
                )
            ],
            options=server_options(self.config.min_ping_interval_ms),
        )
        enrollment = Enrollment(hierarchy)
        notifier = VersionNotifier()
        notifier.published(hierarchy.trust.latest_version())

        def wake_watchers(version: int) -> None:
            loop.call_soon_threadsafe(notifier.published, version)

        hierarchy.trust.on_publish(wake_watchers)
        exchange = TrustExchange(hierarchy, GrpcPeerTransport(), self._advertised)
        # Worker 0 keeps the trusted peers current (the others serve what it stores).
        self.peer_link = PeerLink(exchange, hierarchy.trust) if self.worker == 0 else None
        link = self.peer_link
        servicers: list[tuple[Callable[..., None], object]] = [
            (
                root_key_service_pb2_grpc.add_RootKeyServiceServicer_to_server,
                RootKeyServicer(hierarchy),
            ),
            (key_service_pb2_grpc.add_KeyServiceServicer_to_server, KeyServicer(hierarchy)),
            (
                settings_service_pb2_grpc.add_SettingsServiceServicer_to_server,
                SettingsServicer(hierarchy),
            ),
            (
                trust_state_service_pb2_grpc.add_TrustStateServiceServicer_to_server,
                TrustStateServicer(hierarchy.trust, notifier, self.metrics),
            ),
            (
                message_signing_service_pb2_grpc.add_MessageSigningServiceServicer_to_server,
                MessageSigningServicer(MessageSigner(hierarchy)),
            ),
            (
                enrollment_service_pb2_grpc.add_EnrollmentServiceServicer_to_server,
                EnrollmentServicer(enrollment),
            ),
            (
                zone_service_pb2_grpc.add_ZoneServiceServicer_to_server,
                ZoneServicer(Zones(hierarchy, enrollment.tokens)),
            ),
            (
                certificate_service_pb2_grpc.add_CertificateServiceServicer_to_server,
                CertificateServicer(enrollment),
            ),
            (
                bundle_service_pb2_grpc.add_BundleServiceServicer_to_server,
                BundleServicer(Bundles(hierarchy), self._advertised),
            ),
            (
                identity_service_pb2_grpc.add_IdentityServiceServicer_to_server,
                IdentityServicer(Identities(hierarchy)),
            ),
            (
                backup_service_pb2_grpc.add_BackupServiceServicer_to_server,
                BackupServicer(Backups(hierarchy)),
            ),
            (
                status_service_pb2_grpc.add_StatusServiceServicer_to_server,
                StatusServicer(Status(hierarchy, Backups(hierarchy), self.backend_health)),
            ),
            (
                audit_service_pb2_grpc.add_AuditServiceServicer_to_server,
                AuditServicer(AuditLog(hierarchy.store)),
            ),
            (
                trust_service_pb2_grpc.add_TrustServiceServicer_to_server,
                TrustServicer(exchange, link.wake if link else lambda: None),
            ),
            (
                console_service_pb2_grpc.add_ConsoleServiceServicer_to_server,
                ConsoleServicer(
                    ConsoleSignIn(hierarchy.store, hierarchy.admission, self.clock),
                    self.console_url,
                ),
            ),
        ]
        for add, servicer in servicers:
            add(servicer, server)
        # The console calls these very servicers, by RPC path.
        services = {_service_of(servicer): servicer for _, servicer in servicers}
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        host, port = self.config.listen_address
        boot_host, boot_port = self.config.bootstrap_address
        bound = add_listener(
            server, format_address(host, port), self._credentials(True), "--listen"
        )
        boot_bound = add_listener(
            server,
            format_address(boot_host, boot_port),
            self._credentials(False),
            "--bootstrap-listen",
        )
        metrics_listen = ""
        if self.config.metrics_listen:
            endpoint = MetricsEndpoint(
                self.config.metrics_listen, Exposition(self.metrics, self._live_reading).render
            )
            metrics_listen = endpoint.start()
            self._metrics_endpoint = endpoint
        await server.start()
        self._server = server
        self._health = health_servicer
        await self.console.start(self.worker, hierarchy, services, SERVICES, refusals)
        checks = self._backend_health
        assert checks is not None  # noqa: S101 - open() ran
        await checks.check()  # before the first SERVING: an HSM may be gone already
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        connect_boot = "127.0.0.1" if boot_host in ("0.0.0.0", "") else boot_host  # noqa: S104
        crl_listen = ""
        if self.config.crl_listen:
            crls = hierarchy.crls

            def lookup(fingerprint: str) -> tuple[bytes, datetime.datetime] | None:
                record = crls.served(fingerprint)
                return (record.der, record.this_update) if record is not None else None

            self._crl_site = CrlSite(lookup, self.config.crl_listen)
            crl_listen = await self._crl_site.start()
        self.endpoints = Endpoints(
            format_address(host, bound),
            format_address(boot_host, boot_bound),
            format_address(connect_host, bound),
            format_address(connect_boot, boot_bound),
            crl_listen,
            metrics_listen,
        )
        store = self._store
        assert store is not None  # noqa: S101 - open() ran
        self.vitals.watch("group-commit thread", lambda: store.committer.alive)
        backends = self._backends
        if backends is not None:  # a token taken away is back only in a fresh process
            self.vitals.watch("key backend", lambda: backends.lost() is None)
        follower = asyncio.create_task(self._follow_versions(notifier))
        self.vitals.watch_task("trust-state version follower", follower)
        self._tasks.append(follower)
        self._tasks.append(asyncio.create_task(checks.run()))
        if self._usage is not None:
            self._tasks.append(asyncio.create_task(self._usage.run()))
        # Every worker writes who it saw (never a write per call).
        self._tasks.append(asyncio.create_task(self._sightings_loop()))
        if self.worker == 0:
            self.hierarchy.admin_dir.write_endpoint(
                self.endpoints.connect_listen,
                self.endpoints.connect_bootstrap,
                self.config.fqdn,
                self.endpoints.crl_listen,
                self.console_url(),
            )
            scheduler = asyncio.create_task(self._rotation_loop())
            self.vitals.watch_task("rotation scheduler", scheduler)
            self._tasks.append(scheduler)
            if self.peer_link is not None:
                self.peer_link.start()
        self._vital_part_died = asyncio.Event()
        what = f"keyplane server (worker {self.worker})"
        self._tasks.append(asyncio.create_task(self.vitals.monitor(self._on_vital_death, what)))
        return self.endpoints

    async def _on_vital_death(self, name: str) -> None:
        """A part this process needs has stopped: say so to health checks, then let
        wait() return so that the process exits and is started again."""
        await self._set_health(serving=False)
        if self._vital_part_died is not None:
            self._vital_part_died.set()

    def backend_health(self) -> dict[str, str | None]:
        """Each key backend's health at the last check: None, or why it does not answer."""
        return dict(self._backend_health.found) if self._backend_health else {}

    async def _set_health(self, serving: bool) -> None:
        if self._health is None:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving and self.vitals.died is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in (*SERVICE_NAMES, ""):
            await self._health.set(service, status)

    def _live_reading(self) -> LiveReading:
        """What a scrape reads from the state DB: the trust-state version and when each
        active key expires."""
        hierarchy = self.hierarchy
        assert hierarchy is not None  # noqa: S101 - serving
        keys = [
            KeyExpiry(str(k.kind), k.fingerprint, k.not_after.timestamp())
            for kind in KeyKind
            for k in hierarchy.store.keys(kind, (KeyState.ACTIVE,))
            if k.not_after is not None
        ]
        return LiveReading(hierarchy.trust.latest_version(), keys)

    @property
    def vital_part_died(self) -> str | None:
        """What stopped, if a vital part did (the process should then exit)."""
        return self.vitals.died

    async def _follow_versions(self, notifier: VersionNotifier) -> None:
        """Wake this process's watchers for versions other workers published."""
        assert self.hierarchy is not None  # noqa: S101
        while True:
            await asyncio.sleep(VERSION_POLL_SECONDS)
            try:
                latest = await asyncio.to_thread(self.hierarchy.trust.latest_version)
            except Exception:
                log.exception("could not read the trust-state version")
                continue
            notifier.published(latest)

    async def _sightings_loop(self) -> None:
        """Write who was seen, one batch every sightings_seconds."""
        assert self.hierarchy is not None  # noqa: S101
        while True:
            await asyncio.sleep(self.config.sightings_seconds)
            try:
                await asyncio.to_thread(self.hierarchy.write_sightings)
            except Exception:
                log.exception("could not write the sightings; keeping them for the next batch")

    async def _rotation_loop(self) -> None:
        """Renew subordinates as they enter their renewal window; the DB is the truth."""
        assert self.hierarchy is not None  # noqa: S101
        while True:
            await asyncio.sleep(self.config.rotation_check_seconds)
            try:
                await asyncio.to_thread(self.hierarchy.reconcile)
            except Exception:
                log.exception(
                    "rotation check failed; trying again in %s s",
                    self.config.rotation_check_seconds,
                )

    async def wait(self) -> None:
        """Until the gRPC server terminates or a vital part dies (see vital_part_died)."""
        assert self._server is not None and self._vital_part_died is not None  # noqa: S101
        # Never cancelled: grpc's wait_for_termination shares its future with shutdown(),
        # which a cancellation would break; it ends when the server stops.
        terminated = asyncio.ensure_future(self._server.wait_for_termination())
        died = asyncio.create_task(self._vital_part_died.wait())
        try:
            await asyncio.wait([terminated, died], return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()

    async def stop(self, grace: float | None = 5.0) -> None:
        self.vitals.stopping()
        if self.peer_link is not None:
            await asyncio.to_thread(self.peer_link.stop)
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._crl_site is not None:
            await self._crl_site.stop()
            self._crl_site = None
        await self.console.stop()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.hierarchy is not None and self._store is not None:
            try:
                await asyncio.to_thread(self.hierarchy.write_sightings)  # the last batch
            except Exception:
                log.exception("could not write the last sightings")
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
            self._metrics_endpoint = None
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Record the last key usage counts, then close the state DB and the backends."""
        try:
            if self._usage is not None and self._store is not None:
                self._usage.flush()
        except Exception:
            log.exception("could not record the last key usage counts")
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._backends is not None:
            self._backends.close()
            self._backends = None
