"""The zone server: enrolls with its server, signs its clients' certificates with its
own intermediate, relays the trust state, reports what it issued, and renews its
intermediate when the server's newest root changes or the intermediate nears expiry."""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keyplane.clients.bundle import Bundle, load_bundle
from keyplane.clients.client import (
    CHANNEL_OPTIONS,
    KeyplaneClient,
    KeyplaneClientError,
    bootstrap_channel_for,
    channel_for,
)
from keyplane.clients.credentials import Credential
from keyplane.clients.trust import TrustState, follow, key_fingerprint
from keyplane.plugins.keys import BackendPrivateKey, KeyAlgorithm, fingerprint
from keyplane.plugins.manager import KeyBackends
from keyplane.server.config import format_address, parse_address
from keyplane.server.domain import certs
from keyplane.server.domain.clock import Clock, SystemClock
from keyplane.server.domain.enrollment import (
    Issued,
    SubjectKey,
    check_csr,
    presented_certificate,
)
from keyplane.server.domain.identity import Identity
from keyplane.server.errors import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from keyplane.server.interceptor import KeyplaneInterceptor
from keyplane.server.services.enrollment import EnrollmentServicer
from keyplane.server.services.trust_state import TrustStateServicer, VersionNotifier
from keyplane.server.vitals import Vitals
from keyplane.v1 import (
    enrollment_service_pb2_grpc,
    trust_state_pb2,
    trust_state_service_pb2_grpc,
    zone_service_pb2,
)
from keyplane.zone.state import ZoneStore

log = logging.getLogger(__name__)

REPORT_SECONDS = 1.0
RENEW_CHECK_SECONDS = 5.0
# How long a further worker waits for worker 0 to store a renewed intermediate.
RENEWAL_WAIT_SECONDS = 10.0
# Renew the intermediate when less than this share of its lifetime is left.
RENEW_AT_REMAINING = 0.1


VERDICT_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class _TrustView:
    """What admission needs from one trust-state version, parsed once."""

    version: int
    revoked_serials: frozenset[str]
    intermediates: tuple[x509.Certificate, ...]
    # The intermediates by subject: a certificate is checked against those its issuer
    # name names, not against every one.
    by_subject: dict[x509.Name, tuple[x509.Certificate, ...]]


class ZoneError(Exception):
    """The zone server cannot start; the message says why."""


def free_port(host: str) -> int:
    """A free TCP port on `host` (for a listener asked for on port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _csr(key: BackendPrivateKey, name: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    )
    algorithm = KeyAlgorithm.EC_P384 if key.key_size == 384 else KeyAlgorithm.EC_P256
    return builder.sign(key, algorithm.signature_hash).public_bytes(serialization.Encoding.PEM)


def _root_set(state: TrustState) -> str:
    return ",".join(sorted(state.root_fingerprints))


@dataclass(frozen=True)
class ZoneOptions:
    """What `keyplane zone serve` was given."""

    data_dir: Path
    name: str
    listen: str
    bootstrap_listen: str
    backend: str = "software"
    backends: dict[str, dict[str, object]] | None = None
    # Testing only: the report writer thread dies after this many batches (a fault hook).
    report_writer_dies_after: int | None = None


class ZoneServer:
    """One zone server process."""

    def __init__(self, options: ZoneOptions, clock: Clock | None = None, worker: int = 0) -> None:
        self.options = options
        # Worker 0 (the only one without --workers) renews the intermediate and reports
        # what every worker issued; further workers serve and follow the trust state,
        # and pick a renewed intermediate up from zone.db.
        self.worker = worker
        self.clock = clock or SystemClock()
        options.data_dir.mkdir(parents=True, exist_ok=True)
        options.data_dir.chmod(0o700)
        configured = options.backends or {"software": {}}
        configured.setdefault("software", {})
        self.backends = KeyBackends(configured, options.data_dir)
        self.store = ZoneStore(options.data_dir / "zone.db")
        self.store.report_writer.die_after_batches = options.report_writer_dies_after
        self._lock = threading.RLock()
        self._trust: TrustState | None = None
        self._verdicts: dict[bytes, int] = {}
        self._shared: tuple[tuple[bytes, bytes], KeyplaneClient] | None = None
        self._issuer_cache: tuple[x509.Certificate, BackendPrivateKey] | None = None
        self._issuer_pem = ""
        self._view: _TrustView | None = None
        self._notify: Callable[[int], None] = lambda version: None
        self._stopping = threading.Event()
        self._server: grpc.aio.Server | None = None
        self._threads: list[threading.Thread] = []
        self.vitals = Vitals()
        self._health: health.aio.HealthServicer | None = None
        self._vital_part_died: asyncio.Event | None = None
        self._monitor: asyncio.Task[None] | None = None
        self.listen = ""
        self.bootstrap = ""

    # -- enrollment ----------------------------------------------------------------------

    @property
    def enrolled(self) -> bool:
        return self.store.get("tls_chain_pem") is not None

    def _bundle(self) -> Bundle:
        data = self.store.get("bundle")
        if data is None:
            raise ZoneError("the zone server has no init bundle")
        return load_bundle(bytes.fromhex(data))

    def enroll_with_server(self, bundle_data: bytes, fingerprint: str | None, token: str) -> None:
        """First start: make both keys here and have the server certify them."""
        bundle = load_bundle(bundle_data, fingerprint)
        server = bundle.server()
        intermediate = self.backends.generate_key(
            self.options.backend, f"{self.options.name} zone intermediate", KeyAlgorithm.EC_P256
        )
        tls = self.backends.generate_key(
            "software", f"{self.options.name} TLS", KeyAlgorithm.EC_P256
        )
        request = zone_service_pb2.EnrollZoneServerRequest(
            token=token,
            intermediate_csr=_csr(self.backends.private_key(intermediate.uri), self.options.name),
            tls_csr=_csr(self.backends.private_key(tls.uri), self.options.name),
            name=self.options.name,
            listen=self.listen,
            bootstrap_listen=self.bootstrap,
        )
        with KeyplaneClient(
            bootstrap_channel_for(server.bootstrap_listen, bundle.roots_pem())
        ) as c:
            response = c.enroll_zone_server(request)
        self.store.put(
            {
                "bundle": bundle_data.hex(),
                "server_listen": server.listen,
                "server_bootstrap": server.bootstrap_listen,
                "intermediate_uri": intermediate.uri,
                "intermediate_chain_pem": response.intermediate_chain_pem,
                "tls_uri": tls.uri,
                "tls_chain_pem": response.tls_certificate.certificate_chain_pem,
                "roots_pem": response.tls_certificate.roots_pem,
                "listen": self.listen,
                "bootstrap_listen": self.bootstrap,
            }
        )
        log.info("enrolled zone server %s with %s", self.options.name, server.name)

    def _credential(self) -> Credential:
        uri = self.store.get("tls_uri") or ""
        roots = (
            self._trust.roots_pem() if self._trust else (self.store.get("roots_pem") or "").encode()
        )
        return Credential(
            (self.store.get("tls_chain_pem") or "").encode(),
            self.backends.tls_private_key_pem(uri),
            roots,
            self.options.data_dir,
        )

    def _server_client(self) -> KeyplaneClient:
        return KeyplaneClient(
            channel_for(self.store.get("server_listen") or "", self._credential()), timeout=30
        )

    def _shared_client(self) -> KeyplaneClient:
        """One long-lived channel to the server for the per-request calls (token
        redemption, reports); replaced when the zone's certificate or roots change."""
        credential = self._credential()
        key = (credential.certificate_chain_pem, credential.root_certificates_pem)
        with self._lock:
            if self._shared is None or self._shared[0] != key:
                old = self._shared
                client = KeyplaneClient(
                    channel_for(self.store.get("server_listen") or "", credential), timeout=30
                )
                self._shared = (key, client)
                if old is not None:
                    old[1].close()
            return self._shared[1]

    def _issuer(self) -> tuple[x509.Certificate, BackendPrivateKey]:
        """The intermediate's certificate and key, parsed once per intermediate. zone.db
        is asked on every call, so that a worker issues from a renewed intermediate as
        soon as worker 0 has stored it, even before this worker's trust state shows the
        new root."""
        chain_pem = self.store.get("intermediate_chain_pem") or ""
        with self._lock:
            cached = self._issuer_cache
            if cached is None or self._issuer_pem != chain_pem:
                cached = (
                    x509.load_pem_x509_certificates(chain_pem.encode())[0],
                    self.backends.private_key(self.store.get("intermediate_uri") or ""),
                )
                self._issuer_cache, self._issuer_pem = cached, chain_pem
            return cached

    # -- the trust state -----------------------------------------------------------------

    def _load_trust(self) -> None:
        latest = self.store.latest_trust_version()
        if latest is not None:
            signed = trust_state_pb2.SignedTrustState.FromString(latest[2])
            body = trust_state_pb2.TrustStateBody.FromString(signed.body)
            self._trust = TrustState(body, signed)

    def _accept(self, batch: list[trust_state_pb2.SignedTrustState]) -> None:
        """Verify and keep new versions; renew the intermediate if a new root calls for it,
        and only then tell this zone's watchers, so that a client that renews because of
        the new version gets a certificate from the new chain."""
        with self._lock:
            state = self._trust
            for signed in batch:
                state = follow(state, [signed], self._bundle().root_fingerprints)
                self.store.add_trust_version(
                    state.version, _root_set(state), signed.SerializeToString()
                )
            self._trust = state
        self._maybe_renew_quietly()
        if state is not None:
            self._notify(state.version)

    def versions_since(self, since: int) -> list[bytes]:
        """What a client holding `since` needs: root-set changes, then the latest."""
        latest = self.store.latest_trust_version()
        if latest is None or latest[0] <= since:
            return []
        if since <= 0:
            return [latest[2]]
        held = self.store.trust_version(since)
        previous = held[1] if held else None
        chain = []
        for version, root_set, signed in self.store.trust_versions_after(since):
            if version == latest[0]:
                break
            if root_set != previous:
                chain.append(signed)
            previous = root_set
        chain.append(latest[2])
        return chain

    def _follow_loop(self) -> None:
        """Watch the server's trust state for as long as the zone runs; reconnect on error."""
        delay = 0.2
        while not self._stopping.is_set():
            try:
                with self._server_client() as client:
                    held = self._trust.version if self._trust else 0
                    watch = client.watch_trust_state(held)
                    self._watch = watch
                    for batch in watch:
                        self._accept(batch)
                        delay = 0.2
                        if self._stopping.is_set():
                            break
            except Exception as exc:  # reconnect on any failure, never die
                if not self._stopping.is_set():
                    log.warning("trust-state watch failed (%s); retrying in %.1f s", exc, delay)
            self._stopping.wait(delay * (0.5 + random.random()))  # noqa: S311 - jitter
            delay = min(delay * 2, 10.0)

    # -- the intermediate ----------------------------------------------------------------

    def _intermediate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(
            (self.store.get("intermediate_chain_pem") or "").encode()
        )[0]

    def _needs_renewal(self) -> str | None:
        trust = self._trust
        if trust is None:
            return None
        cert = self._intermediate()
        newest = trust.body.roots[-1] if trust.body.roots else None
        roots = trust.root_certificates
        if newest is not None:
            try:
                cert.verify_directly_issued_by(roots[newest.fingerprint])
            except Exception:
                return "the server's newest root did not issue the intermediate"
        now = self.clock.now()
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        if cert.not_valid_after_utc - now < lifetime * RENEW_AT_REMAINING:
            return "the intermediate nears expiry"
        return None

    def _maybe_renew(self) -> None:
        with self._lock:
            reason = self._needs_renewal()
            if reason is None:
                return
            log.info("renewing the zone intermediate: %s", reason)
            intermediate = self.backends.generate_key(
                self.options.backend, f"{self.options.name} zone intermediate", KeyAlgorithm.EC_P256
            )
            tls = self.backends.generate_key(
                "software", f"{self.options.name} TLS", KeyAlgorithm.EC_P256
            )
            request = zone_service_pb2.RenewZoneServerRequest(
                intermediate_csr=_csr(
                    self.backends.private_key(intermediate.uri), self.options.name
                ),
                tls_csr=_csr(self.backends.private_key(tls.uri), self.options.name),
            )
            with self._server_client() as client:
                response = client.renew_zone_server(request)
            self.store.put(
                {
                    "intermediate_uri": intermediate.uri,
                    "intermediate_chain_pem": response.intermediate_chain_pem,
                    "tls_uri": tls.uri,
                    "tls_chain_pem": response.tls_certificate.certificate_chain_pem,
                    "roots_pem": response.tls_certificate.roots_pem,
                }
            )
            self._issuer_cache = None

    def _renew_loop(self) -> None:
        while not self._stopping.wait(RENEW_CHECK_SECONDS):
            try:
                if self.worker == 0:  # the others read the result from zone.db
                    self._maybe_renew()
            except Exception as exc:  # never ends the loop: the next check tries again
                log.warning("zone intermediate renewal failed (%s); will retry", exc)

    # -- issuing -------------------------------------------------------------------------

    def _settings_hours(self, name: str, default: int) -> datetime.timedelta:
        trust = self._trust
        value = trust.body.zone_settings.get(name) if trust else None
        return datetime.timedelta(hours=int(value) if value else default)

    def _build(self, key: SubjectKey, common_name: str) -> tuple[Issued, x509.Certificate]:
        """Build and sign a client certificate from the zone's intermediate."""
        issuer_cert, issuer_key = self._issuer()
        roots_pem = (self._trust.roots_pem() if self._trust else b"").decode()
        now = self.clock.now()
        validity = self._settings_hours("PKIClientTLSKeyValidityHours", 168)
        window = self._settings_hours("PKIClientTLSKeyRenewalWindowHours", 4)
        cert = certs.build_client_certificate(
            issuer_key,
            issuer_cert,
            key,
            common_name,
            "agent",
            now,
            validity,
        )
        jitter = random.uniform(0, window.total_seconds() / 2)  # noqa: S311 - spreading load
        not_after = cert.not_valid_after_utc
        return Issued(
            chain_pem=certs.to_pem(cert) + certs.to_pem(issuer_cert),
            roots_pem=roots_pem,
            serial=certs.serial_hex(cert),
            not_after=not_after,
            renew_after=not_after - window + datetime.timedelta(seconds=jitter),
        ), cert

    def _issue_pending(self, key: SubjectKey, common_name: str) -> tuple[Issued, Future[object]]:
        """Build and sign now; the future completes once the report is durable (if it is
        cancelled first, nothing is recorded and the certificate is never handed out)."""
        issued, cert = self._build(key, common_name)
        durable = self.store.queue_report_pending(issued.serial, certs.to_der(cert), "agent")
        return issued, durable

    def enroll_client(self, csr_data: bytes, token: str) -> Issued:
        """Issue, then have the server spend the token and record the certificate in one
        transaction; only then is the certificate handed out."""
        _, key, common_name = check_csr(csr_data)
        issued, cert = self._build(key, common_name)
        try:
            self._shared_client().redeem_enrollment_token(token, common_name, certs.to_der(cert))
        except KeyplaneClientError as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(exc.message) from None
            raise Unavailable(
                f"the zone server cannot reach its server to check the token ({exc.code.name})"
            ) from None
        return issued

    def renew_client(self, identity: Identity, csr_data: bytes) -> Issued:
        issued, durable = self.renew_client_pending(identity, csr_data)
        durable.result()
        return issued

    def renew_client_pending(
        self, identity: Identity, csr_data: bytes
    ) -> tuple[Issued, Future[object]]:
        _, key, common_name = check_csr(csr_data)
        if "agent" not in identity.roles:
            raise PermissionDenied("only agents renew certificates here")
        if common_name != identity.common_name:
            raise InvalidArgument(
                f"the CSR's common name {common_name!r} differs from the certificate's "
                f"{identity.common_name!r}; renew keeps the same name"
            )
        if fingerprint(key) == key_fingerprint(identity.certificate):
            raise InvalidArgument("renewal needs a new key; the CSR reuses the current one")
        return self._issue_pending(key, common_name)

    def check_client_certificate(self, cert: x509.Certificate) -> str | None:
        trust = self._trust
        if trust is None:
            return "the zone server has no trust state yet"
        if cert.not_valid_after_utc < self.clock.now():
            return "it has expired"
        serial = certs.serial_hex(cert)
        view = self._trust_view(trust)
        if serial in view.revoked_serials:
            return "it was revoked"
        # A good verdict holds until the next trust-state version. It is keyed by the
        # whole certificate, not its serial: RenewWithProof certificates come unverified.
        digest = cert.fingerprint(hashes.SHA256())
        if self._verdicts.get(digest) == trust.version:
            return None
        for issuer in view.by_subject.get(cert.issuer, ()):
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if len(self._verdicts) > VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[digest] = trust.version
            return None
        return "its issuer is not a trusted intermediate"

    def _trust_view(self, trust: TrustState) -> _TrustView:
        view = self._view
        if view is None or view.version != trust.version:
            revoked = set(trust.body.revoked_key_fingerprints)
            intermediates = tuple(
                x509.load_der_x509_certificate(entry.certificate_der)
                for entry in trust.body.intermediates
                if entry.fingerprint not in revoked
            )
            by_subject: dict[x509.Name, tuple[x509.Certificate, ...]] = {}
            for intermediate in intermediates:
                by_subject[intermediate.subject] = (
                    *by_subject.get(intermediate.subject, ()),
                    intermediate,
                )
            view = _TrustView(
                trust.version, frozenset(trust.body.revoked_serials), intermediates, by_subject
            )
            self._view = view
        return view

    def _report_loop(self) -> None:
        while not self._stopping.wait(REPORT_SECONDS):
            try:
                pending = self.store.pending_reports()
                if not pending:
                    continue
                # Sent again after a lost answer: the server records each serial once.
                self._shared_client().report_issued_certificates(
                    [
                        zone_service_pb2.IssuedCertificateReport(certificate_der=d, component=c)
                        for _, d, c in pending
                    ]
                )
                self.store.reported([s for s, _, _ in pending])
            except Exception as exc:
                log.warning("reporting issued certificates failed (%s); will retry", exc)

    # -- serving -------------------------------------------------------------------------

    def _tls_version(self) -> tuple[str, str]:
        roots = ",".join(self._trust.root_fingerprints) if self._trust else ""
        return self.store.get("tls_chain_pem") or "", roots

    def _credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        served = {"version": self._tls_version()}

        def configuration() -> grpc.ServerCertificateConfiguration:
            credential = self._credential()
            return grpc.ssl_server_certificate_configuration(
                [(credential.private_key_pem, credential.certificate_chain_pem)],
                root_certificates=credential.root_certificates_pem,
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

    def prepare(
        self, bundle_data: bytes | None, fingerprint: str | None, token: str | None
    ) -> None:
        """Pick ports, enroll on first start, and fetch the trust state once."""
        host, port = parse_address(self.options.listen, "--listen")
        boot_host, boot_port = parse_address(self.options.bootstrap_listen, "--bootstrap-listen")
        if self.enrolled:
            self.listen = self.store.get("listen") or ""
            self.bootstrap = self.store.get("bootstrap_listen") or ""
        else:
            if bundle_data is None or not token:
                raise ZoneError("first start: give --bundle FILE and --token TOKEN to enroll")
            self.listen = format_address(host, port or free_port(host))
            self.bootstrap = format_address(boot_host, boot_port or free_port(boot_host))
            self.enroll_with_server(bundle_data, fingerprint, token)
        self._load_trust()
        try:
            with self._server_client() as client:
                held = self._trust.version if self._trust else 0
                self._accept(client.get_trust_state(held))
        except KeyplaneClientError as exc:
            if self._trust is None:
                raise ZoneError(f"cannot fetch the trust state from the server: {exc}") from None
            log.warning(
                "server unreachable at start (%s); relaying trust state v%d",
                exc.code.name,
                self._trust.version,
            )
        self._maybe_renew_quietly()

    def _maybe_renew_quietly(self) -> None:
        if self.worker != 0:
            self._await_renewal()
            return
        try:
            self._maybe_renew()
        except Exception as exc:
            log.warning("zone intermediate renewal failed (%s); will retry", exc)

    def _await_renewal(self, timeout: float = RENEWAL_WAIT_SECONDS) -> None:
        """A further worker: when the trust state calls for a new intermediate, wait
        (bounded) for worker 0 to store it, so this worker's clients get the new chain too;
        then tell them (issuing reads the intermediate from zone.db)."""
        deadline = time.monotonic() + timeout
        while self._needs_renewal() is not None and time.monotonic() < deadline:
            if self._stopping.wait(0.05):
                return

    async def start(self) -> None:
        server = grpc.aio.server(
            interceptors=[KeyplaneInterceptor(self.check_client_certificate)],
            # Several worker processes may listen on the same ports (--workers).
            options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 1)],
        )
        notifier = VersionNotifier()
        if self._trust is not None:
            notifier.published(self._trust.version)
        loop = asyncio.get_running_loop()
        # An enrollment waits on the server (to spend its token) in a thread: enough
        # threads that concurrent enrollments overlap their round trips.
        loop.set_default_executor(ThreadPoolExecutor(32, thread_name_prefix="keyplane-zone"))

        def wake_watchers(version: int) -> None:
            loop.call_soon_threadsafe(notifier.published, version)

        self._notify = wake_watchers
        enrollment_service_pb2_grpc.add_EnrollmentServiceServicer_to_server(  # type: ignore[no-untyped-call]
            EnrollmentServicer(ZoneClientIssuer(self)), server
        )
        trust_state_service_pb2_grpc.add_TrustStateServiceServicer_to_server(  # type: ignore[no-untyped-call]
            TrustStateServicer(self, notifier), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_secure_port(self.listen, self._credentials(True))
        server.add_secure_port(self.bootstrap, self._credentials(False))
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self._health = health_servicer
        loops = [
            ("trust-state follower", self._follow_loop),
            ("intermediate renewal", self._renew_loop),
        ]
        if self.worker == 0:
            # Reads what every worker queued in zone.db.
            loops.append(("report delivery", self._report_loop))
        for name, target in loops:
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            self._threads.append(thread)
            self.vitals.watch_thread(f"{name} thread", thread)
        writer = self.store.report_writer
        self.vitals.watch("report writer thread", lambda: writer.alive)
        self._vital_part_died = asyncio.Event()
        what = f"zone server {self.options.name} (worker {self.worker})"
        self._monitor = asyncio.create_task(self.vitals.monitor(self._on_vital_death, what))

    async def _on_vital_death(self, name: str) -> None:
        if self._health is not None:
            await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._vital_part_died is not None:
            self._vital_part_died.set()

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
        try:
            await asyncio.wait([terminated, died], return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()

    def close(self) -> None:
        """Release the files of a zone server that was prepared but not started."""
        if self._shared is not None:
            self._shared[1].close()
        self.store.close()
        self.backends.close()

    async def stop(self) -> None:
        self.vitals.stopping()
        if self._monitor is not None:
            self._monitor.cancel()
        self._stopping.set()
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.cancel()
        if self._server is not None:
            await self._server.stop(2.0)
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 10)
        if self._shared is not None:
            self._shared[1].close()
        self.store.close()
        self.backends.close()


class ZoneClientIssuer:
    """What EnrollmentService calls on a zone server."""

    def __init__(self, zone: ZoneServer) -> None:
        self._zone = zone

    def enroll(self, csr_data: bytes, token: str) -> Issued:
        return self._zone.enroll_client(csr_data, token)

    def renew(self, identity: Identity, csr_data: bytes) -> Issued:
        return self._zone.renew_client(identity, csr_data)

    def renew_pending(self, identity: Identity, csr_data: bytes) -> tuple[Issued, Future[object]]:
        return self._zone.renew_client_pending(identity, csr_data)

    def identity_from_chain(self, chain_pem: bytes) -> Identity:
        """The caller of RenewWithProof: a certificate a trusted intermediate signed,
        unexpired and unrevoked, as for a mutual-TLS caller."""
        cert = presented_certificate(chain_pem)
        problem = self._zone.check_client_certificate(cert)
        if problem is not None:
            raise PermissionDenied(f"the certificate is refused: {problem}")
        return Identity.of(cert)
