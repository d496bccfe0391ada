"""A password-protected server started without its password is locked: no TCP port, a
0600 Unix socket for health and unlock only, until `keyplane unlock` gives it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serverkit import FQDN, KEYPLANE, ServerProcess, run_cli

PASSWORD = "locked start password"
WRONG = "not the password at all"


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose pki.db is sealed by PASSWORD, after one clean start and stop."""
    base = tmp_path_factory.mktemp("template")
    password = base / "pki-db-password"
    password.write_text(PASSWORD + "\n")
    data = base / "data"
    assert ServerProcess(data, "--password-file", str(password)).stop() == 0
    return data


@pytest.fixture
def data(initialised: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(initialised, copy)
    return copy


def free_port_pair() -> int:
    """A port P with P+1 free too (the bootstrap listener's default)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no pair of free ports")


def refused(port: int) -> bool:
    with socket.socket() as client:
        client.settimeout(2)
        try:
            client.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


class LockedServer:
    """`keyplane serve` over a password-protected data dir, given no password."""

    def __init__(self, data: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.socket = data / "unlock.sock"
        self.endpoint = data / "admin" / "endpoint.json"
        self.log = data.parent / "serve.log"
        self.endpoint.unlink(missing_ok=True)  # the note of the last start
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [KEYPLANE, "serve", "--data-dir", str(data), "--fqdn", FQDN, *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def wait_for(self, path: Path) -> None:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def unlock(self, password: str) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = subprocess.run(
            [KEYPLANE, "unlock", "--data-dir", str(self.data)],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return result, time.monotonic() - started

    def health(self) -> int:
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]


def test_a_locked_server_opens_no_port_and_unlock_from_stdin_opens_them(data: Path) -> None:
    port = free_port_pair()
    server = LockedServer(data, "--listen", f"127.0.0.1:{port}")
    try:
        server.wait_for(server.socket)
        mode = server.socket.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert refused(port) and refused(port + 1)  # no TCP listener while locked
        assert server.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not server.endpoint.exists()

        first, first_took = server.unlock(WRONG)
        second, second_took = server.unlock(WRONG)
        for wrong in (first, second):
            assert wrong.returncode == 1
            assert wrong.stderr.strip() == "keyplane: UNAUTHENTICATED: the password is not right"
        assert second_took > first_took + 0.5  # each further failure waits longer
        assert refused(port) and refused(port + 1)

        right, _ = server.unlock(PASSWORD)
        assert right.returncode == 0, right.stderr
        assert f"listening on 127.0.0.1:{port}" in right.stdout
        assert json.loads(server.endpoint.read_text())["listen"] == f"127.0.0.1:{port}"
        listing = run_cli("roots", "list", "--json", data_dir=data)
        assert listing.returncode == 0, listing.stderr
        assert json.loads(listing.stdout)["active"]
        assert not server.socket.exists()
    finally:
        assert server.stop() == 0
    output = server.log.read_text()
    assert PASSWORD not in output and WRONG not in output


def test_with_workers_none_starts_until_unlocked_and_none_holds_the_password(
    data: Path,
) -> None:
    port = free_port_pair()
    server = LockedServer(data, "--listen", f"127.0.0.1:{port}", "--workers", "2")
    try:
        server.wait_for(server.socket)
        assert refused(port) and refused(port + 1)
        assert server.children() == []  # no worker yet
        right, _ = server.unlock(PASSWORD)
        assert right.returncode == 0, right.stderr
        server.wait_for(server.endpoint)
        assert run_cli("keys", "list", data_dir=data).returncode == 0
        workers = server.children()
        assert len(workers) >= 2
        for pid in workers:
            for what in ("cmdline", "environ"):
                assert PASSWORD.encode() not in Path(f"/proc/{pid}/{what}").read_bytes()
    finally:
        assert server.stop() == 0


def test_password_env_starts_unattended_keeps_it_from_workers_and_refuses_a_change(
    data: Path,
) -> None:
    env = {"KEYPLANE_TEST_PKI_PASSWORD": PASSWORD}
    server = LockedServer(
        data,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--password-env",
        "KEYPLANE_TEST_PKI_PASSWORD",
        env=env,
    )
    try:
        server.wait_for(server.endpoint)
        for pid in server.children():
            assert PASSWORD.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        change = run_cli(
            "settings", "set", "PKIDatabasePassword", "another password!", data_dir=data
        )
        assert change.returncode == 1
        assert change.stderr.startswith("keyplane: FAILED_PRECONDITION: ")
        assert "password_env" in change.stderr and "password_file" in change.stderr
    finally:
        assert server.stop() == 0


def test_a_signal_while_locked_stops_the_server_cleanly(data: Path) -> None:
    server = LockedServer(data, "--listen", "127.0.0.1:0")
    server.wait_for(server.socket)
    assert server.stop() == 0
    assert not server.socket.exists()


def flip_a_byte_of_the_server_tls_key(data: Path) -> str:
    """Damage one sealed key; its key id."""
    state = sqlite3.connect(data / "keyplane.db")
    try:
        (uri,) = state.execute(
            "SELECT key_uri FROM keys WHERE kind = 'server_tls' AND state = 'active'"
        ).fetchone()
    finally:
        state.close()
    key_id = uri.removeprefix("software:")
    db = sqlite3.connect(data / "pki.db")
    try:
        with db:
            (sealed,) = db.execute("SELECT sealed FROM keys WHERE id = ?", (key_id,)).fetchone()
            damaged = sealed[:10] + bytes([sealed[10] ^ 0x80]) + sealed[11:]
            db.execute("UPDATE keys SET sealed = ? WHERE id = ?", (damaged, key_id))
    finally:
        db.close()
    return str(key_id)


def test_a_damaged_sealed_key_refuses_the_start_naming_it(data: Path, tmp_path: Path) -> None:
    key_id = flip_a_byte_of_the_server_tls_key(data)
    password = tmp_path / "pki-db-password"
    password.write_text(PASSWORD + "\n")
    serve = [KEYPLANE, "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"]
    refused_start = subprocess.run(
        [*serve, "--fqdn", FQDN, "--password-file", str(password)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused_start.returncode == 1
    assert f"software:{key_id}" in refused_start.stderr
    assert "cannot start" in refused_start.stderr

    # Unlocked by hand, the same: the caller hears DATA_LOSS and the server stops.
    server = LockedServer(data, "--listen", "127.0.0.1:0")
    server.wait_for(server.socket)
    result, _ = server.unlock(PASSWORD)
    assert result.returncode == 1
    assert result.stderr.startswith("keyplane: DATA_LOSS: ")
    assert f"software:{key_id}" in result.stderr
    assert server.proc.wait(timeout=30) == 1
    assert f"software:{key_id}" in server.log.read_text()
