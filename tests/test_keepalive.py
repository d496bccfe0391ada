"""Keepalive: a trust-state watch that stays quiet for a long time survives its client's
pings (the server allows them), and the test can tell: with a server that allows fewer
pings than the client sends, the same stream is cut (too_many_pings). The real intervals
are 60 s (client) and 30 s (server); here both are scaled down, in the same ratio."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from keyplane.clients.client import KEEPALIVE_TIME_MS, bootstrap_channel_for
from keyplane.server.grpc_options import MIN_PING_INTERVAL_MS
from keyplane.v1 import trust_state_service_pb2, trust_state_service_pb2_grpc
from tests.serverkit import running_server

QUIET_SECONDS = 8.0


def test_the_server_allows_the_pings_clients_send() -> None:
    assert MIN_PING_INTERVAL_MS <= KEEPALIVE_TIME_MS // 2


def _watch_quietly(tmp_path: Path, server_min_ms: int, client_ms: int) -> str:
    """Hold a watch with nothing new to say for QUIET_SECONDS; how it ended."""
    config = tmp_path / "keepalive.toml"
    config.write_text(f"[testing]\nmin_ping_interval_ms = {server_min_ms}\n")
    with running_server(tmp_path / "data", config_file=config) as server:
        roots = (server.admin_dir / "ca.pem").read_bytes()
        latest = server.hierarchy.trust.latest_version()
        with bootstrap_channel_for(server.bootstrap, roots, keepalive_ms=client_ms) as channel:
            stub = trust_state_service_pb2_grpc.TrustStateServiceStub(channel)
            call = stub.WatchTrustState(
                trust_state_service_pb2.WatchTrustStateRequest(since_version=latest)
            )
            outcome: list[str] = []

            def read() -> None:
                try:
                    for _ in call:
                        pass
                    outcome.append("ended")
                except grpc.RpcError as exc:
                    outcome.append(f"{exc.code().name}: {exc.details()}")

            reader = threading.Thread(target=read)
            reader.start()
            reader.join(QUIET_SECONDS)
            if not outcome:
                call.cancel()
                reader.join(5)
                return "alive"
            return outcome[0]


@pytest.mark.timeout(60)
def test_a_quiet_watch_survives_its_keepalive_pings(tmp_path: Path) -> None:
    # The client pings every second; the server allows one every half second.
    assert _watch_quietly(tmp_path, 500, 1000) == "alive"


@pytest.mark.timeout(60)
def test_a_server_that_allows_fewer_pings_cuts_the_watch(tmp_path: Path) -> None:
    """The control: the same test fails when the settings disagree."""
    started = time.monotonic()
    outcome = _watch_quietly(tmp_path, 4000, 500)
    assert outcome.startswith("UNAVAILABLE"), outcome
    assert time.monotonic() - started < QUIET_SECONDS + 10
