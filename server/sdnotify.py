"""systemd's notify protocol (sd_notify(3)), for a unit of Type=notify: READY=1 once the
server serves, STOPPING=1 as it stops, WATCHDOG=1 every half WatchdogSec while it is
healthy, STATUS=… for `systemctl status`.

A datagram to the Unix socket in NOTIFY_SOCKET (a path, or `@name` in the abstract
namespace). Read once, from the process systemd started (the supervisor, under
`--workers`), and taken out of the environment there, so that the workers it starts do
not talk to systemd as well. Without NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Tells systemd how the service is doing; does nothing when not run by systemd."""

    def __init__(self, environ: dict[str, str] | os._Environ[str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        elif address:
            log.warning("NOTIFY_SOCKET %r is not a Unix socket; not notifying systemd", address)
        # The watchdog interval, if systemd asked for pings (and for this process's).
        usec = env.pop("WATCHDOG_USEC", "")
        pid = env.pop("WATCHDOG_PID", "")
        self.watchdog_seconds: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def ping_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half the watchdog time, as sd_watchdog_enabled(3)
        advises; None when systemd watches nothing."""
        return self.watchdog_seconds / 2 if self.watchdog_seconds else None

    def notify(self, *fields: str) -> bool:
        """Send `fields` (e.g. "READY=1", "STATUS=serving"); whether it was sent."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never wait: a listener that does not read (its queue full) must not
                # stall the supervisor; that message is dropped.
                sock.setblocking(False)
                sock.connect(self._address)
                sock.send(message)
        except OSError as exc:
            log.debug("could not notify systemd (%s): %s", fields[0] if fields else "", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")
