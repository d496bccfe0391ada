"""Per-key usage counters: the key-backend facade counts each key's signatures in
memory; this records them in the state DB in batches (every few seconds, and as the
process stops), adding to what every worker recorded, never one write per signature."""

from __future__ import annotations

import asyncio
import logging

from keyplane.plugins.manager import KeyBackends
from keyplane.server.domain.clock import Clock
from keyplane.server.store import StateStore

log = logging.getLogger(__name__)

# How often each process records the signatures its keys made (one write for all).
FLUSH_SECONDS = 5.0


class UsageRecorder:
    """Takes the facade's counts and adds them to the keys' rows."""

    def __init__(self, backends: KeyBackends, store: StateStore, clock: Clock) -> None:
        self._backends = backends
        self._store = store
        self._clock = clock

    def flush(self) -> None:
        """Record the signatures made since the last flush, in one write (shared with
        other callers' group commit); a failed write gives the counts back for the next."""
        usage = self._backends.take_usage()
        if not usage:
            return
        try:
            self._store.group_commit(self._clock.now(), lambda tx: tx.add_key_usage(usage))
        except Exception:
            self._backends.give_back_usage(usage)
            raise

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await asyncio.to_thread(self.flush)
            except Exception:
                log.exception("could not record key usage; trying again")
