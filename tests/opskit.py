"""What the operations tests share: a `keyplane` subprocess with its stdout and stderr
kept apart (a JSON log is stderr alone), a scrape of a metrics endpoint parsed by
prometheus_client's own parser, a socket standing in for systemd's NOTIFY_SOCKET, and
the worker processes of a supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.serverkit import FQDN, KEYPLANE

# (sample name, its labels) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Keyplane:
    """`keyplane ARGS` as a real subprocess, its stdout and stderr in files of their own."""

    def __init__(
        self, logs: Path, *args: str, env: dict[str, str] | None = None, clean_env: bool = False
    ) -> None:
        """`env` adds to this process's environment, or with `clean_env` is the whole of it."""
        self.stdout_path = logs.with_suffix(".stdout")
        self.stderr_path = logs.with_suffix(".stderr")
        self._out = self.stdout_path.open("ab")
        self._err = self.stderr_path.open("ab")
        full_env = dict(env or {}) if clean_env else {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [KEYPLANE, *args], stdout=self._out, stderr=self._err, env=full_env
        )

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Until `text` is on stdout; fails with both outputs if the process ends first."""
        deadline = time.monotonic() + timeout
        while text not in self.stdout():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"no {text!r} from keyplane {self.proc.args[1:]}:\n{self.stdout()}\n"
                    f"{self.stderr()[-4000:]}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._out.close()
            self._err.close()


def serve(
    data: Path,
    logs: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    clean_env: bool = False,
) -> Keyplane:
    """`keyplane serve` on loopback ports the kernel picks, up once it says so."""
    process = Keyplane(
        logs,
        "serve",
        "--data-dir",
        str(data),
        "--listen",
        "127.0.0.1:0",
        "--fqdn",
        FQDN,
        *extra,
        env=env,
        clean_env=clean_env,
    )
    process.wait_for("admin credential:")
    return process


def listen_address(data: Path) -> str:
    return str(json.loads((data / "admin" / "endpoint.json").read_text())["listen"])


def scrape(address: str) -> tuple[str, Samples]:
    """GET /metrics: the page, and its samples as prometheus_client's parser reads them."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        page = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return page, samples


def http_status(method: str, url: str) -> int:
    request = urllib.request.Request(url, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The value of the sample with exactly these labels (0 when there is none yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def children(pid: int) -> list[int]:
    """The processes `pid` started (its workers, and multiprocessing's helpers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def workers(pid: int) -> list[int]:
    """The serving workers of a supervisor: its children that multiprocessing spawned
    to run a worker (not its resource tracker)."""
    found = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return found


class NotifySocket:
    """A datagram socket where systemd would listen: NOTIFY_SOCKET for a child. A thread
    reads it all the time, as systemd does (keyplane drops a message rather than wait
    on a full queue). Each message is kept with the process id of its sender
    (SO_PASSCRED), as systemd checks it against NotifyAccess=main."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract is not None:
            self._sock.bind("\0" + abstract)
            self.address = "@" + abstract
        else:
            assert path is not None
            self._sock.bind(str(path))
            self.address = str(path)
        self._sock.settimeout(0.2)
        self.messages: list[tuple[int, str]] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        credentials = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._closed.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, credentials)
            except TimeoutError:
                continue
            except OSError:
                return
            sender = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            self.messages.extend((sender, line) for line in data.decode().splitlines())

    @property
    def lines(self) -> list[str]:
        return [line for _, line in list(self.messages)]

    def receive(self, until: Callable[[list[str]], bool], timeout: float = 60.0) -> list[str]:
        """The lines so far (every datagram's), once `until(lines)` holds."""
        wait_until(
            f"systemd to be told more than {self.lines[-5:]}", lambda: until(self.lines), timeout
        )
        return self.lines

    def senders(self) -> set[int]:
        return {pid for pid, _ in list(self.messages)}

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=5)
        self._sock.close()
