"""SIGKILL at a random moment: a real `keyplane serve` is killed while a call runs, at a
moment drawn from a window measured on the same call unkilled, then started again on
the same data dir (and ports), and every invariant of tests/invariants.py is checked
with everything the caller was told had succeeded.

    chain = KillChain(tmp_path, token, seed=1)
    chain.measure(rotate)                  # one run unkilled: how long the call takes
    for _ in range(fault_runs()):
        chain.kill_during(rotate)          # kill, restart, check_invariants
    chain.close()

How many runs: KEYPLANE_FAULT_RUNS (10 by default; `make test-long` sets 100).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keyplane.clients.client import KeyplaneClient
from keyplane.clients.credentials import load_credential
from tests.invariants import Acknowledged, InvariantSnapshot, check_invariants
from tests.serverkit import ServerProcess
from tests.softhsm import SoftHsmToken

RUNS_VARIABLE = "KEYPLANE_FAULT_RUNS"
SHORT_RUNS = 10
# The kill moment is drawn from [0, WINDOW_FACTOR x the measured duration of the call]:
# mostly during the call, sometimes just after its answer (work that outlives it).
WINDOW_FACTOR = 1.5


def fault_runs(short: int = SHORT_RUNS, scale: int = 1) -> int:
    """Runs of each fault: KEYPLANE_FAULT_RUNS (at least `short`), times `scale`."""
    text = os.environ.get(RUNS_VARIABLE, "")
    runs = int(text) if text.isdigit() else short
    return max(short, runs * scale) if text else short


def hsm_backends(token: SoftHsmToken, tmp: Path, kinds: tuple[str, ...]) -> str:
    """The TOML that puts `kinds` on the SoftHSM token."""
    options = token.backend_options(tmp)
    lines = "".join(f'{kind} = "pkcs11"\n' for kind in kinds)
    return (
        f"[key_backends]\n{lines}\n[backends.pkcs11]\n"
        f'module = "{options["module"]}"\ntoken = "{options["token"]}"\n'
        f'pin_file = "{options["pin_file"]}"\n\n'
    )


def fault_timeout(per_run: float = 15.0, scale: int = 1) -> float:
    """A test's timeout: a start-up allowance plus `per_run` seconds for each run."""
    return 120.0 + per_run * fault_runs(scale=scale)


@pytest.fixture(params=["software", "softhsm"])
def backend(request: pytest.FixtureRequest) -> SoftHsmToken | None:
    """Each fault on both backends: keys in software, or roots and signing on SoftHSM."""
    if request.param == "software":
        return None
    request.applymarker(pytest.mark.softhsm)
    token: SoftHsmToken = request.getfixturevalue("softhsm_token")
    return token


class Killed(Exception):
    """The call did not answer: the server died under it."""


@dataclass
class Tally:
    """Where the kills landed: before the answer (the call failed) or after it."""

    landed: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.landed.items()))


class KillChain:
    """One data dir whose server is killed and restarted again and again."""

    def __init__(
        self,
        tmp: Path,
        token: SoftHsmToken | None,
        seed: int,
        config: str = "",
        hsm_kinds: tuple[str, ...] = ("root", "message_signing"),
        fixed_ports: bool = False,
    ) -> None:
        self.tmp = tmp
        self.token = token
        self.data = tmp / "data"
        self.rng = random.Random(seed)
        text = (hsm_backends(token, tmp, hsm_kinds) if token else "") + config
        self.config = tmp / "keyplane.toml"
        self.config.write_text(text)
        self.args: list[str] = ["--config", str(self.config)]
        self.acks = Acknowledged()
        self.tally = Tally()
        self.window: float | None = None
        self.restarts = 0
        self.server = ServerProcess(self.data, *self.args)
        if fixed_ports:  # a zone that knows the server's address finds it again
            endpoint = json.loads((self.data / "admin" / "endpoint.json").read_text())
            self.args += [
                "--listen",
                endpoint["listen"],
                "--bootstrap-listen",
                endpoint["bootstrap_listen"],
            ]
        self.snapshot: InvariantSnapshot = self.check()

    @property
    def bootstrap(self) -> str:
        endpoint = json.loads((self.data / "admin" / "endpoint.json").read_text())
        return str(endpoint["bootstrap_listen"])

    def roots_pem(self) -> bytes:
        return (self.data / "admin" / "ca.pem").read_bytes()

    def admin(self) -> KeyplaneClient:
        """An admin client on a connected channel (the server's current credential)."""
        client = KeyplaneClient.connect(self.server.listen, load_credential(self.data / "admin"))
        client.list_root_keys()
        return client

    def check(self, zone_dirs: tuple[Path, ...] = ()) -> InvariantSnapshot:
        self.snapshot = check_invariants(
            self.data,
            token=self.token,
            acknowledged=self.acks,
            previous=getattr(self, "snapshot", None),
            zone_dirs=zone_dirs,
        )
        return self.snapshot

    def measure(self, action: Callable[[], Any], calls: int = 3) -> float:
        """Run the action unkilled `calls` times; the kill window is drawn from the
        slowest of them."""
        slowest = 0.0
        for _ in range(calls):
            started = time.monotonic()
            action()
            slowest = max(slowest, time.monotonic() - started)
        self.window = slowest * WINDOW_FACTOR
        return slowest

    def kill_during(
        self, action: Callable[[], Any], zone_dirs: tuple[Path, ...] = ()
    ) -> tuple[bool, Any]:
        """Start the action, SIGKILL the server at a random moment of the window, start
        it again and check every invariant. (answered, what the action returned)."""
        assert self.window is not None, "measure() first"
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = action()
            except Exception as exc:  # what the call ended with, kept for the caller
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        time.sleep(self.rng.uniform(0, self.window))
        self.server.proc.send_signal(signal.SIGKILL)
        assert self.server.stop() == -signal.SIGKILL
        thread.join(timeout=120)
        assert not thread.is_alive(), "the call did not end after the server died"
        answered = "result" in outcome
        self.tally.landed["after the answer" if answered else "before the answer"] += 1
        self.restart()
        self.check(zone_dirs)
        return answered, outcome.get("result", outcome.get("error"))

    def restart(self) -> None:
        self.server = ServerProcess(self.data, *self.args)
        self.restarts += 1

    def close(self) -> str:
        """Stop the server; what the log says that it should not (a traceback)."""
        status = self.server.stop()
        assert status == 0, f"the last server exited {status}"
        log = self.server.output()
        assert "Traceback" not in log, log[-3000:]
        return f"{self.restarts} kills ({self.tally.summary()})"
