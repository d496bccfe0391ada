"""Named crash points for testing crash safety.

A server configured with `[testing] kill_at = "<point>"` sends itself SIGKILL when it
reaches that point, so tests can prove that a real process killed at each step of a
rotation (or of its first start) restarts into a consistent state. Unset (the default),
a checkpoint does nothing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from keyplane.server.config import KILL_POINTS, ROTATION_KILL_POINTS

# The crash points of a rotation, named in configuration ([testing] kill_at); a start
# has one more (KILL_POINTS).
POINTS = ROTATION_KILL_POINTS
START_POINTS = tuple(p for p in KILL_POINTS if p not in ROTATION_KILL_POINTS)


@dataclass(frozen=True)
class Faults:
    """Which crash point, if any, kills this process."""

    kill_at: str = ""

    def checkpoint(self, point: str) -> None:
        if self.kill_at and self.kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)
