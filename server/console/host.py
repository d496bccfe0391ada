"""The console as one serving process hosts it: its address, its status strip, and
starting it (worker 0 only) over the servicers the gRPC server serves."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from keyplane.server.config import ServerConfig
from keyplane.server.console.app import Console, Status
from keyplane.server.console.calls import ConsoleCalls, handlers_of
from keyplane.server.console.site import ConsoleSite, console_url
from keyplane.server.console.tls import ConsoleTls
from keyplane.server.datadir import DataDir
from keyplane.server.domain.audit import RefusalRecorder
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.console_sessions import ConsoleSignIn
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.vitals import Vitals

# How long the status strip trusts an HSM look-up (each one is a round trip).
HSM_CHECK_SECONDS = 10.0


class ConsoleHost:
    """The console of one serving process (None of it runs unless configured)."""

    def __init__(self, config: ServerConfig, clock: Clock, vitals: Vitals) -> None:
        self.config = config
        self.clock = clock
        self.vitals = vitals
        self._hierarchy: Hierarchy | None = None
        self._site: ConsoleSite | None = None
        self._hsm_seen: tuple[float, str] | None = None

    def url(self) -> str | None:
        """Where a browser opens the console (None when it is off, or not bound yet)."""
        address = self.config.console_address
        if address is None:
            return None
        host, port = address
        if port == 0:  # resolved when bound (a lone process's console, in tests)
            if self._site is None:
                return None
            port = self._site.port
        return console_url(host, port, self.config.fqdn)

    def _hsm_state(self, hierarchy: Hierarchy) -> str:
        uris = [r.key_uri for r in hierarchy.active_roots() if r.key_uri.startswith("pkcs11:")]
        if not uris:
            return "not used"
        now = time.monotonic()
        if self._hsm_seen is not None and now - self._hsm_seen[0] < HSM_CHECK_SECONDS:
            return self._hsm_seen[1]
        try:
            state = "reachable" if all(map(hierarchy.backends.holds_key, uris)) else "unreachable"
        except Exception:
            state = "unreachable"
        self._hsm_seen = (now, state)
        return state

    def status(self) -> Status:
        """The status strip (called off the event loop)."""
        hierarchy = self._hierarchy
        assert hierarchy is not None  # noqa: S101 - started
        stopped = self.vitals.died or self.vitals.first_dead()
        data_dir = DataDir.of_server(self.config.data_dir, self.config.backends["software"])
        return Status(
            serving=stopped is None,
            stopped_part=stopped,
            hsm=self._hsm_state(hierarchy),
            sealing="a key file (no password)" if data_dir.key_file.exists() else "a password",
            trust_version=hierarchy.trust.latest_version(),
        )

    async def start(
        self,
        worker: int,
        hierarchy: Hierarchy,
        servicers: Mapping[str, object],
        services: Mapping[str, Any],
        refusals: RefusalRecorder,
    ) -> None:
        """Serve the console if configured, from worker 0 alone; `servicers` are the
        gRPC server's own, by service name, and `services` their descriptors."""
        address = self.config.console_address
        if address is None or worker != 0:
            return
        self._hierarchy = hierarchy
        console = Console(
            ConsoleCalls(handlers_of(servicers, services), refusals.refused),
            ConsoleSignIn(hierarchy.store, hierarchy.admission, self.clock),
            self.status,
            self.config.fqdn,
            self.config.data_dir,
        )
        site = ConsoleSite(
            console, ConsoleTls(hierarchy.tls_material, hierarchy.tls_version), *address
        )
        await site.start()
        self._site = site

    async def stop(self) -> None:
        site, self._site = self._site, None
        if site is not None:
            await site.stop()
