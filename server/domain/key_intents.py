"""Keys are made under a recorded intent, so that none is ever left behind.

A key is generated in its backend before its record commits in the state DB, so a
process killed between the two would leave a key that no record names: never usable,
never revoked, never destroyed (on an HSM, taking a slot for good). So before making
a key, the server commits an intent naming the URI the key will have; the record of
the key removes the intent in its own commit. An intent left over names a key made by
a process that died: clean_up destroys that key (or, if a record names it after all,
keeps it and drops the intent), audited.

A process making a key holds a shared lock on `keys.lock` in the data dir from its
intent to its record; clean_up runs only while it can take that lock exclusively, so it
never touches the key another worker is making right now. The kernel drops the locks of
a process that dies, so a dead worker's intents are free for the next clean-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from keyplane.plugins.errors import BackendError, KeyNotFoundError
from keyplane.plugins.keys import GeneratedKey, KeyAlgorithm
from keyplane.plugins.manager import KeyBackends
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.roots import SERVER_ACTOR
from keyplane.server.store import KeyIntent, StateStore

log = logging.getLogger(__name__)

LOCK_FILE = "keys.lock"


class KeyMaker:
    """Makes keys under a recorded intent, and destroys what a crash left behind."""

    def __init__(
        self, store: StateStore, backends: KeyBackends, clock: Clock, data_dir: Path
    ) -> None:
        self.store = store
        self.backends = backends
        self.clock = clock
        self.lock_path = data_dir / LOCK_FILE

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[bool]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, how)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def making(
        self, backend: str, label: str, algorithm: KeyAlgorithm | str
    ) -> Iterator[GeneratedKey]:
        """A new key, for the block to record (Transaction.insert_key, which drops the
        intent). If the block fails or does not record it, the key is destroyed; if the
        process dies, the next clean_up destroys it."""
        with self._locked(fcntl.LOCK_SH):
            uri = self.backends.new_key_uri(backend, label)
            if uri is not None:
                with self.store.transaction(self.clock.now()) as tx:
                    tx.record_key_intent(uri, backend, label)
            # A backend that fails while generating may or may not have made the key:
            # the intent stays, and clean_up finds out.
            generated = self.backends.generate_key(backend, label, algorithm, uri)
            try:
                yield generated
            except BaseException:
                self._discard(generated.uri)
                raise
            if self.store.key_with_uri(generated.uri) is None:  # the block did not record it
                self._discard(generated.uri)

    def _discard(self, uri: str) -> None:
        """A key this process made and did not record: gone, with its intent."""
        if self._destroy(uri) is not None:
            with self.store.transaction(self.clock.now()) as tx:
                tx.drop_key_intent(uri)

    def _destroy(self, uri: str) -> bool | None:
        """Destroy a key that no record names: True if it was there, False if it never
        was made, None if the backend could not (kept for the next clean-up)."""
        try:
            self.backends.destroy_key(uri)
        except KeyNotFoundError:
            return False
        except BackendError as exc:
            log.error("could not destroy key %s (no record names it): %s", uri, exc)
            return None
        return True

    def clean_up(self) -> list[str]:
        """Resolve the intents that processes which died left: destroy each key no
        record names, keep (adopt) one a record names, drop the intent. Returns the URIs
        of the keys destroyed. Does nothing while a key is being made (another worker's
        intent is not a dead one's): the next clean-up will."""
        if not self.store.key_intents():
            return []
        destroyed: list[str] = []
        with self._locked(fcntl.LOCK_EX | fcntl.LOCK_NB) as alone:
            if not alone:
                return []
            for intent in self.store.key_intents():
                if self._resolve(intent):
                    destroyed.append(intent.uri)
        return destroyed

    def _resolve(self, intent: KeyIntent) -> bool:
        record = self.store.key_with_uri(intent.uri)
        if record is not None:
            with self.store.transaction(self.clock.now()) as tx:
                tx.drop_key_intent(intent.uri)
            return False
        if intent.backend not in self.backends.names:
            log.error(
                "a key was being made in the %s backend, which is not configured now; "
                "its intent (%s) is kept until it is",
                intent.backend,
                intent.uri,
            )
            return False
        made = self._destroy(intent.uri)
        if made is None:
            return False
        with self.store.transaction(self.clock.now()) as tx:
            tx.drop_key_intent(intent.uri)
            if not made:  # the process died before the backend made the key
                return False
            tx.audit(
                SERVER_ACTOR,
                "key.destroy_unrecorded",
                intent.uri,
                backend=intent.backend,
                label=intent.label,
                intended_at=intent.at.isoformat(),
            )
        log.warning(
            "destroyed key %s (%s): it was made by a process that stopped before recording it",
            intent.uri,
            intent.label,
        )
        return True
