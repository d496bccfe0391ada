"""Running as a systemd service: the unit files in packaging/systemd pass
`systemd-analyze verify` (offline, so it runs in a container) and its security review,
and a real server tells NOTIFY_SOCKET what Type=notify expects: READY=1 once it
serves, WATCHDOG=1 while it is healthy, STOPPING=1 as it stops, from the main process
only (the supervisor under --workers)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from keyplane.server.sdnotify import SystemdNotifier
from tests.opskit import NotifySocket, serve
from tests.serverkit import KEYPLANE

UNITS = Path(__file__).resolve().parent.parent / "packaging" / "systemd"
SERVICES = ("keyplane.service", "keyplane-zone.service")
# systemd-analyze reads units without a running systemd: no manual pages, no generators.
OFFLINE = ("--man=no", "--generators=no")


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        message = "systemd-analyze is missing (apt-get install systemd; make system-test-deps)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def installed_copy(tmp_path: Path, name: str) -> Path:
    """The unit as installed here: ExecStart pointing at this checkout's keyplane (verify
    checks that the command exists)."""
    unit = tmp_path / name
    unit.write_text((UNITS / name).read_text().replace("/usr/local/bin/keyplane", KEYPLANE))
    return unit


@pytest.mark.parametrize("name", SERVICES)
def test_the_unit_files_verify_cleanly_and_are_hardened(tmp_path: Path, name: str) -> None:
    analyze = systemd_analyze()
    unit = installed_copy(tmp_path, name)
    result = subprocess.run(
        [analyze, "verify", *OFFLINE, str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for a directive it ignores; it says so on stderr.
    assert result.returncode == 0 and result.stderr == "", result.stderr
    text = unit.read_text()
    for setting in (
        "Type=notify",
        "NotifyAccess=main",
        "User=keyplane",
        "StateDirectory=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
        "UMask=0077",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=2 3",
    ):
        assert setting in text, setting
    review = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", review.stdout)
    assert exposure is not None, review.stdout[-2000:] + review.stderr
    assert float(exposure.group(1)) <= 2.0, review.stdout  # systemd calls up to 2.0 "OK"


def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above means something: a misspelt value is reported."""
    unit = installed_copy(tmp_path, "keyplane.service")
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    result = subprocess.run(
        [systemd_analyze(), "verify", *OFFLINE, str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "protect system value" in result.stderr or result.returncode != 0, result.stderr


@pytest.mark.parametrize("workers", [None, 2], ids=["one-process", "two-workers"])
def test_a_real_server_says_ready_watchdog_and_stopping(
    tmp_path: Path, workers: int | None
) -> None:
    if workers is None:  # systemd's abstract socket name, as on most systems
        notify = NotifySocket(abstract=f"keyplane-test-{uuid.uuid4().hex}")
    else:
        notify = NotifySocket(path=tmp_path / "notify.sock")
    extra = ("--workers", str(workers)) if workers else ()
    try:
        process = serve(
            tmp_path / "data",
            tmp_path / "serve",
            *extra,
            env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"},  # 0.4 s
        )
        try:
            notify.receive(lambda lines: "READY=1" in lines)
            # Pings come every half WatchdogSec while it serves.
            notify.receive(lambda lines: lines.count("WATCHDOG=1") >= 3)
            ready = notify.lines.index("READY=1")
            assert any(line.startswith("STATUS=serving") for line in notify.lines[ready:])
        finally:
            assert process.stop(signal.SIGTERM) == 0
        notify.receive(lambda lines: "STOPPING=1" in lines, timeout=5)
        # Only the process systemd started talks to it (NotifyAccess=main).
        assert notify.senders() == {process.proc.pid}
    finally:
        notify.close()


def test_without_notify_socket_nothing_is_sent_and_workers_inherit_nothing() -> None:
    environ = {"NOTIFY_SOCKET": "@somewhere", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    notifier = SystemdNotifier(environ)
    assert notifier.enabled
    assert notifier.ping_interval is None  # the watchdog is another process's
    assert environ == {}  # taken out: the workers it starts do not see it
    silent = SystemdNotifier({})
    assert not silent.enabled and not silent.ready("serving") and silent.ping_interval is None
    mine = SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "2000000"})
    assert mine.ping_interval == 1.0
    assert not mine.watchdog()  # nobody listens there: no error, just not sent


def test_the_service_exit_statuses_are_the_ones_the_unit_will_not_restart(
    tmp_path: Path,
) -> None:
    """RestartPreventExitStatus=2 3: a refused start exits 2 (here: a bad option)."""
    result = subprocess.run(
        [KEYPLANE, "serve", "--data-dir", str(tmp_path / "d"), "--listen", "nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
