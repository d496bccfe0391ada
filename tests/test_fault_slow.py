"""Slow backends and slow peers. A key backend that takes 3 s to sign (the `slow_at`
fault hook at trust.sign, as a slow HSM) under calls with a 1 s deadline: each caller
gets DEADLINE_EXCEEDED, and what the server went on to do is whole or absent, never half
written; the next call is served. Trust-state watchers that stop reading while hundreds
of versions are published do not grow the server's memory without bound (a watcher is
held to one answer at a time in the server, the rest waiting in the watcher's own
buffers under HTTP/2 flow control)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.clients.credentials import load_credential
from keyplane.server.config import load_config
from keyplane.server.errors import ConfigError
from keyplane.v1 import trust_state_pb2, trust_state_service_pb2, trust_state_service_pb2_grpc
from tests.invariants import Acknowledged, check_invariants
from tests.serverkit import RunningServer, ServerProcess, running_server
from tests.test_enrollment import make_csr, p256

SLOW_MS = 3000


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data") as server:
        yield server


def _latest(server: RunningServer) -> trust_state_pb2.TrustStateBody:
    [signed] = server.hierarchy.trust.versions_since(0)
    body = trust_state_pb2.SignedTrustState.FromString(signed).body
    return trust_state_pb2.TrustStateBody.FromString(body)


def _quiet(server: RunningServer) -> None:
    """Until the work that outlived its callers is done (the hierarchy lock is free)."""
    with server.hierarchy.lock:
        pass


def test_the_slow_hook_is_configured_like_the_failure_hook(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text('[testing]\nslow_at = "trust.sign"\nslow_ms = 250\n')
    loaded = load_config(config, data_dir=tmp_path)
    assert (loaded.slow_at, loaded.slow_ms) == ("trust.sign", 250)
    for bad in ('slow_at = "nowhere"\nslow_ms = 5', 'slow_at = "trust.sign"'):
        config.write_text(f"[testing]\n{bad}\n")
        with pytest.raises(ConfigError, match="slow_at must be one of"):
            load_config(config, data_dir=tmp_path)


@pytest.mark.timeout(120)
def test_a_one_second_deadline_on_a_slow_backend_is_deadline_exceeded_and_nothing_is_half_written(
    slow: RunningServer,
) -> None:
    data = slow.config.data_dir
    acks = Acknowledged()
    with slow.admin_client() as admin:
        token = admin.create_enrollment_token(uses=2).token
        roots = (slow.admin_dir / "ca.pem").read_bytes()
        with KeyplaneClient(bootstrap_channel_for(slow.bootstrap, roots)) as anonymous:
            victim = anonymous.enroll(make_csr(p256(), cn="victim"), token)
        acks.serials.add(victim.serial)
        before = check_invariants(data, acknowledged=acks)
        keys_before = {k.fingerprint for k in admin.list_keys("message-signing")}
        slow.hierarchy.faults.slow_at, slow.hierarchy.faults.slow_ms = "trust.sign", SLOW_MS
        try:
            impatient = KeyplaneClient(admin._channel, timeout=1.0)  # the same channel
            for call in (
                lambda: impatient.revoke_certificate(victim.serial, "slow"),
                lambda: impatient.rotate_key("message-signing"),
                lambda: impatient.create_root_key(),
            ):
                with pytest.raises(KeyplaneClientError) as caught:
                    call()
                assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            _quiet(slow)
        finally:
            slow.hierarchy.faults.slow_at = ""
        # Each change the server went on with is whole: recorded and published together.
        body = _latest(slow)
        [record] = [c for c in admin.list_certificates("agent") if c.serial == victim.serial]
        revoked = record.HasField("revoke_time")
        assert revoked == (victim.serial in body.revoked_serials)
        # (The rotation and the new root's reissue make keys; none is left prepared:
        # check_invariants.)
        keys_after = {k.fingerprint for k in admin.list_keys("message-signing")}
        check_invariants(data, acknowledged=acks, previous=before)
        # And the next call is served.
        assert admin.sign_message(b"after the slow backend").signature
        print(
            f"after the 1 s deadlines: revocation {'done' if revoked else 'not done'}, "
            f"{len(keys_after - keys_before)} message-signing key(s) made, "
            f"{len(body.roots)} roots published"
        )


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


WATCHERS = 40
VERSIONS = 120  # published in each phase: without watchers, then with them stalled
# What a stalled watcher may cost the server at most: what HTTP/2 flow control lets be
# in flight to it (its window) and the one answer the servicer holds, with room to spare.
PER_WATCHER_KIB = 1024


def _revoke(admin: KeyplaneClient, serials: list[str], pid: int) -> list[int]:
    samples = [_rss_kib(pid)]
    for i, serial in enumerate(serials, 1):
        admin.revoke_certificate(serial, "watched")
        if i % 40 == 0:
            samples.append(_rss_kib(pid))
    return samples


@pytest.mark.timeout(240)
def test_watchers_that_stop_reading_do_not_grow_the_servers_memory(tmp_path: Path) -> None:
    """RSS while versions are published: first with no watcher, then with 40 that read
    their first answer and stop. The second phase grows by no more than flow control
    bounds per watcher (what was sent waits in the watcher's own buffers); read again,
    each gets to the newest version."""
    data = tmp_path / "data"
    server = ServerProcess(data)
    pid = server.proc.pid
    try:
        with KeyplaneClient.connect(server.listen, load_credential(data / "admin")) as admin:
            token = admin.create_enrollment_token(uses=2 * VERSIONS).token
            roots = (data / "admin" / "ca.pem").read_bytes()
            boot = json.loads((data / "admin" / "endpoint.json").read_text())["bootstrap_listen"]
            with KeyplaneClient(bootstrap_channel_for(boot, roots)) as anonymous:
                csrs = [make_csr(p256(), cn=f"w-{i}") for i in range(2 * VERSIONS)]
                serials = [c.serial for c in anonymous.enroll_batch(csrs, token)]
            alone = _revoke(admin, serials[:VERSIONS], pid)
            channels = [bootstrap_channel_for(boot, roots) for _ in range(WATCHERS)]
            watches = [
                trust_state_service_pb2_grpc.TrustStateServiceStub(c).WatchTrustState(
                    trust_state_service_pb2.WatchTrustStateRequest(since_version=0), timeout=200
                )
                for c in channels
            ]
            for watch in watches:  # each reads its first answer, then stops reading
                next(watch)
            stalled = _revoke(admin, serials[VERSIONS:], pid)
            latest = admin.get_trust_state()[-1]
            newest = trust_state_pb2.TrustStateBody.FromString(latest.body).version
            extra = (stalled[-1] - stalled[0]) - (alone[-1] - alone[0])
            print(
                f"RSS (KiB) over {VERSIONS} versions, no watcher: {alone}; with {WATCHERS} "
                f"stalled: {stalled}; the stalled watchers' share: {extra} KiB"
            )
            assert extra < WATCHERS * PER_WATCHER_KIB, (alone, stalled)
            # Reading again, each watcher gets to the newest version.
            most = 0
            for watch in watches:
                messages = 0
                for response in watch:
                    messages += 1
                    body = trust_state_pb2.TrustStateBody.FromString(response.versions[-1].body)
                    if body.version >= newest:
                        break
                most = max(most, messages)
                watch.cancel()
            print(f"each stalled watcher reached version {newest} within {most} messages")
            for channel in channels:
                channel.close()
    finally:
        assert server.stop() == 0
    check_invariants(data)
