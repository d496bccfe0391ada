"""B5 revocation fan-out: W WatchTrustState streams (100 per channel, spread over a few
watcher processes) on the server's bootstrap listener; revoke a certificate and time,
for every watcher, from the commit (the new version's issue_time) to its arrival."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import random
import time
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.common import Context, Metric, RowResult, median, percentile, progress
from bench.loadgen import CHANNEL_OPTIONS
from bench.procs import LoggedProcess, ServerProcess, cpu_seconds, stop_all
from bench.profile import profiled
from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.v1 import trust_state_pb2, trust_state_service_pb2, trust_state_service_pb2_grpc

STREAMS_PER_CHANNEL = 100
TARGET_P99 = 1.0
OPEN_TIMEOUT = 600.0
COLLECT_TIMEOUT = 120.0
# Streams a watcher process opens at once, and tries per stream (with backoff): a burst of
# new calls beyond grpc.server.max_pending_requests (1000) is CANCELLED by the server.
OPENING_PER_PROCESS = 200
OPEN_ATTEMPTS = 8


def _versions(response: Any) -> list[int]:
    return [trust_state_pb2.TrustStateBody.FromString(v.body).version for v in response.versions]


async def _watch(address: str, roots: bytes, count: int, since: int, conn: Connection) -> None:
    """A watcher process: `count` streams; answers the parent's commands on `conn`."""
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    channels = [
        grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)
        for _ in range(math.ceil(count / STREAMS_PER_CHANNEL))
    ]
    # arrivals[stream][version] = time.time() when the stream received that version
    arrivals: list[dict[int, float]] = [{} for _ in range(count)]
    changed = asyncio.Event()
    calls = []

    stopping = False

    async def follow(index: int, call: Any) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                now = time.time()
                for version in _versions(response):
                    arrivals[index].setdefault(version, now)
                changed.set()
        except grpc.aio.AioRpcError:
            pass
        if not stopping:
            arrivals[index][-1] = time.time()  # the stream ended: a failed watcher
            changed.set()

    opening = asyncio.Semaphore(OPENING_PER_PROCESS)
    rejected = 0

    async def open_and_follow(index: int) -> None:
        nonlocal rejected
        stub = trust_state_service_pb2_grpc.TrustStateServiceStub(
            channels[index // STREAMS_PER_CHANNEL]
        )
        request = trust_state_service_pb2.WatchTrustStateRequest(since_version=since - 1)
        for attempt in range(OPEN_ATTEMPTS):
            # One version back, so the server answers at once: that answer says "ready".
            call = stub.WatchTrustState(request)
            try:
                async with opening:
                    first = await call.read()
            except grpc.aio.AioRpcError:
                first = None
            if first is None or first is grpc.aio.EOF:
                rejected += 1
                call.cancel()
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt) * (0.5 + random.random()))
                continue
            now = time.time()
            for version in _versions(first):
                arrivals[index].setdefault(version, now)
            changed.set()
            calls.append(call)
            await follow(index, call)
            return
        arrivals[index][-1] = time.time()  # never opened
        changed.set()

    tasks = [asyncio.create_task(open_and_follow(i)) for i in range(count)]

    async def wait_for(version: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            missing = sum(1 for a in arrivals if -1 not in a and not any(v >= version for v in a))
            if not missing or time.monotonic() > deadline:
                return missing
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), 0.5)
            except TimeoutError:
                pass

    loop = asyncio.get_running_loop()
    missing = await wait_for(since, OPEN_TIMEOUT)
    failed = sum(1 for a in arrivals if -1 in a)
    conn.send(("ready", count - missing - failed, failed, rejected))
    try:
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] != "collect":
                break
            _, version, timeout = command
            missing = await wait_for(version, timeout)
            times = [
                min(t for v, t in a.items() if v >= version)
                for a in arrivals
                if -1 not in a and any(v >= version for v in a)
            ]
            conn.send(("arrivals", times, missing))
    finally:
        stopping = True
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()


def watcher_process(address: str, roots: bytes, count: int, since: int, conn: Connection) -> None:
    asyncio.run(_watch(address, roots, count, since, conn))


def _latest(admin: KeyplaneClient, since: int = 0) -> tuple[int, float]:
    """The newest trust-state version and its issue_time (seconds since the epoch)."""
    body = trust_state_pb2.TrustStateBody.FromString(admin.get_trust_state(since)[-1].body)
    return body.version, body.issue_time.seconds + body.issue_time.nanos / 1e9


def run(ctx: Context) -> RowResult:
    settings = ctx.settings
    row = RowResult("B5", "revocation fan-out to trust-state watchers")
    watchers = settings.b5_watchers
    processes = min(settings.b5_processes, watchers)
    repeats = settings.repeats
    started: list[LoggedProcess] = []
    children: list[tuple[Any, Connection]] = []
    runs: list[dict[str, Any]] = []
    try:
        server = ServerProcess(ctx.scratch("b5") / "server", *settings.throughput_serve_args)
        started.append(server)
        admin = server.admin()
        token = admin.create_enrollment_token(uses=repeats).token
        serials = []
        with KeyplaneClient(bootstrap_channel_for(server.bootstrap, server.roots_pem())) as boot:
            from bench.csrs import make_clients

            for client in make_clients("bench-b5", repeats):
                serials.append(boot.enroll(client.csr_pem, token).serial)
        version, _ = _latest(admin)
        progress(f"B5: opening {watchers} watchers in {processes} processes")
        spawn = multiprocessing.get_context("spawn")
        began = time.perf_counter()
        for k in range(processes):
            count = watchers // processes + (1 if k < watchers % processes else 0)
            parent_end, child_end = spawn.Pipe()
            process = spawn.Process(
                target=watcher_process,
                args=(server.bootstrap, server.roots_pem(), count, version, child_end),
                daemon=True,
            )
            process.start()
            children.append((process, parent_end))
        ready = failed = rejected = 0
        for _, conn in children:
            if not conn.poll(OPEN_TIMEOUT + 60):
                raise RuntimeError("a watcher process did not report")
            _, ok, bad, refused = conn.recv()
            ready += ok
            failed += bad
            rejected += refused
        open_seconds = time.perf_counter() - began
        progress(
            f"B5: {ready}/{watchers} watchers ready in {open_seconds:.1f} s ({failed} never "
            f"opened, {rejected} refused opening attempts retried)"
        )
        row.details["open_attempts_refused"] = rejected
        row.details["watchers_never_opened"] = failed
        pids = server.pids()
        idle_before = cpu_seconds(pids)
        time.sleep(3.0)
        idle_cpu = (cpu_seconds(pids) - idle_before) / 3.0
        row.details["server_cpu_share_idle_with_watchers"] = round(idle_cpu, 3)
        for rep, serial in enumerate(serials):
            with profiled("b5-server", server.pid):
                called = time.time()
                admin.revoke_certificate(serial, "benchmark")
                returned = time.time()
                new_version, issued = _latest(admin, version)
                for _, conn in children:
                    conn.send(("collect", new_version, COLLECT_TIMEOUT))
                times: list[float] = []
                missing = 0
                for _, conn in children:
                    _, got, lost = conn.recv()
                    times.extend(got)
                    missing += lost
            latencies = [t - issued for t in times]
            runs.append(
                {
                    "version": new_version,
                    "received": len(times),
                    "missing": missing,
                    "p50_s": round(percentile(latencies, 50), 4),
                    "p99_s": round(percentile(latencies, 99), 4),
                    "last_s": round(max(latencies), 4) if latencies else None,
                    "rpc_returned_after_issue_s": round(returned - issued, 4),
                    "issue_after_rpc_call_s": round(issued - called, 4),
                }
            )
            progress(
                f"B5 run {rep + 1}/{repeats}: {len(times)} received, p50 "
                f"{runs[-1]['p50_s']:.3f} s, p99 {runs[-1]['p99_s']:.3f} s, last "
                f"{runs[-1]['last_s']} s, {missing} missing"
            )
            version = new_version
            time.sleep(1.0)
        admin.close()
    finally:
        for process, conn in children:
            try:
                conn.send(("stop",))
            except OSError:
                pass
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(5)
        stop_all(started)

    p50 = median([r["p50_s"] for r in runs])
    p99 = median([r["p99_s"] for r in runs])
    last = median([r["last_s"] or float("nan") for r in runs])
    missing = max(r["missing"] for r in runs)
    row.metrics.append(Metric(f"p50 revoke -> watcher (W={watchers})", "s", p50))
    row.metrics.append(
        Metric(
            f"p99 revoke -> watcher (W={watchers})",
            "s",
            p99,
            target=f"< {TARGET_P99:.0f} s",
            met=p99 < TARGET_P99 and not missing,
            note=f"{missing} watchers never received it" if missing else "",
        )
    )
    row.metrics.append(Metric(f"last watcher (W={watchers})", "s", last))
    row.details.update(
        {
            "watchers": watchers,
            "watcher_processes": processes,
            "streams_per_channel": STREAMS_PER_CHANNEL,
            "open_seconds": round(open_seconds, 2),
            "runs": runs,
        }
    )
    return row
