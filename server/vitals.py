"""The parts a serving process cannot do without (its commit thread, its scheduler, its
trust-state follower), watched: when one of them stops, the process says NOT_SERVING
and stops, so that its supervisor (or systemd) starts a fresh one, instead of staying
up with its writes dead. The server and the zone server both use it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# The exit status of a process that stopped because a vital part died (EX_SOFTWARE).
EXIT_VITAL_PART_DIED = 70
# The exit status of a component that learnt it was revoked: starting it again is no use
# (it must enroll again), so a supervisor stops instead of restarting it.
EXIT_REVOKED = 3
CHECK_SECONDS = 0.25


class Vitals:
    """Named liveness checks, and a monitor that acts on the first one to fail."""

    def __init__(self) -> None:
        self._checks: list[tuple[str, Callable[[], bool]]] = []
        self.died: str | None = None
        self._stopping = False

    def watch(self, name: str, alive: Callable[[], bool]) -> None:
        """`alive()` is polled; False means `name` has stopped."""
        self._checks.append((name, alive))

    def watch_thread(self, name: str, thread: threading.Thread) -> None:
        self.watch(name, lambda: thread.is_alive() or self._stopping)

    def watch_task(self, name: str, task: asyncio.Task[None]) -> None:
        self.watch(name, lambda: not task.done() or self._stopping)

    def stopping(self) -> None:
        """The process is stopping on purpose: parts may end now."""
        self._stopping = True

    def first_dead(self) -> str | None:
        for name, alive in self._checks:
            try:
                ok = alive()
            except Exception:  # a check that cannot tell counts as dead
                ok = False
            if not ok:
                return name
        return None

    async def monitor(
        self, on_death: Callable[[str], Awaitable[None]], what: str, interval: float = CHECK_SECONDS
    ) -> None:
        """Poll until a part dies, then log it and await `on_death(name)` once."""
        while not self._stopping:
            await asyncio.sleep(interval)
            name = self.first_dead()
            if name is not None and not self._stopping:
                self.died = name
                log.critical(
                    "%s: its %s stopped; reporting NOT_SERVING and exiting (status %d) so "
                    "that it is restarted",
                    what,
                    name,
                    EXIT_VITAL_PART_DIED,
                )
                await on_death(name)
                return
