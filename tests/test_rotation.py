"""Subordinate keys kept alive over weeks with an injected clock, and root rotation
cascades, on a real server."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import PolicyBuilder, Store

from keyplane.clients.client import KeyplaneClient
from keyplane.clients.trust import TrustState, follow
from keyplane.server.domain import certs
from keyplane.server.domain.clock import ManualClock
from tests.serverkit import FQDN, RunningServer

KINDS = ("server_tls", "intermediate_tls", "message_signing")


def valid_chain(server: RunningServer, kind: str, now: datetime.datetime) -> x509.Certificate:
    """The active certificate of `kind`, checked to chain to an active root at `now`."""
    hierarchy = server.hierarchy
    record = hierarchy.active_key(kind)
    cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
    roots = [
        x509.load_pem_x509_certificate(r.certificate_pem.encode()) for r in hierarchy.active_roots()
    ]
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc, (kind, now)
    if kind == "server_tls":
        verifier = (
            PolicyBuilder().store(Store(roots)).time(now).build_server_verifier(x509.DNSName(FQDN))
        )
        verifier.verify(cert, [])
    else:
        assert any(_issued_by(cert, root) for root in roots)
    return cert


def _issued_by(cert: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(root)
    except Exception:
        return False
    return True


def served_certificate(address: str) -> x509.Certificate:
    """The certificate the server presents in a real TLS handshake."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=FQDN) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_sixty_days_of_rotation_never_leave_a_gap(
    server: RunningServer, clock: ManualClock
) -> None:
    hierarchy = server.hierarchy
    seen: dict[str, set[str]] = {kind: set() for kind in KINDS}
    versions = [hierarchy.trust.latest_version()]
    for _ in range(60 * 24):
        clock.advance(datetime.timedelta(hours=1))
        hierarchy.reconcile()
        now = clock.now()
        for kind in KINDS:
            seen[kind].add(valid_chain(server, kind, now).fingerprint(hashes.SHA256()))
        versions.append(hierarchy.trust.latest_version())
    # 720 h validity, renewed 72 h before expiry: renewed on day 27 and day 54.
    assert {kind: len(f) for kind, f in seen.items()} == dict.fromkeys(KINDS, 3)
    assert versions == sorted(versions)
    # The listener serves the current server certificate after the rotations.
    current = x509.load_pem_x509_certificate(
        hierarchy.active_key("server_tls").certificate_pem.encode()
    )
    assert served_certificate(server.bootstrap) == current
    states = sorted(k.state for k in hierarchy.subordinate_keys("server_tls"))
    assert states == ["active", "retired", "retired"]
    audit = [a.action for a in hierarchy.store.audit_log(10000)]
    assert audit.count("key.activate") == 3 * 3


def test_renewal_follows_the_settings(server: RunningServer, clock: ManualClock) -> None:
    with server.admin_client() as client:
        client.update_setting("PKIMessageSigningKeyRenewalWindowHours", "12")
        client.update_setting("PKIMessageSigningKeyValidityHours", "48")
        # New settings apply to the next key; rotate now to get one.
        rotated = client.rotate_key("message-signing")
        before = server.hierarchy.active_key("message_signing")
        assert before.fingerprint == rotated.fingerprint
        clock.advance(datetime.timedelta(hours=30))
        server.hierarchy.reconcile()
        assert server.hierarchy.active_key("message_signing").fingerprint == before.fingerprint
        clock.advance(datetime.timedelta(hours=7))
        server.hierarchy.reconcile()
        after = server.hierarchy.active_key("message_signing")
        assert after.fingerprint != before.fingerprint
        assert after.not_after - after.not_before == datetime.timedelta(hours=48) + certs.BACKDATE


class Watcher:
    """A real WatchTrustState stream on the bootstrap listener, followed and verified."""

    def __init__(self, server: RunningServer, pinned: list[str]) -> None:
        self.state: TrustState | None = None
        self.versions: list[int] = []
        self.errors: list[BaseException] = []
        self._pinned = pinned
        self._channel = server.bootstrap_channel()
        self._client = KeyplaneClient(self._channel)
        self._stream = self._client.watch_trust_state(0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self._stream:
                self.state = follow(self.state, batch, self._pinned)
                self.versions.append(self.state.version)
        except BaseException as exc:
            self.errors.append(exc)

    def wait_for(self, version: int, timeout: float = 20.0) -> None:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while (self.state is None or self.state.version < version) and not self.errors:
            assert datetime.datetime.now() < deadline, (self.versions, version)
            threading.Event().wait(0.02)
        assert not self.errors, self.errors

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()
        self._thread.join(timeout=10)


def test_root_rotation_reissues_then_revocation_cascades(
    server: RunningServer, clock: ManualClock
) -> None:
    hierarchy = server.hierarchy
    root0 = hierarchy.issuing_root()
    old = {kind: hierarchy.active_key(kind) for kind in KINDS}
    watcher = Watcher(server, [root0.fingerprint])
    try:
        watcher.wait_for(hierarchy.trust.latest_version())
        with server.admin_client() as client:
            root1 = client.create_root_key()
        # Every subordinate is re-issued under the new root at once.
        for kind in KINDS:
            record = hierarchy.active_key(kind)
            assert record.issuer_fingerprint == root1.fingerprint
            assert hierarchy.store.key(old[kind].fingerprint).state == "retired"
        watcher.wait_for(hierarchy.trust.latest_version())
        assert set(watcher.state.root_fingerprints) == {root0.fingerprint, root1.fingerprint}

        with server.admin_client() as client:
            client.revoke_root_key(root0.fingerprint, "rotation", True)
        for kind in KINDS:
            assert hierarchy.store.key(old[kind].fingerprint).state == "revoked"
        watcher.wait_for(hierarchy.trust.latest_version())
        state = watcher.state
        assert state.root_fingerprints == [root1.fingerprint]
        assert root0.fingerprint in state.body.revoked_root_fingerprints
        assert {old[k].fingerprint for k in KINDS} <= set(state.body.revoked_key_fingerprints)
        # The watcher saw every version, in order, each verified from the one before.
        assert watcher.versions == sorted(set(watcher.versions))
    finally:
        watcher.close()
    for kind in KINDS:
        valid_chain(server, kind, clock.now())


def test_an_offline_client_catches_up_across_a_root_rotation(server: RunningServer) -> None:
    hierarchy = server.hierarchy
    root0 = hierarchy.issuing_root()
    with server.admin_client() as client:
        held = follow(None, client.get_trust_state(0), [root0.fingerprint])
        root1 = client.create_root_key()
    with server.admin_client() as client:
        client.revoke_root_key(root0.fingerprint, "rotation", True)
    with server.admin_client() as client:
        # The latest alone is signed only by Root 1, which the held version never saw.
        latest_only = client.get_trust_state(hierarchy.trust.latest_version() - 1)[-1:]
        with pytest.raises(Exception, match="not signed by any root"):
            follow(held, latest_only)
        bridged = client.get_trust_state(held.version)
    caught_up = follow(held, bridged)
    assert caught_up.version == hierarchy.trust.latest_version()
    assert caught_up.root_fingerprints == [root1.fingerprint]
    assert len(bridged) < caught_up.version - held.version + 1
