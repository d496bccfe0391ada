"""Two real `keyplane serve` processes on fixed ports exchange trust (A's admin asks, B's
admin approves) while one of them, chosen at random, is SIGKILLed at a random moment
of the exchange; it is started again where its peer expects it. After each restart every
invariant holds on both data dirs (tests/invariants.py); an approval that was answered
is there on both sides; and retrying the exchange as an admin would (ask again, approve
what is pending) always ends with both servers trusting each other, never one alone."""

from __future__ import annotations

import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyplane.clients.client import (
    CHANNEL_OPTIONS,
    KeyplaneClient,
    KeyplaneClientError,
    bootstrap_channel_for,
)
from keyplane.clients.credentials import load_credential
from keyplane.v1 import trust_service_pb2, trust_service_pb2_grpc
from tests.bursts import Call, fire
from tests.faultkit import (
    SHORT_RUNS,
    WINDOW_FACTOR,
    backend,
    fault_runs,
    fault_timeout,
    hsm_backends,
)
from tests.invariants import check_invariants
from tests.peerkit import A_FQDN, B_FQDN, PeerServer, free_ports, two_servers, wait_until
from tests.serverkit import ServerProcess
from tests.softhsm import SoftHsmToken

__all__ = ["backend"]


class Peer:
    """One server of the pair: a data dir, fixed ports, a process started again and again."""

    def __init__(self, data: Path, fqdn: str, config: Path) -> None:
        self.data, self.fqdn = data, fqdn
        listen, bootstrap = free_ports(2)
        self.listen, self.bootstrap = f"127.0.0.1:{listen}", f"127.0.0.1:{bootstrap}"
        self.args = ["--config", str(config), "--fqdn", fqdn,
                     "--listen", self.listen, "--bootstrap-listen", self.bootstrap]  # fmt: skip
        self.process = ServerProcess(data, *self.args)

    def admin(self) -> KeyplaneClient:
        return KeyplaneClient.connect(self.listen, load_credential(self.data / "admin"))

    def root(self) -> str:
        with self.admin() as admin:
            return str(admin.list_root_keys().active[0].fingerprint)

    def peers(self) -> set[str]:
        with self.admin() as admin:
            return {p.fqdn for p in admin.list_trust().peers}

    def pending(self) -> list[str]:
        with self.admin() as admin:
            return [r.id for r in admin.list_trust().requests if r.state == "pending"
                    and r.direction == "incoming"]  # fmt: skip

    def kill_and_restart(self) -> None:
        self.process.proc.send_signal(signal.SIGKILL)
        assert self.process.stop() == -signal.SIGKILL
        self.process = ServerProcess(self.data, *self.args)

    def stop(self) -> None:
        assert self.process.stop() == 0
        assert "Traceback" not in self.process.output()


def _exchange(a: Peer, b: Peer, b_root: str, answered: dict[str, Any]) -> None:
    with a.admin() as admin:
        made = admin.request_trust(b.bootstrap, b_root)
    answered["requested"] = made.id
    with b.admin() as admin:
        admin.approve_trust(made.id)
    answered["approved"] = made.id


def _exchange_quietly(
    a: Peer, b: Peer, b_root: str, answered: dict[str, Any], errors: list[BaseException]
) -> None:
    try:
        _exchange(a, b, b_root, answered)
    except Exception as exc:  # a killed peer: the convergence after it goes on
        errors.append(exc)


def _converge(a: Peer, b: Peer, b_root: str, tries: int = 20) -> int:
    """Retry as the admins would until both trust each other: the steps it took."""
    for step in range(1, tries + 1):
        try:
            if a.peers() == {b.fqdn} and b.peers() == {a.fqdn}:
                return step
            pending = b.pending()
            if pending:
                with b.admin() as admin:
                    admin.approve_trust(pending[0])
            elif not b.peers():
                with a.admin() as admin:
                    admin.request_trust(b.bootstrap, b_root)
        except KeyplaneClientError as exc:
            assert exc.code.name in ("UNAVAILABLE", "FAILED_PRECONDITION", "NOT_FOUND"), exc
        time.sleep(0.3)  # the peer link's push and pull (every 2 s) settle
    raise AssertionError(f"no trust both ways after {tries} tries: {a.peers()}, {b.peers()}")


@pytest.mark.timeout(fault_timeout(per_run=20))
def test_sigkill_during_trust_exchanges(backend: SoftHsmToken | None, tmp_path: Path) -> None:
    rng = random.Random(808)
    config = tmp_path / "keyplane.toml"
    config.write_text(hsm_backends(backend, tmp_path, ("root",)) if backend else "")
    window: float | None = None
    landed: dict[str, int] = {}
    steps: list[int] = []
    runs = fault_runs()
    for run in range(runs + 1):  # run 0 is unkilled: it measures the window
        root = tmp_path / f"run-{run}"
        root.mkdir()
        a = Peer(root / "a", A_FQDN, config)
        b = Peer(root / "b", B_FQDN, config)
        try:
            b_root = b.root()
            snapshots = {p.fqdn: check_invariants(p.data, token=backend) for p in (a, b)}
            answered: dict[str, Any] = {}
            errors: list[BaseException] = []

            thread = threading.Thread(
                target=_exchange_quietly, args=(a, b, b_root, answered, errors), daemon=True
            )
            started = time.monotonic()
            thread.start()
            if window is None:
                thread.join(timeout=60)
                window = (time.monotonic() - started) * WINDOW_FACTOR
                assert "approved" in answered, errors
            else:
                time.sleep(rng.uniform(0, window))
                victim = rng.choice((a, b))
                victim.kill_and_restart()
                thread.join(timeout=60)
                stage = (
                    "approved"
                    if "approved" in answered
                    else ("requested" if "requested" in answered else "nothing answered")
                )
                landed[f"{victim.fqdn}: {stage}"] = landed.get(f"{victim.fqdn}: {stage}", 0) + 1
                if "approved" in answered:  # acknowledged: the approver trusts at once
                    assert b.peers() == {a.fqdn}
            for p in (a, b):
                check_invariants(p.data, token=backend, previous=snapshots[p.fqdn])
            steps.append(_converge(a, b, b_root))
            for p in (a, b):
                check_invariants(p.data, token=backend)
        finally:
            a.stop()
            b.stop()
        shutil.rmtree(root)
    print(f"trust exchange: {runs} kills ({landed}); converged in at most {max(steps)} steps")


# Calls per TrustService RPC in the burst: the admins' (A asks, B approves, both list,
# refuse unknown ids and peers) and the peers' own (messages no peer signed: refused).
TRUST_BURST = {
    "RequestTrust": 100, "ApproveTrust": 100, "ListTrust": 200, "RejectTrust": 50,
    "RevokeTrust": 50, "OfferTrust": 100, "RevealTrustNonce": 100, "DecideTrust": 100,
    "EndTrust": 100, "PushTrustState": 100,
}  # fmt: skip
TRUST_BURST = {rpc: n * (fault_runs() // SHORT_RUNS) for rpc, n in TRUST_BURST.items()}


def _trust_calls(a: PeerServer, b: PeerServer, channels: list[grpc.Channel]) -> list[Call]:
    def admin_stub(p: PeerServer) -> Any:
        credential = load_credential(p.data_dir / "admin")
        channel = grpc.secure_channel(
            p.listen,
            grpc.ssl_channel_credentials(
                credential.root_certificates_pem,
                credential.private_key_pem,
                credential.certificate_chain_pem,
            ),
            options=CHANNEL_OPTIONS,
        )
        channels.append(channel)
        return trust_service_pb2_grpc.TrustServiceStub(channel)

    stub_a, stub_b = admin_stub(a), admin_stub(b)
    anonymous = bootstrap_channel_for(b.bootstrap, b.roots_pem())
    channels.append(anonymous)
    peer_b = trust_service_pb2_grpc.TrustServiceStub(anonymous)
    with a.admin() as admin:
        made = admin.request_trust(b.bootstrap, b.root_fingerprint())  # the id to approve
    pb = trust_service_pb2
    unsigned = pb.SignedPeerMessage()
    made_calls = {
        "RequestTrust": (stub_a.RequestTrust, pb.RequestTrustRequest(
            peer=b.bootstrap, peer_fingerprint=b.root_fingerprint())),
        "ApproveTrust": (stub_b.ApproveTrust, pb.ApproveTrustRequest(id=made.id)),
        "ListTrust": (stub_b.ListTrust, pb.ListTrustRequest(history_size=10)),
        "RejectTrust": (stub_b.RejectTrust, pb.RejectTrustRequest(id="0" * 32, reason="burst")),
        "RevokeTrust": (stub_a.RevokeTrust, pb.RevokeTrustRequest(peer="nobody.test", reason="b")),
        "OfferTrust": (peer_b.OfferTrust, pb.OfferTrustRequest(message=unsigned)),
        "RevealTrustNonce": (peer_b.RevealTrustNonce, pb.RevealTrustNonceRequest(message=unsigned)),
        "DecideTrust": (peer_b.DecideTrust, pb.DecideTrustRequest(message=unsigned)),
        "EndTrust": (peer_b.EndTrust, pb.EndTrustRequest(message=unsigned)),
        "PushTrustState": (peer_b.PushTrustState, pb.PushTrustStateRequest(sender_fqdn=A_FQDN)),
    }  # fmt: skip
    return [
        _future_call(rpc, method, request)
        for rpc, (method, request) in made_calls.items()
        for _ in range(TRUST_BURST[rpc])
    ]


def _future_call(rpc: str, method: Any, request: Any) -> Call:
    return Call(rpc, lambda t: method.future(request, timeout=t))


@pytest.mark.timeout(240)
def test_trust_calls_given_up_at_random_moments_leave_both_servers_whole(
    tmp_path: Path,
) -> None:
    """Over 1,000 TrustService calls (make test-long: ten times that), each with a 1-100
    ms deadline and a quarter cancelled by the client, while A asks and B approves: no
    internal error, every invariant on both sides, and the exchange ends with trust both
    ways, answered at once."""
    with two_servers(tmp_path) as (a, b):
        snapshots = [check_invariants(p.data_dir) for p in (a, b)]
        channels: list[grpc.Channel] = []
        try:
            calls = _trust_calls(a, b, channels)
            assert len(calls) >= 1000
            outcome = fire(calls, seed=909)
            print(f"trust burst of {len(calls)}: {outcome.summary()}")
            assert outcome.total() == len(calls)
            for rpc, codes in outcome.codes.items():
                assert not {"INTERNAL", "UNKNOWN"} & set(codes), (rpc, dict(codes))
        finally:
            for channel in channels:
                channel.close()
        with b.admin() as admin_b, a.admin() as admin_a:
            pending = [r.id for r in admin_b.list_trust().requests if r.state == "pending"]
            for request_id in pending:
                admin_b.approve_trust(request_id)
            wait_until("trust both ways", lambda: (
                [p.fqdn for p in admin_a.list_trust().peers] == [b.fqdn]
                and [p.fqdn for p in admin_b.list_trust().peers] == [a.fqdn]), 30)  # fmt: skip
        for p, snapshot in zip((a, b), snapshots, strict=True):
            check_invariants(p.data_dir, previous=snapshot)
