"""Prometheus metrics (`--metrics-listen`) of a real `keyplane serve --workers 2`: every
call the test makes is counted once, by status, whichever worker took it, through a
worker's death and restart; the page has the metric names and labels of the README and
no secret; the endpoint serves GET /metrics and nothing else. And the per-key signature
counts that `keys list` shows."""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.clients.credentials import load_credential
from keyplane.v1 import audit_service_pb2, trust_state_service_pb2, trust_state_service_pb2_grpc
from tests.opskit import (
    Keyplane,
    Samples,
    free_port,
    http_status,
    listen_address,
    scrape,
    serve,
    value,
    wait_until,
    workers,
)
from tests.serverkit import running_server
from tests.test_enrollment import make_csr, p256

HANDLED = "grpc_server_handled_total"
STARTED = "grpc_server_started_total"
SECONDS_COUNT = "grpc_server_handling_seconds_count"


class Served:
    """The module's server: --workers 2, metrics on a port of its own."""

    def __init__(self, process: Keyplane, data: Path, metrics: str) -> None:
        self.process = process
        self.data = data
        self.metrics = metrics
        self.listen = listen_address(data)
        self.credential = load_credential(data / "admin")

    def admin(self) -> KeyplaneClient:
        """A new client on a connection of its own (so that calls spread over workers)."""
        return KeyplaneClient.connect(self.listen, self.credential)

    def anonymous(self) -> KeyplaneClient:
        """A client of the bootstrap listener: no certificate, no identity."""
        note = json.loads((self.data / "admin" / "endpoint.json").read_text())
        roots = self.credential.root_certificates_pem
        return KeyplaneClient(bootstrap_channel_for(note["bootstrap_listen"], roots))

    def audit_events(self) -> int:
        with self.admin() as admin:
            return len(list(admin.audit_events(audit_service_pb2.ListAuditEventsRequest())))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("metrics")
    metrics = f"127.0.0.1:{free_port()}"
    process = serve(base / "data", base / "serve", "--workers", "2", "--metrics-listen", metrics)
    try:
        yield Served(process, base / "data", metrics)
    finally:
        assert process.stop() == 0


def rpc(method: str) -> dict[str, str]:
    service, name = method.rsplit("/", 1)
    return {"grpc_type": "unary", "grpc_service": service, "grpc_method": name}


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def make_calls(served: Served, rounds: int) -> dict[tuple[str, str], int]:
    """Calls over a new connection each (the kernel spreads connections over the
    workers): (method, status) -> how many were made."""
    made: dict[tuple[str, str], int] = {}

    def count(method: str, code: grpc.StatusCode) -> None:
        made[(method, code.name)] = made.get((method, code.name), 0) + 1

    for _ in range(rounds):
        with served.admin() as admin:
            admin.list_keys()
            count("keyplane.v1.KeyService/ListKeys", grpc.StatusCode.OK)
            with pytest.raises(KeyplaneClientError) as refused:
                admin.get_root_key("00" * 32)
            assert refused.value.code == grpc.StatusCode.NOT_FOUND
            count("keyplane.v1.RootKeyService/GetRootKey", refused.value.code)
        with served.anonymous() as anonymous:
            with pytest.raises(KeyplaneClientError) as refused:
                anonymous.list_keys()
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            count("keyplane.v1.KeyService/ListKeys", refused.value.code)
    return made


def assert_counted(before: Samples, after: Samples, made: dict[tuple[str, str], int]) -> None:
    for (method, code), count in made.items():
        labels = rpc(method)
        assert delta(after, before, HANDLED, **labels, grpc_code=code) == count, (method, code)
    for method in {m for m, _ in made}:
        calls = sum(n for (m, _), n in made.items() if m == method)
        assert delta(after, before, STARTED, **rpc(method)) == calls, method
        assert delta(after, before, SECONDS_COUNT, **rpc(method)) == calls, method


def test_a_scrape_adds_up_every_workers_calls_through_a_restart(served: Served) -> None:
    before = scrape(served.metrics)[1]
    made = make_calls(served, 6)
    after = scrape(served.metrics)[1]
    assert_counted(before, after, made)
    # Two processes counted them, each in its own files of this run.
    supervisor = served.process.proc.pid
    pids = workers(supervisor)
    assert len(pids) == 2
    counted = {p.name for p in (served.data / "metrics").glob("counter_*.db")}
    assert counted == {f"counter_{pid}.db" for pid in pids}, "both workers took calls"

    # A worker killed outright: its counts stay in the run's totals, and the fresh
    # worker the supervisor starts counts from zero in files of its own.
    os.kill(pids[0], signal.SIGKILL)
    wait_until("a fresh worker", lambda: len(set(workers(supervisor)) - set(pids)) == 1)
    more = make_calls(served, 4)
    final = scrape(served.metrics)[1]
    total = {k: made.get(k, 0) + more.get(k, 0) for k in {*made, *more}}
    assert_counted(before, final, total)


def test_the_page_has_the_documented_metrics_and_no_secret(served: Served, tmp_path: Path) -> None:
    with served.admin() as admin:
        token = admin.create_enrollment_token(uses=2).token
        agent_key = p256()
        with served.anonymous() as anonymous:
            anonymous.enroll(make_csr(agent_key, cn="meter-1"), token)
        rotated = admin.rotate_key("message-signing")
        admin.sign_message(b"a release")
        version = admin.get_server_status().trust_state_version
        keys = admin.list_keys()
        roots = [r.fingerprint for r in admin.list_root_keys().active]
    # A watcher of the trust state, counted while it watches.
    channel = grpc.secure_channel(
        served.listen,
        grpc.ssl_channel_credentials(
            served.credential.root_certificates_pem,
            served.credential.private_key_pem,
            served.credential.certificate_chain_pem,
        ),
    )
    watch = trust_state_service_pb2_grpc.TrustStateServiceStub(channel).WatchTrustState(
        trust_state_service_pb2.WatchTrustStateRequest(since_version=0), timeout=60
    )
    next(watch)
    page, samples = scrape(served.metrics)
    assert value(samples, "keyplane_trust_state_watchers") == 1
    watch.cancel()
    channel.close()
    wait_until(
        "the watcher to go",
        lambda: value(scrape(served.metrics)[1], "keyplane_trust_state_watchers") == 0,
    )

    assert value(samples, "keyplane_certificates_issued_total", issuer_kind="intermediate_tls") == 1
    # The rotation's new certificate was issued by the root.
    assert value(samples, "keyplane_certificates_issued_total", issuer_kind="root") >= 1
    assert value(samples, "keyplane_rotations_total", kind="message_signing", outcome="done") == 1
    assert (
        value(
            samples,
            "keyplane_key_operations_total",
            backend="software",
            operation="sign",
            outcome="ok",
        )
        >= 3
    )
    assert (
        value(
            samples,
            "keyplane_key_operations_total",
            backend="software",
            operation="generate",
            outcome="ok",
        )
        >= 1
    )
    assert (
        value(samples, "keyplane_key_operation_seconds_count", backend="software", operation="sign")
        >= 3
    )
    assert value(samples, "keyplane_backend_up", backend="software") == 1
    assert value(samples, "keyplane_trust_state_version") == version
    active = {k.fingerprint: k for k in keys if k.state == 2}  # KEY_STATE_ACTIVE
    assert rotated.fingerprint in active
    for fingerprint, key in active.items():
        kind = {1: "server_tls", 2: "intermediate_tls", 3: "message_signing"}[key.kind]
        expires = value(
            samples, "keyplane_key_not_after_timestamp_seconds", kind=kind, fingerprint=fingerprint
        )
        assert expires == key.not_after.seconds + key.not_after.nanos / 1e9
    assert roots  # roots never expire: no not-after for them
    for name in (
        "grpc_server_started",
        "grpc_server_handled",
        "grpc_server_handling_seconds",
        "keyplane_certificates_issued",
        "keyplane_key_operations",
        "keyplane_key_operation_seconds",
        "keyplane_rotations",
        "keyplane_trust_state_version",
        "keyplane_trust_state_watchers",
        "keyplane_key_not_after_timestamp_seconds",
        "keyplane_backend_up",
    ):
        assert re.search(rf"^# TYPE {name}(_total)? ", page, re.MULTILINE), name
    handled = [labels for (name, labels) in samples if name == HANDLED]
    assert handled and all(
        {k for k, _ in labels} == {"grpc_type", "grpc_service", "grpc_method", "grpc_code"}
        for labels in handled
    )

    # No secret: no PEM, no key in any encoding, no token.
    assert "-----BEGIN" not in page and "PRIVATE" not in page
    assert token not in page and token.split("_")[-1] not in page
    agent_der = agent_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    admin_der = serialization.load_pem_private_key(
        served.credential.private_key_pem, None
    ).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file = (served.data / "pki.db.key").read_bytes()
    for secret in (agent_der, admin_der, key_file):
        for form in (secret.hex(), base64.b64encode(secret).decode(), secret.hex()[-48:]):
            assert form not in page


def test_the_endpoint_serves_get_metrics_only_and_changes_nothing(served: Served) -> None:
    events = served.audit_events()
    with served.admin() as admin:
        version = admin.get_server_status().trust_state_version
    base = f"http://{served.metrics}"
    assert http_status("GET", f"{base}/metrics") == 200
    assert http_status("GET", f"{base}/metrics?name[]=x") == 200
    for path in ("/", "/metrics/", "/admin", "/../metrics", "/metrics/../keys"):
        assert http_status("GET", base + path) == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        assert http_status(method, f"{base}/metrics") == 405, method
    assert served.audit_events() == events
    with served.admin() as admin:
        assert admin.get_server_status().trust_state_version == version


def test_keys_list_shows_each_keys_signatures_which_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # A first start signs what it creates (certificates, the first CRLs); a stop records
    # those counts, so that the next run starts from them.
    with running_server(data):
        pass
    with running_server(data) as server, server.admin_client() as admin:
        before = {k.fingerprint: k.signatures for k in admin.list_keys()}
        for payload in (b"one", b"two", b"three"):
            admin.sign_message(payload)
        admin.sign_messages([b"four", b"five", b"six", b"seven"])
        signing = next(k for k in admin.list_keys("message-signing") if k.state == 2)
    # Counted in memory and written in batches: recorded at the latest as the server stops.
    with running_server(data) as server, server.admin_client() as admin:
        keys = {k.fingerprint: k for k in admin.list_keys()}
    used = keys[signing.fingerprint]
    assert used.signatures == before.get(signing.fingerprint, 0) + 7
    last_used = used.last_used.ToDatetime(tzinfo=datetime.UTC)
    assert abs(last_used - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=5)
    intermediate = next(k for k in keys.values() if k.kind == 2 and k.state == 2)
    assert intermediate.signatures == before[intermediate.fingerprint]
