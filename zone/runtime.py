"""The zone server: enrolls with its server, signs its clients' certificates with its
own intermediate, relays the trust state, reports what it issued, and renews its
intermediate when the server's newest root changes or the intermediate nears expiry.

This module is the process: its parts (upstream: the server; relay: the trust state;
issuing: its clients), its listeners, its threads and what watches them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keyplane.clients.bundle import Bundle, load_bundle
from keyplane.clients.client import KeyplaneClientError
from keyplane.clients.trust import TrustState
from keyplane.plugins.manager import KeyBackends
from keyplane.server.backend_health import BackendHealth
from keyplane.server.config import format_address, parse_address
from keyplane.server.crl_http import CrlSite
from keyplane.server.datadir import DataDir, DataDirState, private_umask
from keyplane.server.domain import certs
from keyplane.server.domain.clock import Clock, SystemClock
from keyplane.server.domain.sightings import SIGHTINGS_SECONDS, Sightings
from keyplane.server.grpc_options import server_options
from keyplane.server.http_listen import raise_descriptor_limit
from keyplane.server.interceptor import KeyplaneInterceptor
from keyplane.server.logs import quiet_client_cancellations
from keyplane.server.metrics import Exposition, KeyExpiry, LiveReading, Metrics
from keyplane.server.metrics_http import MetricsEndpoint
from keyplane.server.ports import Listener, PortClaims, add_listener, claim_ports
from keyplane.server.services.enrollment import EnrollmentServicer
from keyplane.server.services.trust_state import TrustStateServicer, VersionNotifier
from keyplane.server.vitals import Vitals
from keyplane.v1 import enrollment_service_pb2_grpc, trust_state_service_pb2_grpc
from keyplane.zone.crl import ZoneCrlSigner
from keyplane.zone.issuing import ZoneIssuer
from keyplane.zone.relay import Relay
from keyplane.zone.state import ZoneStore, stored_addresses
from keyplane.zone.upstream import Upstream

log = logging.getLogger(__name__)

# How long a zone that learnt it was revoked goes on relaying the trust state, so that its
# clients learn it too, before it stops.
REVOKED_GRACE_SECONDS = 5.0


class ZoneError(Exception):
    """The zone server cannot start; the message says why."""


class ZoneRevoked(ZoneError):
    """The server revoked this zone server: it must be enrolled again."""


def free_port(host: str) -> int:
    """A free TCP port on `host` (for a listener asked for on port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class ZoneOptions:
    """What `keyplane zone serve` was given."""

    data_dir: Path
    name: str
    listen: str
    bootstrap_listen: str
    backend: str = "software"
    backends: dict[str, dict[str, object]] | None = None
    # CRLs over plain HTTP (server/crl_http.py); empty: not served.
    crl_listen: str = ""
    # How often the agents seen are reported to the server.
    sightings_seconds: float = SIGHTINGS_SECONDS
    # Testing only: the report writer thread dies after this many batches (a fault hook).
    report_writer_dies_after: int | None = None
    # Prometheus text on GET /metrics at this HOST:PORT (--metrics-listen); "": off.
    metrics_listen: str = ""
    # How often the key backends are checked (health is NOT_SERVING while one is down).
    backend_check_seconds: float = 10.0


class ZoneServer:
    """One zone server process."""

    def __init__(
        self,
        options: ZoneOptions,
        clock: Clock | None = None,
        worker: int = 0,
        own_ports: bool = False,
    ) -> None:
        """Open the data dir as a server does (server/datadir.py): initialise an empty
        one, finish an interrupted first start, refuse one with part of a state. With
        `own_ports` (the process that owns the ports: not a worker), claim the ports
        first (server/ports.py)."""
        self.options = options
        # Worker 0 (the only one without --workers) renews the intermediate and reports
        # what every worker issued; further workers serve and follow the trust state,
        # and pick a renewed intermediate up from zone.db.
        self.worker = worker
        self.clock = clock or SystemClock()
        private_umask()
        configured = options.backends or {"software": {}}
        configured.setdefault("software", {})
        self.data_dir = DataDir.of_zone(options.data_dir, configured["software"])
        found = self.data_dir.check()
        # The listeners it enrolled with, kept across restarts; else the options'.
        stored = stored_addresses(options.data_dir / "zone.db")
        listen, bootstrap = stored or (options.listen, options.bootstrap_listen)
        host, port = parse_address(listen, "--listen")
        boot_host, boot_port = parse_address(bootstrap, "--bootstrap-listen")
        self.ports: PortClaims | None = None
        listeners = [
            Listener("--listen", host, port),
            Listener("--bootstrap-listen", boot_host, boot_port),
        ]
        if options.crl_listen:
            listeners.append(
                Listener("--crl-listen", *parse_address(options.crl_listen, "--crl-listen"))
            )
        self.metrics_listen = options.metrics_listen
        crl_listen: list[str]
        if own_ports:
            if options.metrics_listen:
                listeners.append(
                    Listener(
                        "--metrics-listen",
                        *parse_address(options.metrics_listen, "--metrics-listen"),
                    )
                )
            self.ports = claim_ports(listeners)
            self.listen, self.bootstrap, *extra = self.ports.addresses
            crl_listen = extra[:1] if options.crl_listen else []
            if options.metrics_listen:
                self.metrics_listen = extra[-1]
        else:
            self.listen, self.bootstrap, *crl_listen = (
                format_address(x.host, x.port or free_port(x.host)) for x in listeners
            )
        self.crl_listen = crl_listen[0] if crl_listen else ""
        if found is DataDirState.EMPTY:
            self.data_dir.begin_first_start()
        elif found is DataDirState.UNFINISHED:
            log.warning("the first start of %s did not finish; finishing it", options.data_dir)
        self.data_dir.tighten_modes()
        self.metrics = Metrics()
        self.backends = KeyBackends(
            configured, options.data_dir, observe=self.metrics.key_operation
        )
        self.backend_health = BackendHealth(
            self.backends, self.metrics, self._set_health, options.backend_check_seconds
        )
        self.store = ZoneStore(options.data_dir / "zone.db")
        self.store.report_writer.die_after_batches = options.report_writer_dies_after
        self.stopping = threading.Event()
        # Every admitted call notes its caller; reported to the server in batches.
        self.sightings = Sightings(self.clock)
        self.upstream = Upstream(self)
        self.relay = Relay(self)
        self.issuing = ZoneIssuer(self)
        self.crl = ZoneCrlSigner(self)
        self._crl_site: CrlSite | None = None
        self._server: grpc.aio.Server | None = None
        self._threads: list[threading.Thread] = []
        self.vitals = Vitals()
        self._health: health.aio.HealthServicer | None = None
        self._vital_part_died: asyncio.Event | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.revoked_because: str | None = None
        self._revoked: asyncio.Event | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._checks: asyncio.Task[None] | None = None

    @property
    def enrolled(self) -> bool:
        return self.store.get("tls_chain_pem") is not None

    def bundle(self) -> Bundle:
        data = self.store.get("bundle")
        if data is None:
            raise ZoneError("the zone server has no init bundle")
        return load_bundle(bytes.fromhex(data))

    def prepare(
        self, bundle_data: bytes | None, fingerprint: str | None, token: str | None
    ) -> None:
        """Enroll on first start, and fetch the trust state once; then the first start
        is complete."""
        if not self.enrolled:
            if bundle_data is None or not token:
                raise ZoneError("first start: give --bundle FILE and --token TOKEN to enroll")
            self.upstream.enroll(bundle_data, fingerprint, token)
        # The intermediate it holds now is one of its own (zone.db from before kept none).
        current = self.issuing.intermediate()
        self.store.add_intermediate(certs.key_fingerprint(current), certs.to_pem(current))
        self.relay.load()
        try:
            with self.upstream.server_client() as client:
                held = self.relay.state.version if self.relay.state else 0
                self.relay.accept(client.get_trust_state(held))
        except KeyplaneClientError as exc:
            if self.relay.state is None:
                raise ZoneError(f"cannot fetch the trust state from the server: {exc}") from None
            log.warning(
                "server unreachable at start (%s); relaying trust state v%d",
                exc.code.name,
                self.relay.state.version,
            )
        if self.revoked_because is not None:
            raise ZoneRevoked(self.revoked_because)
        self.upstream.maybe_renew_quietly()
        self.data_dir.first_start_done()

    def check_revoked(self, state: TrustState) -> bool:
        """Whether the trust state revokes this zone (its current intermediate or its
        current certificate: older ones go with the root that issued them, as a rotation
        completes); if so, remember it and stop serving (once)."""
        if self.revoked_because is not None:
            return True
        intermediate = certs.key_fingerprint(self.issuing.intermediate())
        tls = self.store.get("tls_chain_pem") or ""
        serial = certs.serial_hex(x509.load_pem_x509_certificates(tls.encode())[0]) if tls else ""
        body = state.body
        if intermediate not in body.revoked_key_fingerprints and serial not in body.revoked_serials:
            return False
        self.revoked_because = (
            f"zone server {self.options.name} was revoked by its server (trust state "
            f"v{state.version}); it issues nothing more: enroll it again with a new "
            "zone-server token, in a new data dir"
        )
        log.error("%s; stopping in %.0f s", self.revoked_because, REVOKED_GRACE_SECONDS)
        if self._revoked is not None and self._loop is not None:
            # Long enough for its watchers to hear of the version that revokes them too.
            event = self._revoked
            self._loop.call_soon_threadsafe(
                lambda: self._loop.call_later(REVOKED_GRACE_SECONDS, event.set)  # type: ignore[union-attr]
            )
        return True

    # -- serving -------------------------------------------------------------------------

    def _tls_version(self) -> tuple[str, str]:
        state = self.relay.state
        roots = ",".join(state.root_fingerprints) if state else ""
        peers = ",".join(r.fingerprint for p in state.body.peers for r in p.roots) if state else ""
        return self.store.get("tls_chain_pem") or "", f"{roots};{peers}"

    def _peer_roots_pem(self) -> bytes:
        """The trusted peers' roots: their agents (active/active) are admitted here."""
        state = self.relay.state
        if state is None:
            return b""
        return b"".join(
            x509.load_der_x509_certificate(r.certificate_der).public_bytes(
                serialization.Encoding.PEM
            )
            for p in state.body.peers
            for r in p.roots
        )

    def _credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        served = {"version": self._tls_version()}

        def configuration() -> grpc.ServerCertificateConfiguration:
            credential = self.upstream.credential()
            return grpc.ssl_server_certificate_configuration(
                [(credential.private_key_pem, credential.certificate_chain_pem)],
                root_certificates=credential.root_certificates_pem + self._peer_roots_pem(),
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                version = self._tls_version()
                if version == served["version"]:
                    return None
                served["version"] = version
                return configuration()
            except Exception:
                log.exception("could not refresh the zone server's TLS configuration")
                return None

        return grpc.dynamic_ssl_server_credentials(
            configuration(), fetch, require_client_authentication=require_client_auth
        )

    def check_client_certificate(self, cert: x509.Certificate) -> str | None:
        """Why a client certificate is refused here, or None (for tests and tools)."""
        try:
            self.issuing.admit(cert)
        except Exception as exc:
            return str(exc)
        return None

    async def start(self) -> None:
        raise_descriptor_limit()  # as the server does (server/http_listen.py)
        quiet_client_cancellations()
        server = grpc.aio.server(
            interceptors=[
                KeyplaneInterceptor(
                    self.issuing.admit, metrics=self.metrics, sightings=self.sightings
                )
            ],
            options=server_options(),
        )
        notifier = VersionNotifier()
        if self.relay.state is not None:
            notifier.published(self.relay.state.version)
        loop = asyncio.get_running_loop()
        # An enrollment waits on the server (to spend its token) in a thread: enough
        # threads that concurrent enrollments overlap their round trips.
        loop.set_default_executor(ThreadPoolExecutor(32, thread_name_prefix="keyplane-zone"))

        def wake_watchers(version: int) -> None:
            loop.call_soon_threadsafe(notifier.published, version)

        self.relay.notify = wake_watchers
        enrollment_service_pb2_grpc.add_EnrollmentServiceServicer_to_server(  # type: ignore[no-untyped-call]
            EnrollmentServicer(self.issuing), server
        )
        trust_state_service_pb2_grpc.add_TrustStateServiceServicer_to_server(  # type: ignore[no-untyped-call]
            TrustStateServicer(self.relay, notifier, self.metrics), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        add_listener(server, self.listen, self._credentials(True), "--listen")
        add_listener(server, self.bootstrap, self._credentials(False), "--bootstrap-listen")
        if self.metrics_listen:
            endpoint = MetricsEndpoint(
                self.metrics_listen, Exposition(self.metrics, self._live_reading).render
            )
            self.metrics_listen = endpoint.start()
            self._metrics_endpoint = endpoint
        await server.start()
        if self.crl_listen:
            self._crl_site = CrlSite(self.crl.served, self.crl_listen)
            self.crl_listen = await self._crl_site.start()
        self._server = server
        self._health = health_servicer
        await self.backend_health.check()
        loops = [
            ("trust-state follower", self.relay.follow_loop),
            ("intermediate renewal", self.upstream.renew_loop),
            # Every worker reports the agents it saw itself.
            ("sightings delivery", self.upstream.sightings_loop),
        ]
        if self.worker == 0:
            # Reads what every worker queued in zone.db.
            loops.append(("report delivery", self.upstream.report_loop))
            # Signs the intermediate's CRL; every worker serves it from zone.db.
            loops.append(("CRL signer", self.crl.loop))
        for name, target in loops:
            thread = threading.Thread(target=target, daemon=True, name=name)
            thread.start()
            self._threads.append(thread)
            self.vitals.watch_thread(f"{name} thread", thread)
        writer = self.store.report_writer
        self.vitals.watch("report writer thread", lambda: writer.alive)
        self._vital_part_died = asyncio.Event()
        self._revoked = asyncio.Event()
        self._loop = loop
        what = f"zone server {self.options.name} (worker {self.worker})"
        self._monitor = asyncio.create_task(self.vitals.monitor(self._on_vital_death, what))
        self._checks = asyncio.create_task(self.backend_health.run())

    async def _on_vital_death(self, name: str) -> None:
        await self._set_health(serving=False)
        if self._vital_part_died is not None:
            self._vital_part_died.set()

    async def _set_health(self, serving: bool) -> None:
        if self._health is not None:
            ok = serving and self.vitals.died is None
            await self._health.set(
                "",
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

    def _live_reading(self) -> LiveReading:
        """What a scrape reads: the trust-state version relayed, and when the zone's
        intermediate and its TLS certificate expire."""
        state = self.relay.state
        keys = []
        intermediate = self.issuing.intermediate()
        keys.append(
            KeyExpiry(
                "zone_intermediate",
                certs.key_fingerprint(intermediate),
                intermediate.not_valid_after_utc.timestamp(),
            )
        )
        tls = self.store.get("tls_chain_pem") or ""
        if tls:
            cert = x509.load_pem_x509_certificates(tls.encode())[0]
            keys.append(
                KeyExpiry(
                    "zone_tls", certs.key_fingerprint(cert), cert.not_valid_after_utc.timestamp()
                )
            )
        return LiveReading(state.version if state else 0, keys)

    @property
    def vital_part_died(self) -> str | None:
        """What stopped, if a vital part did (the process should then exit)."""
        return self.vitals.died

    async def wait(self) -> None:
        """Until the gRPC server terminates or a vital part dies (see vital_part_died)."""
        assert self._server is not None and self._vital_part_died is not None  # noqa: S101
        # Never cancelled: grpc's wait_for_termination shares its future with shutdown(),
        # which a cancellation would break; it ends when the server stops.
        terminated = asyncio.ensure_future(self._server.wait_for_termination())
        died = asyncio.create_task(self._vital_part_died.wait())
        revoked = asyncio.create_task(self._revoked.wait()) if self._revoked else None
        waiting = [terminated, died, *([revoked] if revoked else [])]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            if revoked is not None:
                revoked.cancel()

    def close(self) -> None:
        """Release the files of a zone server that was prepared but not started."""
        self.upstream.close()
        self.store.close()
        self.backends.close()

    async def stop(self) -> None:
        self.vitals.stopping()
        if self._monitor is not None:
            self._monitor.cancel()
        if self._checks is not None:
            self._checks.cancel()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
            self._metrics_endpoint = None
        self.stopping.set()
        if self.upstream.watch is not None:
            self.upstream.watch.cancel()
        self.crl.wake()
        if self._crl_site is not None:
            await self._crl_site.stop()
            self._crl_site = None
        if self._server is not None:
            await self._server.stop(2.0)
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 10)
        self.close()
