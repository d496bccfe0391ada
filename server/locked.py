"""The locked start, and where the database password comes from.

A password-protected server that was not given its password opens no TCP listener (its
TLS key is inside pki.db) but a Unix socket `<data dir>/unlock.sock` (0600) serving
health (NOT_SERVING) and `UnlockService.Unlock` only. The right password opens pki.db
and the start goes on in the same process; a wrong one gets UNAUTHENTICATED, and each
further failure is answered later (1, 2, 4 … s, at most 30), never a lockout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keyplane.plugins.errors import PasswordRequiredError, WrongPasswordError
from keyplane.plugins.password import Password
from keyplane.server.app import Endpoints, KeyplaneServer
from keyplane.server.config import ServerConfig
from keyplane.server.domain.identity import Identity
from keyplane.server.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from keyplane.server.interceptor import KeyplaneInterceptor
from keyplane.server.sdnotify import SystemdNotifier
from keyplane.v1 import unlock_service_pb2, unlock_service_pb2_grpc

log = logging.getLogger(__name__)

UNLOCK_SOCKET = "unlock.sock"
NOT_RIGHT = "the password is not right"
FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 30.0
# sockaddr_un holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107

# Opens pki.db with a password and goes on with the start: the (listen, bootstrap)
# addresses served. WrongPasswordError if the password does not open pki.db.
Unlocker = Callable[[Password], Awaitable[tuple[str, str]]]


def unlock_socket(data_dir: Path) -> Path:
    return data_dir.resolve() / UNLOCK_SOCKET


def with_password_source(config: ServerConfig, file: Path | None, env: str | None) -> ServerConfig:
    """`keyplane serve --password-file/--password-env` over [backends.software]."""
    if file is None and env is None:
        return config
    if file is not None and env is not None:
        raise ConfigError("give --password-file or --password-env, not both")
    software: dict[str, object] = {
        k: v
        for k, v in config.backends.get("software", {}).items()
        if k not in ("password_file", "password_env")
    }
    software["password_file" if file is not None else "password_env"] = (
        str(file) if file is not None else env
    )
    backends = {**config.backends, "software": MappingProxyType(software)}
    return replace(config, backends=MappingProxyType(backends))


def password_for_workers(config: ServerConfig) -> Password | None:
    """With password_env, the password read here once and handed to the workers through
    multiprocessing's pipe; the variable leaves this process's environment, so no worker
    has it in its own (nor in its argv)."""
    name = config.backends.get("software", {}).get("password_env")
    if not name:
        return None
    value = os.environ.pop(str(name), None)
    return Password(value.encode()) if value else None


def _no_certificates(certificate: x509.Certificate) -> Identity:
    raise PermissionDenied("a locked server admits no certificate")


class UnlockServicer(unlock_service_pb2_grpc.UnlockServiceServicer):
    """One attempt at a time, so that the delays after failures add up."""

    def __init__(self, unlock: Unlocker) -> None:
        self._unlock = unlock
        self._attempt = asyncio.Lock()
        self.failures = 0
        self.unlocked = False
        self.fatal: BaseException | None = None
        self.done = asyncio.Event()

    async def Unlock(
        self, request: unlock_service_pb2.UnlockRequest, context: Any
    ) -> unlock_service_pb2.UnlockResponse:
        if not request.password:
            raise InvalidArgument("give the database password")
        async with self._attempt:
            if self.unlocked or self.fatal is not None:
                raise FailedPrecondition("the server is not waiting to be unlocked any more")
            try:
                listen, bootstrap = await self._unlock(Password(request.password.encode()))
            except WrongPasswordError:
                self.failures += 1
                delay = min(FIRST_DELAY_SECONDS * 2 ** (self.failures - 1), MAX_DELAY_SECONDS)
                log.warning(
                    "unlock refused: the database password is not right (failure %d; "
                    "answered after %.0f s)",
                    self.failures,
                    delay,
                )
                await asyncio.sleep(delay)
                raise Unauthenticated(NOT_RIGHT) from None
            except BaseException as exc:
                # pki.db opened but the start cannot go on (a damaged key): the caller
                # hears why, and the process stops with the same message.
                self.fatal = exc
                self.done.set()
                raise
            self.unlocked = True
            self.done.set()
            return unlock_service_pb2.UnlockResponse(listen=listen, bootstrap_listen=bootstrap)


def _claim_socket(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"the data dir's path is too long for its unlock socket (at most "
            f"{MAX_SOCKET_PATH - len(UNLOCK_SOCKET) - 1} bytes); use a shorter one"
        )
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a server that was killed while locked
            else:
                raise ConfigError("another keyplane server is waiting to be unlocked here")


async def wait_for_unlock(
    data_dir: Path,
    unlock: Unlocker,
    stopping: asyncio.Event,
    notifier: SystemdNotifier | None = None,
) -> bool:
    """Serve the unlock socket until `unlock` succeeds (True) or `stopping` is set
    (False); re-raises what made an unlock fatal. The socket is gone afterwards. Under
    systemd, a locked server is started (READY=1) and says it is locked in its STATUS,
    so that `systemctl start` returns instead of waiting for someone to unlock it."""
    path = unlock_socket(data_dir)
    _claim_socket(path)
    server = grpc.aio.server(interceptors=[KeyplaneInterceptor(_no_certificates)])
    servicer = UnlockServicer(unlock)
    unlock_service_pb2_grpc.add_UnlockServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    # The socket is made 0600 as it is bound (and the data dir is 0700 besides).
    umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{path}")
        await server.start()
    finally:
        os.umask(umask)
    path.chmod(0o600)
    log.warning(
        "locked: pki.db is protected by a password and none was given; no listener is open "
        "until 'keyplane unlock --data-dir %s' gives it (socket %s)",
        data_dir,
        path,
    )
    print(
        f"keyplane server is locked: run 'keyplane unlock --data-dir {data_dir}' to give it "
        "the database password",
        flush=True,
    )
    if notifier is not None:
        notifier.ready(f"locked: run 'keyplane unlock --data-dir {data_dir}'")
    done = asyncio.create_task(servicer.done.wait())
    stopped = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait([done, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        done.cancel()
        stopped.cancel()
        await server.stop(grace=5.0)  # the last Unlock's answer goes out first
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if servicer.fatal is not None:
        raise servicer.fatal
    return servicer.unlocked


async def open_and_start(
    server: KeyplaneServer, stopping: asyncio.Event, notifier: SystemdNotifier | None = None
) -> Endpoints | None:
    """Open and start one serving process, waiting to be unlocked first if pki.db needs
    a password it was not given; None if stopped while locked."""
    try:
        await asyncio.to_thread(server.open)
    except PasswordRequiredError:

        async def unlock(password: Password) -> tuple[str, str]:
            await asyncio.to_thread(server.open, password)
            endpoints = await server.start()
            return endpoints.connect_listen, endpoints.connect_bootstrap

        stale_endpoint = server.config.data_dir / "admin" / "endpoint.json"
        stale_endpoint.unlink(missing_ok=True)  # no CLI is sent to a listener that is not up
        if not await wait_for_unlock(server.config.data_dir, unlock, stopping, notifier):
            return None
        assert server.endpoints is not None  # noqa: S101 - unlock started it
        return server.endpoints
    return await server.start()


class StoppedWhileLocked(Exception):
    """SIGTERM or SIGINT came before the server was unlocked."""


def open_before_workers(
    server: KeyplaneServer,
    addresses: tuple[str, str],
    notifier: SystemdNotifier | None = None,
) -> Password | None:
    """For --workers: open (initialise) the data dir here; if pki.db needs a password it
    was not given, wait to be unlocked first, and return the password for the workers.
    StoppedWhileLocked if a signal comes first."""
    try:
        server.open()
        return None
    except PasswordRequiredError:
        pass
    given: list[Password] = []

    async def unlock(password: Password) -> tuple[str, str]:
        await asyncio.to_thread(server.open, password)
        given.append(password)
        return addresses

    async def locked() -> bool:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        return await wait_for_unlock(server.config.data_dir, unlock, stopping, notifier)

    if not asyncio.run(locked()):
        raise StoppedWhileLocked
    return given[0]
