"""Attacks on keyplane's plain and HTTPS listeners by someone with network access only.

- The admin console (HTTPS) and the CRL listener (plain HTTP, meant to face anyone) take
  any number of idle connections: each holds a file descriptor of the serving process,
  which gRPC, SQLite and the other listeners share. A server run as the shipped
  systemd unit runs it (no LimitNOFILE: a soft limit of 1024) is out of descriptors after
  about a thousand idle connections, and then the mutual-TLS listener accepts no one
  and the log fills with a traceback per refused accept. What should happen: a listener
  caps its own connections (as the metrics endpoint does), so that a flood of one
  listener leaves the gRPC API serving.
- The metrics endpoint caps its connections at 16 and says "a request must arrive
  within REQUEST_SECONDS", but the timeout is per read: 16 connections that send a byte
  every few seconds hold every slot for as long as they like, and no scrape gets in.

Each test starts a real `keyplane serve` on 127.0.0.1, holds a bounded number of
connections for a bounded time, and closes them.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, channel_for
from keyplane.clients.credentials import load_credential
from tests.serverkit import FQDN, KEYPLANE

# systemd's default soft limit for a service that sets no LimitNOFILE, as
# packaging/systemd/keyplane.service does not.
SERVICE_NOFILE = 1024
FLOOD = 1100
HOLD_SECONDS = 12.0


def _service_limits() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVICE_NOFILE, hard))


def _hard_limits() -> None:
    """A hard limit of 1024 too: the server cannot raise its soft limit past it."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVICE_NOFILE, SERVICE_NOFILE))


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files limit in /proc")


@contextmanager
def served(
    tmp_path: Path, limits: Callable[[], None] = _service_limits
) -> Iterator[tuple[dict[str, str], Path, subprocess.Popen[bytes]]]:
    data = tmp_path / "srv"
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                KEYPLANE, "serve", "--data-dir", str(data), "--fqdn", FQDN,
                "--listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0",
                "--crl-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limits,  # the limit a systemd service gets
        )  # fmt: skip
    try:
        endpoint = data / "admin" / "endpoint.json"
        deadline = time.monotonic() + 60
        while not endpoint.exists() or "metrics on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield json.loads(endpoint.read_text()), log, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _host_port(address: str) -> tuple[str, int]:
    address = address.removeprefix("https://").removeprefix("http://").rstrip("/")
    host, _, port = address.rpartition(":")
    return host, int(port)


@contextmanager
def idle_connections(address: str, count: int, first_bytes: bytes) -> Iterator[int]:
    """`count` connections that send `first_bytes` (perhaps nothing) and then wait."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 512)), hard))
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                sock = socket.create_connection(_host_port(address), timeout=2)
            except OSError:
                continue
            if first_bytes:
                sock.sendall(first_bytes)
            socks.append(sock)
        yield len(socks)
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _admin_answers(data: Path, listen: str) -> bool:
    """Whether an admin's ListRootKeys is answered within 8 s."""
    credential = load_credential(data / "admin")
    with KeyplaneClient(channel_for(listen, credential), timeout=8.0) as client:
        try:
            client.list_root_keys()
        except KeyplaneClientError:
            return False
    return True


def _served_again(endpoint: dict[str, str], listener: str, data: Path) -> int:
    """The HTTP status the listener answers a request with once the flood is gone."""
    url = endpoint[listener].rstrip("/")
    if not url.startswith("http"):
        url = f"http://{url}"
    context = ssl.create_default_context(cafile=str(data / "admin" / "ca.pem"))
    deadline = time.monotonic() + 10
    while True:
        try:
            address = f"{url}/crl/"
            with urllib.request.urlopen(address, timeout=5, context=context) as reply:  # noqa: S310
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize(
    ("listener", "first_bytes", "limits"),
    [("console", b"", _service_limits), ("crl_listen", b"GET /crl/", _hard_limits)],
    ids=["console-idle-tls", "crl-half-request-hard-limit"],
)
def test_a_flood_of_idle_connections_on_one_listener_leaves_grpc_serving(
    tmp_path: Path, listener: str, first_bytes: bytes, limits: Callable[[], None]
) -> None:
    with served(tmp_path, limits) as (endpoint, log, proc):
        data = tmp_path / "srv"
        soft = _soft_limit(proc.pid)
        before = len(log.read_text().splitlines())
        with idle_connections(endpoint[listener], FLOOD, first_bytes) as held:
            assert held > SERVICE_NOFILE  # the attacker holds more than the limit
            time.sleep(1.0)  # the server accepts what it can
            answered = _admin_answers(data, endpoint["listen"])
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        after = log.read_text().splitlines()[before:]
        emfile = [line for line in after if "Too many open files" in line]
        assert answered, "the mutual-TLS API did not answer while another listener was flooded"
        assert not emfile, f"the server ran out of file descriptors ({len(emfile)} log lines)"
        assert fds < SERVICE_NOFILE, f"the server held {fds} descriptors of {SERVICE_NOFILE}"
        # The refusals are one line (a minute), no traceback; the listener serves again.
        refused = [line for line in after if "refused" in line]
        assert 1 <= len(refused) <= 2 and not [line for line in after if "Traceback" in line]
        # (The console signs nobody in without a link: 401; no CRL at /crl/: 404.)
        assert _served_again(endpoint, listener, data) == {"console": 401}.get(listener, 404)
    if limits is _service_limits:  # a soft limit under the hard one is raised at start
        assert soft > SERVICE_NOFILE
    else:
        assert soft == SERVICE_NOFILE


def test_sixteen_slow_clients_do_not_hold_the_metrics_endpoint(tmp_path: Path) -> None:
    with served(tmp_path) as (_endpoint, log, _):
        address = next(
            line.split("http://", 1)[1].split("/", 1)[0]
            for line in log.read_text().splitlines()
            if "metrics on http://" in line
        )
        socks = [socket.create_connection(_host_port(address), timeout=5) for _ in range(16)]
        try:
            deadline = time.monotonic() + HOLD_SECONDS  # past REQUEST_SECONDS (10 s)
            while time.monotonic() < deadline:
                for sock in socks:  # a byte of a request line now and then, never a line
                    try:
                        sock.send(b"G")
                    except OSError:
                        pass
                time.sleep(2.0)
            try:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
                    status = reply.status
            except OSError as exc:
                status = f"no answer ({exc})"  # type: ignore[assignment]
        finally:
            for sock in socks:
                sock.close()
        assert status == 200, (
            f"a scrape after {HOLD_SECONDS:.0f} s of 16 dribbling connections got {status}"
        )


def _closed_by_server(address: str, first_bytes: bytes, within: float, dribble: bool) -> bool:
    """Whether the server closes a connection that sends `first_bytes` and then nothing
    (or, dribbling, one more byte every two seconds) within `within` seconds."""
    with socket.create_connection(_host_port(address), timeout=2) as sock:
        sock.sendall(first_bytes)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                if sock.recv(4096) == b"":
                    return True
            except TimeoutError:
                pass
            except OSError:
                return True
            try:
                if dribble:
                    sock.send(b"X")
            except OSError:
                return True
        return False


def test_a_request_that_never_ends_is_closed_not_held(tmp_path: Path) -> None:
    with served(tmp_path) as (endpoint, _log, _):
        # A CRL request must be whole within 5 s of the connection's start, however
        # often it sends a byte; a console connection must finish its TLS handshake
        # within 10 s.
        assert _closed_by_server(endpoint["crl_listen"], b"GET /crl/", 20, dribble=True)
        assert _closed_by_server(endpoint["console"], b"", 20, dribble=False)
