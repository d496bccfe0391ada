"""Two keyplane servers for active/active tests: in-process on fixed ports (so that one
can be stopped and started again where its peer expects it), with helpers to set up
trust between them as their admins would."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.server.config import load_config
from keyplane.v1 import trust_service_pb2
from tests.serverkit import RunningServer

A_FQDN = "pki-a.test"
B_FQDN = "pki-b.test"


def free_ports(count: int) -> list[int]:
    """Ports the kernel gives now (free a moment later, for a server to take)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class PeerServer:
    """An in-process server on fixed ports that can be stopped and started again."""

    def __init__(self, data_dir: Path, fqdn: str) -> None:
        self.data_dir = data_dir
        self.fqdn = fqdn
        listen, bootstrap = free_ports(2)
        self.config = load_config(
            None,
            data_dir=data_dir,
            listen=f"127.0.0.1:{listen}",
            bootstrap_listen=f"127.0.0.1:{bootstrap}",
            fqdn=fqdn,
        )
        self.running: RunningServer | None = None
        self.start()

    def start(self) -> None:
        self.running = RunningServer(self.config)

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()
            self.running = None

    @property
    def server(self) -> RunningServer:
        assert self.running is not None
        return self.running

    @property
    def hierarchy(self) -> Any:
        return self.server.hierarchy

    @property
    def bootstrap(self) -> str:
        return self.config.bootstrap_listen

    @property
    def listen(self) -> str:
        return self.config.listen

    def admin(self) -> KeyplaneClient:
        return self.server.admin_client()

    def root_fingerprint(self) -> str:
        return str(self.hierarchy.active_roots()[0].fingerprint)

    def roots_pem(self) -> bytes:
        return (self.data_dir / "admin" / "ca.pem").read_bytes()

    def trust_state_peers(self) -> list[Any]:
        """The peers section of this server's latest trust state."""
        from keyplane.v1 import trust_state_pb2

        latest = self.hierarchy.store.latest_trust_state()
        signed = trust_state_pb2.SignedTrustState.FromString(latest.signed)
        return list(trust_state_pb2.TrustStateBody.FromString(signed.body).peers)

    def peer_rows(self) -> list[Any]:
        return list(self.hierarchy.store.reads.peers.trust_peers())

    def bootstrap_stub(self) -> Any:
        from keyplane.clients.client import bootstrap_channel_for
        from keyplane.v1 import trust_service_pb2_grpc

        channel = bootstrap_channel_for(self.bootstrap, self.roots_pem())
        return trust_service_pb2_grpc.TrustServiceStub(channel)


@contextmanager
def two_servers(tmp_path: Path) -> Iterator[tuple[PeerServer, PeerServer]]:
    a = PeerServer(tmp_path / "a", A_FQDN)
    try:
        b = PeerServer(tmp_path / "b", B_FQDN)
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


def request(a: PeerServer, b: PeerServer) -> trust_service_pb2.TrustRequest:
    with a.admin() as admin:
        return admin.request_trust(b.bootstrap, b.root_fingerprint())


def establish(a: PeerServer, b: PeerServer) -> str:
    """A asks, B approves: the request id."""
    made = request(a, b)
    with b.admin() as admin:
        admin.approve_trust(made.id)
    return made.id


def refused(code: grpc.StatusCode, call: Callable[..., object], *args: object) -> str:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args)
    assert caught.value.code == code, caught.value
    return caught.value.message


def rpc_refused(code: grpc.StatusCode, call: Callable[..., object], *args: object) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
