"""Named crash and failure points for testing crash safety and failure handling.

A server configured with `[testing] kill_at = "<point>"` sends itself SIGKILL when it
reaches that point, so tests can prove that a real process killed at each step of a
rotation, of its first start or of a database password change restarts into a
consistent state; with `[testing] fail_at = "<point>"` the key backend fails there (as
an HSM that went away would), so tests can prove that a change that cannot be completed
is not half made; with `slow_at` and `slow_ms` it is that slow there (as a slow HSM).
Unset (the default), nothing happens.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from keyplane.plugins.errors import BackendUnavailableError
from keyplane.server.config import (
    FAIL_POINTS,
    KILL_POINTS,
    PASSWORD_KILL_POINTS,
    ROTATION_KILL_POINTS,
)

# The crash points, named in configuration ([testing] kill_at): those of a rotation, of a
# first start (START_POINTS) and of a database password change (PASSWORD_POINTS).
POINTS = ROTATION_KILL_POINTS
PASSWORD_POINTS = PASSWORD_KILL_POINTS
START_POINTS = tuple(
    p for p in KILL_POINTS if p not in ROTATION_KILL_POINTS and p not in PASSWORD_KILL_POINTS
)
__all__ = ["FAIL_POINTS", "PASSWORD_POINTS", "POINTS", "START_POINTS", "Faults"]


@dataclass
class Faults:
    """Which crash point, if any, kills this process, and which failure point fails
    (a test may set fail_at on a running server: the hierarchy shares this object)."""

    kill_at: str = ""
    fail_at: str = ""
    slow_at: str = ""
    slow_ms: int = 0

    def checkpoint(self, point: str) -> None:
        if self.kill_at and self.kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def failpoint(self, point: str) -> None:
        if self.slow_at and self.slow_at == point:
            time.sleep(self.slow_ms / 1000)  # as a slow HSM would be
        if self.fail_at and self.fail_at == point:
            raise BackendUnavailableError(f"the key backend failed at {point} (a fault hook)")
