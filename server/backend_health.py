"""The key backends' health, checked every few seconds by each serving process (the
server's and the zone server's alike): while one does not answer (an HSM unplugged or
unreachable), health checks answer NOT_SERVING, `keyplane_backend_up` says which, and
the log says so once when it goes and once when it comes back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from keyplane.plugins.manager import KeyBackends
from keyplane.server.metrics import Metrics

log = logging.getLogger(__name__)


class BackendHealth:
    """The last check's findings (None, or why a backend does not answer) and the loop."""

    def __init__(
        self,
        backends: KeyBackends,
        metrics: Metrics,
        serving: Callable[[bool], Awaitable[None]],
        interval: float,
    ) -> None:
        self._backends = backends
        self._metrics = metrics
        self._serving = serving
        self._interval = interval
        self.found: dict[str, str | None] = dict.fromkeys(backends.names)

    async def check(self) -> None:
        found = await asyncio.to_thread(self._backends.check)
        for name, why in found.items():
            before = self.found.get(name)
            if why and not before:
                log.error("key backend %s does not answer: %s; reporting NOT_SERVING", name, why)
            elif before and not why:
                log.info("key backend %s answers again; reporting SERVING", name)
            self._metrics.backend_up.labels(name).set(0 if why else 1)
        self.found = found
        await self._serving(not any(found.values()))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                log.exception("could not check the key backends")
