"""Fixtures for tests against one in-process server: `clock` (injected, starting at the
real time: the TLS stack checks certificates against the real clock, so calls over the
network are made before the clock moves ahead), `server`, and clients as the admin
(mutual TLS) and as nobody (the bootstrap listener). A module may define its own."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.server.domain.clock import ManualClock
from tests.serverkit import RunningServer, running_server


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.datetime.now(datetime.UTC))


@pytest.fixture
def server(tmp_path: Path, clock: ManualClock) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data", clock=clock) as running:
        yield running


@pytest.fixture
def admin(server: RunningServer) -> Iterator[KeyplaneClient]:
    with server.admin_client() as c:
        yield c


@pytest.fixture
def anonymous(server: RunningServer) -> Iterator[KeyplaneClient]:
    roots = (server.admin_dir / "ca.pem").read_bytes()
    with KeyplaneClient(bootstrap_channel_for(server.bootstrap, roots)) as c:
        yield c
