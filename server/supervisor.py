"""Worker processes on shared ports (`--workers`), for `keyplane serve` and
`keyplane zone serve`: start them, wait for the first to be ready, restart any that
dies, and stop them all on SIGTERM or SIGINT. The supervisor is the process systemd
started: it says READY=1, WATCHDOG=1 and STOPPING=1 (server/sdnotify.py)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from multiprocessing.process import BaseProcess
from typing import Any

from keyplane.server.sdnotify import SystemdNotifier
from keyplane.server.vitals import EXIT_REVOKED, EXIT_VITAL_PART_DIED

log = logging.getLogger(__name__)

RESTART_DELAY_MAX = 30.0


def supervise(
    target: Callable[..., None],
    args: tuple[Any, ...],
    workers: int,
    ready: Callable[[], bool],
    announce: Callable[[], None],
    what: str,
    startup_seconds: float = 60.0,
    notifier: SystemdNotifier | None = None,
    on_exit: Callable[[int], None] | None = None,
) -> int:
    """Run `target(*args, index)` in `workers` spawned processes. `ready()` says when
    worker 0 serves; then `announce()` prints what a user needs and systemd hears
    READY=1. `on_exit(pid)` is told of each worker process that ended. Returns 1 if
    worker 0 never became ready, EXIT_REVOKED once a worker said it was revoked, else 0
    once stopped by a signal."""
    notifier = notifier or SystemdNotifier({})
    context = multiprocessing.get_context("spawn")
    processes: dict[int, BaseProcess] = {}
    started: dict[int, float] = {}
    # A worker that keeps dying soon after it starts is restarted less and less often.
    quick_deaths: dict[int, int] = {}
    restart_at: dict[int, float] = {}
    stopping = False
    failed = False
    revoked = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def start(index: int) -> None:
        processes[index] = context.Process(target=target, args=(*args, index))
        processes[index].start()
        started[index] = time.monotonic()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(workers):
        start(index)
    deadline = time.monotonic() + startup_seconds
    while not stopping and not ready():
        if not processes[0].is_alive() or time.monotonic() > deadline:
            print(f"{what}: worker 0 failed to start", file=sys.stderr)
            stopping = failed = True
        time.sleep(0.05)
    if not failed:
        announce()
        notifier.ready(f"serving with {workers} workers")
    ping = notifier.ping_interval
    pinged = time.monotonic()
    exits_told: set[int] = set()
    while not stopping:
        time.sleep(0.2)
        now = time.monotonic()
        # Alive and looking after its workers: that is what the watchdog asks.
        if ping is not None and now - pinged >= ping:
            notifier.watchdog()
            pinged = now
        for index, process in list(processes.items()):
            if process.is_alive() or stopping:
                continue
            if on_exit is not None and process.pid is not None and process.pid not in exits_told:
                exits_told.add(process.pid)
                on_exit(process.pid)
            if process.exitcode == EXIT_REVOKED:
                log.error("%s worker %d says it was revoked: stopping every worker", what, index)
                stopping = revoked = True
                break
            if index not in restart_at:
                lived = now - started[index]
                quick_deaths[index] = quick_deaths.get(index, 0) + 1 if lived < 10 else 0
                delay = min(2.0 ** quick_deaths[index] - 1, RESTART_DELAY_MAX)
                restart_at[index] = now + delay
                log.error(
                    "%s worker %d exited (code %s%s); restarting it%s",
                    what,
                    index,
                    process.exitcode,
                    ": a part it needs stopped" if process.exitcode == EXIT_VITAL_PART_DIED else "",
                    f" in {delay:.0f} s" if delay >= 1 else "",
                )
            if now >= restart_at[index]:
                del restart_at[index]
                start(index)
    notifier.stopping()
    for process in processes.values():
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    for process in processes.values():
        process.join(timeout=30)
        if on_exit is not None and process.pid is not None and process.pid not in exits_told:
            on_exit(process.pid)
    if revoked:
        return EXIT_REVOKED
    return 1 if failed else 0


async def serve_as_worker(
    stop: Callable[[], Awaitable[None]], serving: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """In a worker process: serve until SIGTERM or SIGINT, until `serving()` returns (a
    vital part died), or until the supervisor is gone (killed outright, it cannot stop
    its workers: they notice and stop, rather than keep the ports), then `stop()`."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    parent = os.getppid()

    async def orphaned() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        stopping.set()

    watchdog = asyncio.create_task(orphaned())
    served = asyncio.create_task(serving())
    signalled = asyncio.create_task(stopping.wait())
    await asyncio.wait([served, signalled], return_when=asyncio.FIRST_COMPLETED)
    for task in (watchdog, served, signalled):
        task.cancel()
    await stop()
