"""Refusals that cost little and say what is wrong: garbage on the wire, a bad token in
front of a thousand CSRs, an agent token offered to EnrollZoneServer, more calls than
the server takes at once, oversized repeated fields, weak keys. Each test plays the
caller, asserts the status and that nothing was stored."""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.server.domain import certs
from keyplane.server.domain.csr_policy import ROCA_PRIMES, rsa_weakness
from keyplane.v1 import (
    trust_state_service_pb2,
    trust_state_service_pb2_grpc,
    zone_service_pb2,
)
from tests.serverkit import RunningServer, running_server
from tests.test_enrollment import make_csr, p256
from tests.zonekit import enroll_fake_zone


def _raw_call(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        call(body, timeout=10)
    return caught.value


def _audit_rows(server: RunningServer) -> int:
    return len(server.hierarchy.store.audit_log(100_000))


def test_garbage_on_the_wire_is_invalid_argument_without_internals(
    server: RunningServer, anonymous: KeyplaneClient
) -> None:
    with server.bootstrap_channel() as channel:
        for method in (
            "/keyplane.v1.EnrollmentService/Enroll",
            "/keyplane.v1.EnrollmentService/EnrollBatch",
            "/keyplane.v1.ZoneService/EnrollZoneServer",
            "/keyplane.v1.TrustStateService/GetTrustState",
        ):
            error = _raw_call(channel, method, b"\xff\xff\xff\xff garbage \x00\x01")
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
            details = error.details() or ""
            assert "is not a valid keyplane.v1." in details
            for internal in ("DecodeError", "Traceback", "Exception", "exception"):
                assert internal not in details, details


def test_a_bad_token_is_refused_before_any_csr_is_looked_at(
    server: RunningServer, anonymous: KeyplaneClient, admin: KeyplaneClient
) -> None:
    before = _audit_rows(server)
    garbage = [b"not a CSR %d" % i for i in range(1000)]
    for token in ("kpt_bogus", "", "x" * 5000):
        with pytest.raises(KeyplaneClientError) as caught:
            anonymous.enroll_batch(garbage, token)
        # UNAUTHENTICATED, not INVALID_ARGUMENT: the CSRs were never parsed.
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED, caught.value
    # A zone-server token is no agent token, and an expired one is no token at all.
    zone_token = admin.create_enrollment_token(role="zone-server").token
    with pytest.raises(KeyplaneClientError) as caught:
        anonymous.enroll_batch(garbage, zone_token)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "role zone-server" in caught.value.message
    assert _audit_rows(server) == before + 1  # the token's creation, nothing else


def test_an_agent_token_on_enroll_zone_server_gets_no_signature(
    server: RunningServer, anonymous: KeyplaneClient, admin: KeyplaneClient
) -> None:
    agent_token = admin.create_enrollment_token(role="agent").token
    keys_before = len(server.hierarchy.store.keys("zone_intermediate"))
    audit_before = _audit_rows(server)
    for intermediate_csr in (b"garbage", make_csr(p256(), cn="z")):
        request = zone_service_pb2.EnrollZoneServerRequest(
            token=agent_token,
            intermediate_csr=intermediate_csr,
            tls_csr=make_csr(p256(), cn="z"),
            name="z",
            listen="10.0.0.7:7443",
            bootstrap_listen="10.0.0.7:7444",
        )
        with pytest.raises(KeyplaneClientError) as caught:
            anonymous.enroll_zone_server(request)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "role agent" in caught.value.message
    assert len(server.hierarchy.store.keys("zone_intermediate")) == keys_before
    assert _audit_rows(server) == audit_before


def test_calls_beyond_the_cap_are_resource_exhausted_at_once(tmp_path: Path) -> None:
    """While every commit waits (the test holds the DB's write lock), four enrollments
    fill the bootstrap listener's four places; the fifth is refused at once, the
    mutual-TLS listener still answers, and once the lock goes all four complete."""
    config = tmp_path / "limits.toml"
    config.write_text("max_calls_per_listener = 4\nmax_streams = 3\n")
    with running_server(tmp_path / "data", config_file=config) as server:
        roots = (server.admin_dir / "ca.pem").read_bytes()
        with server.admin_client() as admin:
            token = admin.create_enrollment_token(uses=10).token
        store = server.hierarchy.store
        held = threading.Event()
        release = threading.Event()

        def hold_the_write_lock() -> None:
            with store.transaction(server.server.clock.now()):
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold_the_write_lock)
        holder.start()
        assert held.wait(10)
        results: list[object] = []
        with KeyplaneClient(bootstrap_channel_for(server.bootstrap, roots), timeout=30) as client:
            waiting = [
                threading.Thread(
                    target=lambda i=i: results.append(
                        client.enroll(make_csr(p256(), cn=f"c{i}"), token)
                    )
                )
                for i in range(4)
            ]
            for thread in waiting:
                thread.start()
            time.sleep(0.5)  # they are all waiting on the commit by now
            deadline = time.monotonic() + 10
            refused = None
            while time.monotonic() < deadline and refused is None:
                try:
                    client.enroll(make_csr(p256(), cn="fifth"), token)
                except KeyplaneClientError as exc:
                    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused = exc
                time.sleep(0.05)
            assert refused is not None and "its limit" in refused.message
            # The other listener has places of its own.
            with server.admin_client() as admin:
                assert admin.list_root_keys().active
            release.set()
            holder.join(10)
            for thread in waiting:
                thread.join(30)
        assert len(results) == 4
        # Streams: three watchers fill their places; a fourth is refused.
        with bootstrap_channel_for(server.bootstrap, roots) as channel:
            stub = trust_state_service_pb2_grpc.TrustStateServiceStub(channel)
            latest = server.hierarchy.trust.latest_version()
            watches = [
                stub.WatchTrustState(
                    trust_state_service_pb2.WatchTrustStateRequest(since_version=latest)
                )
                for _ in range(3)
            ]
            time.sleep(0.5)
            fourth = stub.WatchTrustState(
                trust_state_service_pb2.WatchTrustStateRequest(since_version=latest), timeout=5
            )
            with pytest.raises(grpc.RpcError) as caught:
                next(iter(fourth))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for watch in watches:
                watch.cancel()


def test_a_report_of_more_than_a_thousand_certificates_is_refused(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    roots = (server.admin_dir / "ca.pem").read_bytes()
    zone = enroll_fake_zone(
        server.bootstrap, roots, admin.create_enrollment_token(role="zone-server").token
    )
    cert, _ = zone.mint("meter", ["agent"])
    report = zone_service_pb2.IssuedCertificateReport(
        certificate_der=certs.to_der(cert), component="agent"
    )
    before = len(admin.list_certificates("agent"))
    with zone.channel(server.listen, roots) as channel:
        client = KeyplaneClient(channel)
        with pytest.raises(KeyplaneClientError) as caught:
            client.report_issued_certificates([report] * 1001)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 1000" in caught.value.message
        assert len(admin.list_certificates("agent")) == before
        assert client.report_issued_certificates([report]) == 1


def _csr_for(key: rsa.RSAPrivateKey) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _is_probable_prime(n: int, rng: random.Random) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(20):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime_near(start: int, rng: random.Random, step: int = 2) -> int:
    candidate = start | 1
    while not _is_probable_prime(candidate, rng):
        candidate += step
    return candidate


def _rsa_key(p: int, q: int, e: int = 65537) -> rsa.RSAPrivateKey:
    n = p * q
    phi = (p - 1) * (q - 1)
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, n)
    )
    return numbers.private_key()


def test_weak_rsa_keys_are_refused_with_the_reason(
    server: RunningServer, anonymous: KeyplaneClient, admin: KeyplaneClient
) -> None:
    rng = random.Random(10)
    # Primes 908 apart (Fermat factors it at once), as the issue found accepted.
    p = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers().p
    q = _prime_near(p + 908, rng)
    close = _rsa_key(p, q)
    # A modulus with the ROCA fingerprint: both primes are 65537^k mod M plus a multiple
    # of M, M the product of the fingerprint's primes.
    m = math.prod(ROCA_PRIMES)
    primes = []
    while len(primes) < 2:
        base = pow(65537, rng.getrandbits(64), m)
        # Each prime in [1.5 * 2^1023, 2^1024): their product has 2048 bits.
        low, high = 3 << 1022, 1 << 1024
        candidate = base + rng.randrange(low // m + 1, high // m) * m
        if low <= candidate < high and _is_probable_prime(candidate, rng):
            primes.append(candidate)
    roca = _rsa_key(*primes)
    before = len(admin.list_certificates("agent"))
    for key, reason in ((close, "Fermat"), (roca, "ROCA")):
        token = admin.create_enrollment_token().token
        with pytest.raises(KeyplaneClientError) as caught:
            anonymous.enroll(_csr_for(key), token)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in caught.value.message
    assert len(admin.list_certificates("agent")) == before
    # A modulus with a small factor (no private key needed to show the check).
    assert "prime factor below" in (rsa_weakness(3 * (rng.getrandbits(2046) | 1), 65537) or "")
    # A sound key passes every check.
    sound = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert rsa_weakness(sound.public_key().public_numbers().n, 65537) is None


def test_the_same_key_enrolls_once(
    server: RunningServer, anonymous: KeyplaneClient, admin: KeyplaneClient
) -> None:
    key = p256()
    anonymous.enroll(make_csr(key, cn="twice"), admin.create_enrollment_token().token)
    token = admin.create_enrollment_token().token
    with pytest.raises(KeyplaneClientError) as caught:
        anonymous.enroll(make_csr(key, cn="twice-again"), token)
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "enrolled already" in caught.value.message
    # The refused request spent nothing: the token still enrolls a new key.
    anonymous.enroll(make_csr(p256(), cn="fresh"), token)
    # Twice in one batch is refused as a whole.
    with pytest.raises(KeyplaneClientError) as caught:
        same = p256()
        anonymous.enroll_batch(
            [make_csr(same, cn="a"), make_csr(same, cn="b")],
            admin.create_enrollment_token(uses=2).token,
        )
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "csrs[1]" in caught.value.message
