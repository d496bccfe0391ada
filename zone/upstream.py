"""The zone server's side of its server: enrolling (first start), the credential it
calls with, the clients it calls through, renewing its intermediate when the server's
newest root changes or it nears expiry, and delivering what it issued."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import (
    KeyplaneClient,
    TrustStateWatch,
    bootstrap_channel_for,
    channel_for,
)
from keyplane.clients.credentials import Credential
from keyplane.plugins.keys import BackendPrivateKey, KeyAlgorithm
from keyplane.server.domain import certs
from keyplane.server.domain.renewal import ZONE_RENEW_AT_REMAINING
from keyplane.server.logs import log_event
from keyplane.server.services.convert import timestamp
from keyplane.v1 import zone_service_pb2

if TYPE_CHECKING:
    from keyplane.zone.runtime import ZoneServer

log = logging.getLogger(__name__)

REPORT_SECONDS = 1.0
RENEW_CHECK_SECONDS = 5.0
# How long a further worker waits for worker 0 to store a renewed intermediate.
RENEWAL_WAIT_SECONDS = 10.0
SERVER_TIMEOUT = 30.0
# Sightings per report call (the server takes at most 10,000).
MAX_SIGHTINGS = 10_000
# zone.db meta: the two key URIs of a renewal asked for and not yet answered.
PENDING_RENEWAL = "renewal_pending"


def _csr(key: BackendPrivateKey, name: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    )
    algorithm = KeyAlgorithm.EC_P384 if key.key_size == 384 else KeyAlgorithm.EC_P256
    return builder.sign(key, algorithm.signature_hash).public_bytes(serialization.Encoding.PEM)


class Upstream:
    """Everything the zone asks of its server."""

    def __init__(self, zone: ZoneServer) -> None:
        self.zone = zone
        self._lock = threading.RLock()
        self._shared: tuple[tuple[bytes, bytes], KeyplaneClient] | None = None
        self.watch: TrustStateWatch | None = None

    # -- enrollment ----------------------------------------------------------------------

    def _new_keys(self) -> tuple[str, str, bytes, bytes]:
        zone = self.zone
        name = zone.options.name
        intermediate = zone.backends.generate_key(
            zone.options.backend, f"{name} zone intermediate", KeyAlgorithm.EC_P256
        )
        tls = zone.backends.generate_key("software", f"{name} TLS", KeyAlgorithm.EC_P256)
        return (
            intermediate.uri,
            tls.uri,
            _csr(zone.backends.private_key(intermediate.uri), name),
            _csr(zone.backends.private_key(tls.uri), name),
        )

    def _keep_intermediate(self, chain_pem: str) -> None:
        cert = x509.load_pem_x509_certificates(chain_pem.encode())[0]
        self.zone.store.add_intermediate(certs.key_fingerprint(cert), certs.to_pem(cert))

    def enroll(self, bundle_data: bytes, fingerprint: str | None, token: str) -> None:
        """First start: make both keys here and have the server certify them."""
        zone = self.zone
        bundle = load_bundle(bundle_data, fingerprint)
        server = bundle.server()
        intermediate_uri, tls_uri, intermediate_csr, tls_csr = self._new_keys()
        request = zone_service_pb2.EnrollZoneServerRequest(
            token=token,
            intermediate_csr=intermediate_csr,
            tls_csr=tls_csr,
            name=zone.options.name,
            listen=zone.listen,
            bootstrap_listen=zone.bootstrap,
        )
        with KeyplaneClient(
            bootstrap_channel_for(server.bootstrap_listen, bundle.roots_pem())
        ) as c:
            response = c.enroll_zone_server(request)
        self._keep_intermediate(response.intermediate_chain_pem)
        zone.store.put(
            {
                "bundle": bundle_data.hex(),
                "server_name": server.name,
                "server_listen": server.listen,
                "server_bootstrap": server.bootstrap_listen,
                "intermediate_uri": intermediate_uri,
                "intermediate_chain_pem": response.intermediate_chain_pem,
                "tls_uri": tls_uri,
                "tls_chain_pem": response.tls_certificate.certificate_chain_pem,
                "roots_pem": response.tls_certificate.roots_pem,
                "listen": zone.listen,
                "bootstrap_listen": zone.bootstrap,
            }
        )
        log.info("enrolled zone server %s with %s", zone.options.name, server.name)

    # -- calling the server --------------------------------------------------------------

    def credential(self) -> Credential:
        zone = self.zone
        uri = zone.store.get("tls_uri") or ""
        state = zone.relay.state
        roots = state.roots_pem() if state else (zone.store.get("roots_pem") or "").encode()
        return Credential(
            (zone.store.get("tls_chain_pem") or "").encode(),
            zone.backends.tls_private_key_pem(uri),
            roots,
            zone.options.data_dir,
        )

    def server_client(self) -> KeyplaneClient:
        """A new mutual-TLS client of the server (close it after use)."""
        address = self.zone.store.get("server_listen") or ""
        return KeyplaneClient(channel_for(address, self.credential()), timeout=SERVER_TIMEOUT)

    def shared_client(self) -> KeyplaneClient:
        """One long-lived channel to the server for the per-request calls (token
        redemption, reports); replaced when the zone's certificate or roots change."""
        credential = self.credential()
        key = (credential.certificate_chain_pem, credential.root_certificates_pem)
        with self._lock:
            if self._shared is None or self._shared[0] != key:
                old = self._shared
                client = KeyplaneClient(
                    channel_for(self.zone.store.get("server_listen") or "", credential),
                    timeout=SERVER_TIMEOUT,
                )
                self._shared = (key, client)
                if old is not None:
                    old[1].close()
            return self._shared[1]

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        if self._shared is not None:
            self._shared[1].close()

    # -- the intermediate ----------------------------------------------------------------

    def needs_renewal(self) -> str | None:
        zone = self.zone
        state = zone.relay.state
        if state is None:
            return None
        cert = zone.issuing.intermediate()
        newest = state.body.roots[-1] if state.body.roots else None
        if newest is not None:
            try:
                cert.verify_directly_issued_by(state.root_certificates[newest.fingerprint])
            except Exception:
                return "the server's newest root did not issue the intermediate"
        now = zone.clock.now()
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        if cert.not_valid_after_utc - now < lifetime * ZONE_RENEW_AT_REMAINING:
            return "the intermediate nears expiry"
        # Its TLS certificate has the (shorter) client validity: it renews with it.
        tls_pem = zone.store.get("tls_chain_pem") or ""
        if tls_pem:
            tls = x509.load_pem_x509_certificates(tls_pem.encode())[0]
            lifetime = tls.not_valid_after_utc - tls.not_valid_before_utc
            if tls.not_valid_after_utc - now < lifetime * ZONE_RENEW_AT_REMAINING:
                return "its TLS certificate nears expiry"
        return None

    def maybe_renew(self) -> None:
        zone = self.zone
        with self._lock:
            reason = self.needs_renewal()
            if reason is None:
                return
            log.info("renewing the zone intermediate: %s", reason)
            try:
                self._renew(reason)
            except Exception:
                zone.metrics.rotation("zone_intermediate", ok=False)
                raise
            zone.metrics.rotation("zone_intermediate", ok=True)

    def _renew(self, reason: str) -> None:
        """New keys here, certified by the server's newest root; kept in zone.db."""
        zone = self.zone
        intermediate_uri, tls_uri, intermediate_csr, tls_csr = self._renewal_keys()
        request = zone_service_pb2.RenewZoneServerRequest(
            intermediate_csr=intermediate_csr, tls_csr=tls_csr
        )
        with self.server_client() as client:
            response = client.renew_zone_server(request)
        self._keep_intermediate(response.intermediate_chain_pem)
        zone.store.put(
            {
                "intermediate_uri": intermediate_uri,
                "intermediate_chain_pem": response.intermediate_chain_pem,
                "tls_uri": tls_uri,
                "tls_chain_pem": response.tls_certificate.certificate_chain_pem,
                "roots_pem": response.tls_certificate.roots_pem,
                PENDING_RENEWAL: "",
            }
        )
        renewed = x509.load_pem_x509_certificates(response.intermediate_chain_pem.encode())[0]
        log_event(
            "zone_intermediate.renew",
            "renewed the zone intermediate: %s",
            reason,
            fingerprint=certs.key_fingerprint(renewed),
            details={"reason": reason, "tls_serial": response.tls_certificate.serial},
        )

    def _renewal_keys(self) -> tuple[str, str, bytes, bytes]:
        """The keys of a renewal that did not get its answer (the server may have renewed
        and the answer was lost: asked again for the same keys, it answers the same), or
        new ones, recorded before they are asked for."""
        zone = self.zone
        pending = (zone.store.get(PENDING_RENEWAL) or "").split()
        if len(pending) == 2 and all(zone.backends.holds_key(uri) for uri in pending):
            intermediate_uri, tls_uri = pending
            name = zone.options.name
            return (
                intermediate_uri,
                tls_uri,
                _csr(zone.backends.private_key(intermediate_uri), name),
                _csr(zone.backends.private_key(tls_uri), name),
            )
        keys = self._new_keys()
        zone.store.put({PENDING_RENEWAL: f"{keys[0]} {keys[1]}"})
        return keys

    def maybe_renew_quietly(self) -> None:
        if self.zone.worker != 0:
            self.await_renewal()
            return
        try:
            self.maybe_renew()
        except Exception as exc:
            log.warning("zone intermediate renewal failed (%s); will retry", exc)

    def await_renewal(self, timeout: float = RENEWAL_WAIT_SECONDS) -> None:
        """A further worker: when the trust state calls for a new intermediate, wait
        (bounded) for worker 0 to store it, so this worker's clients get the new chain
        too; then tell them (issuing reads the intermediate from zone.db)."""
        deadline = time.monotonic() + timeout
        while self.needs_renewal() is not None and time.monotonic() < deadline:
            if self.zone.stopping.wait(0.05):
                return

    def renew_loop(self) -> None:
        while not self.zone.stopping.wait(RENEW_CHECK_SECONDS):
            try:
                if self.zone.worker == 0:  # the others read the result from zone.db
                    self.maybe_renew()
            except Exception as exc:  # never ends the loop: the next check tries again
                log.warning("zone intermediate renewal failed (%s); will retry", exc)

    # -- reports -------------------------------------------------------------------------

    def report_loop(self) -> None:
        zone = self.zone
        while not zone.stopping.wait(REPORT_SECONDS):
            try:
                pending = zone.store.pending_reports()
                if not pending:
                    continue
                # Sent again after a lost answer: the server records each serial once.
                self.shared_client().report_issued_certificates(
                    [
                        zone_service_pb2.IssuedCertificateReport(
                            certificate_der=d, component=c, renews_serial=renews or ""
                        )
                        for _, d, c, renews in pending
                    ]
                )
                zone.store.reported([s for s, _, _, _ in pending])
            except Exception as exc:
                log.warning("reporting issued certificates failed (%s); will retry", exc)

    def sightings_loop(self) -> None:
        """Every `sightings_seconds` (and at stop), tell the server when this worker last
        saw its agents: only those this zone's intermediates issued (the server refuses
        sightings of any other)."""
        zone = self.zone
        while True:
            stopping = zone.stopping.wait(zone.options.sightings_seconds)
            self.report_sightings()
            if stopping:
                return

    def report_sightings(self) -> None:
        zone = self.zone
        taken = zone.sightings.take()
        if not taken:
            return
        mine = dict(taken)
        try:
            own = zone.store.intermediates()
            mine = {s: v for s, v in taken.items() if v.issuer_fingerprint in own}
            items = list(mine.items())
            for first in range(0, len(items), MAX_SIGHTINGS):
                batch = items[first : first + MAX_SIGHTINGS]
                self.shared_client().report_sightings(
                    [
                        zone_service_pb2.CertificateSighting(
                            serial=serial, seen_time=timestamp(sighting.at)
                        )
                        for serial, sighting in batch
                    ]
                )
                for serial, _ in batch:
                    del mine[serial]
        except Exception as exc:
            zone.sightings.put_back(mine)  # the next report carries them
            log.warning("reporting sightings failed (%s); will retry", exc)
