"""Named crash points for testing crash safety.

A server configured with `[testing] kill_at = "<point>"` sends itself SIGKILL when it
reaches that point, so tests can prove that a real process killed at each step of a
rotation restarts into a consistent state. Unset (the default), a checkpoint does nothing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from keyplane.server.config import KILL_POINTS

# The crash points, named in configuration ([testing] kill_at).
POINTS = KILL_POINTS


@dataclass(frozen=True)
class Faults:
    """Which crash point, if any, kills this process."""

    kill_at: str = ""

    def checkpoint(self, point: str) -> None:
        if self.kill_at and self.kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)
