"""Injectable time, so that weeks of rotation can be tested in milliseconds."""

from __future__ import annotations

import datetime
import threading
from typing import Protocol


class Clock(Protocol):
    """Something that tells the time (always timezone-aware UTC)."""

    def now(self) -> datetime.datetime: ...


class SystemClock:
    """The real time."""

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)


class ManualClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, start: datetime.datetime | None = None) -> None:
        self._now = start or datetime.datetime.now(datetime.UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime.datetime:
        with self._lock:
            return self._now

    def advance(self, delta: datetime.timedelta) -> None:
        with self._lock:
            self._now += delta
