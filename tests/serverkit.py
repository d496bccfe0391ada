"""Real keyplane servers for tests: in-process on a background event loop, or as a
`keyplane serve` subprocess. Always on 127.0.0.1 with ports chosen by the kernel."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from keyplane.clients.client import KeyplaneClient
from keyplane.clients.credentials import load_credential
from keyplane.server.app import KeyplaneServer
from keyplane.server.config import ServerConfig, load_config
from keyplane.server.domain.clock import Clock

FQDN = "pki.test"
KEYPLANE = str(Path(sys.executable).with_name("keyplane"))


class RunningServer:
    """A KeyplaneServer serving on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.server = KeyplaneServer(config, clock)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        endpoints = self._run(self.server.start())
        self.listen = endpoints.listen
        self.bootstrap = endpoints.bootstrap_listen

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    @property
    def hierarchy(self) -> Any:
        return self.server.hierarchy

    @property
    def admin_dir(self) -> Path:
        return self.config.data_dir / "admin"

    def admin_client(self) -> KeyplaneClient:
        return KeyplaneClient.connect(self.listen, load_credential(self.admin_dir))

    def bootstrap_channel(self) -> grpc.Channel:
        roots = (self.admin_dir / "ca.pem").read_bytes()
        return grpc.secure_channel(
            self.bootstrap, grpc.ssl_channel_credentials(root_certificates=roots)
        )

    def stop(self) -> None:
        try:
            self._run(self.server.stop(grace=None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


def server_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    return load_config(
        overrides.pop("config_file", None),
        data_dir=data_dir,
        listen="127.0.0.1:0",
        fqdn=FQDN,
        **overrides,
    )


@contextmanager
def running_server(
    data_dir: Path, clock: Clock | None = None, **overrides: Any
) -> Iterator[RunningServer]:
    server = RunningServer(server_config(data_dir, **overrides), clock)
    try:
        yield server
    finally:
        server.stop()


class ServerProcess:
    """`keyplane serve` as a real subprocess; the address comes from its endpoint note."""

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        endpoint = data_dir / "admin" / "endpoint.json"
        endpoint.unlink(missing_ok=True)
        self.log = data_dir.parent / f"{data_dir.name}-serve.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                KEYPLANE,
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                "127.0.0.1:0",
                "--fqdn",
                FQDN,
                *extra,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 60
        while not endpoint.exists():
            if self.proc.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"keyplane serve exited early:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"keyplane serve did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.listen = json.loads(endpoint.read_text())["listen"]

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._log_file.close()


def run_cli(
    *args: str, data_dir: Path, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the `keyplane` CLI against the server whose data dir is `data_dir`."""
    full_env = {**os.environ, "KEYPLANE_DATA_DIR": str(data_dir), **(env or {})}
    full_env.pop("KEYPLANE_SERVER", None)
    full_env.pop("KEYPLANE_CREDENTIALS", None)
    full_env.update(env or {})
    return subprocess.run(
        [KEYPLANE, *args], capture_output=True, text=True, env=full_env, check=check, timeout=60
    )


def openssl_verify(
    workdir: Path, roots_pem: str, chain_pem: str, purpose: str = "sslclient"
) -> subprocess.CompletedProcess[str]:
    """`openssl verify -x509_strict` of a chain (leaf first, then intermediates, PEM)
    against `roots_pem`, for `purpose`."""
    blocks = [
        b + "-----END CERTIFICATE-----\n" for b in chain_pem.split("-----END CERTIFICATE-----")
    ]
    blocks = [b.lstrip() for b in blocks if "BEGIN CERTIFICATE" in b]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "roots.pem").write_text(roots_pem)
    (workdir / "untrusted.pem").write_text("".join(blocks[1:]))
    (workdir / "leaf.pem").write_text(blocks[0])
    untrusted = ["-untrusted", str(workdir / "untrusted.pem")] if len(blocks) > 1 else []
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            str(workdir / "roots.pem"),
            *untrusted,
            str(workdir / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
