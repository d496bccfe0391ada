"""Clocks that disagree. A client 5 minutes ahead of or behind a real `keyplane serve`
(run under faketime) enrolls, renews with a proof timed by its own clock and renews over
mutual TLS, right after the server started and right after its TLS key rotated (a
certificate made just now is valid from before the client's now). A server whose clock
jumps back an hour or forward a day (the injected clock) neither runs a rotation again
nor skips one that came due, and the trust states it publishes meanwhile still follow
on, newer versions with every check a client makes."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keyplane.clients.trust import TrustState, follow
from keyplane.server.domain.clock import ManualClock
from keyplane.v1 import trust_state_pb2
from tests.invariants import check_invariants
from tests.serverkit import FQDN, RunningServer, ServerProcess, run_cli, running_server

KINDS = ("server_tls", "intermediate_tls", "message_signing")


def _faketime() -> str:
    found = shutil.which("faketime")
    if found is None:
        message = "faketime is missing: apt-get install faketime (or: make system-test-deps)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.mark.timeout(180)
@pytest.mark.parametrize("skew", ["-5m", "+5m"])
def test_a_client_five_minutes_off_enrolls_and_renews(skew: str, tmp_path: Path) -> None:
    faketime = _faketime()
    data = tmp_path / "data"
    server = ServerProcess(data)
    try:
        token = run_cli("tokens", "create", "--uses", "4", data_dir=data, check=True)
        for moment in ("just started", "just rotated"):
            if moment == "just rotated":
                run_cli("keys", "rotate", "server-tls", data_dir=data, check=True)
            result = subprocess.run(
                [faketime, "-f", skew, sys.executable, "-m", "tests.skewed_client",
                 str(data), token.stdout.strip(), FQDN],
                capture_output=True, text=True, timeout=60, check=False,
                cwd=Path(__file__).parent.parent,
            )  # fmt: skip
            done = json.loads(result.stdout.strip().splitlines()[-1])
            assert "error" not in done, f"{moment}, client {skew}: {done['error']}"
            assert {"enrolled", "renewed_with_proof", "renewed"} <= set(done)
    finally:
        assert server.stop() == 0
    check_invariants(data)


def _keys(server: RunningServer) -> dict[str, list[str]]:
    return {
        kind: sorted(k.fingerprint for k in server.hierarchy.subordinate_keys(kind))
        for kind in KINDS
    }


def _activations(server: RunningServer) -> int:
    return [a.action for a in server.hierarchy.store.audit_log(10000)].count("key.activate")


def _due_in(server: RunningServer) -> datetime.timedelta:
    """How long until the first subordinate comes due (validity 720 h, renewed 72 h
    before it ends)."""
    active = [server.hierarchy.active_key(kind) for kind in KINDS]
    due = min(k.not_after for k in active) - datetime.timedelta(hours=72)
    return due - server.hierarchy.clock.now()


def _follow_on(server: RunningServer, held: TrustState) -> TrustState:
    """The versions published since `held`, through every check a client makes."""
    since = server.hierarchy.trust.versions_since(held.version)
    return follow(held, [trust_state_pb2.SignedTrustState.FromString(v) for v in since])


@pytest.mark.timeout(120)
def test_a_server_clock_jumping_back_or_forward_neither_reruns_nor_skips_rotations(
    tmp_path: Path,
) -> None:
    """In process, with the injected clock (no call over the network after it moves:
    the TLS stack checks certificates against the real clock)."""
    clock = ManualClock(datetime.datetime.now(datetime.UTC))
    with running_server(tmp_path / "data", clock=clock) as server:
        hierarchy = server.hierarchy
        [first_version] = hierarchy.trust.versions_since(0)
        signed = trust_state_pb2.SignedTrustState.FromString(first_version)
        held = follow(None, [signed], [signed.signatures[0].root_fingerprint])
        first = _keys(server)
        activations = _activations(server)
        # Back an hour with nothing due: nothing happens.
        clock.advance(-datetime.timedelta(hours=1))
        hierarchy.reconcile()
        assert _keys(server) == first and _activations(server) == activations
        # Forward a day, still before anything is due: nothing happens either.
        clock.advance(datetime.timedelta(days=1))
        hierarchy.reconcile()
        assert _keys(server) == first
        # Up to an hour before due, then a day forward across it: each kind rotates
        # once, not skipped and not twice.
        clock.advance(_due_in(server) - datetime.timedelta(hours=1))
        hierarchy.reconcile()
        assert _keys(server) == first
        clock.advance(datetime.timedelta(days=1))
        hierarchy.reconcile()
        hierarchy.reconcile()
        second = _keys(server)
        assert {k: len(v) for k, v in second.items()} == dict.fromkeys(KINDS, 2)
        assert _activations(server) == activations + len(KINDS)
        held = _follow_on(server, held)
        # Back an hour after the rotation: it does not run again, nor undo itself.
        clock.advance(-datetime.timedelta(hours=1))
        hierarchy.reconcile()
        hierarchy.reconcile()
        assert _keys(server) == second and _activations(server) == activations + len(KINDS)
        # What is published with the clock set back (a new root) is a newer version
        # that a client holding the last one accepts.
        hierarchy.roots.create("admin@test")
        after = _follow_on(server, held)
        assert after.version > held.version and len(after.body.roots) == 2
    check_invariants(tmp_path / "data")
