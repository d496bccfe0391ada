"""The load generator: closed-loop workers on one asyncio loop, measured over a fixed
window after a warm-up, and a minimal keep-alive HTTP/1.1 client for cfssl's API."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.common import percentile

Operation = Callable[[int], Awaitable[None]]

# Separate TCP connections per channel, instead of gRPC's process-wide subchannel sharing.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


@dataclass
class LoadResult:
    """One measured window: completions, their latencies, failures, and the CPU the load
    generator itself used (to tell when it, not the server, is the limit). `seconds` is
    the window measured: shorter than planned when `cut_short` (the inputs ran out)."""

    completed: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    client_cpu_seconds: float = 0.0
    # Items (certificates, signatures) per call: more than 1 for batch RPCs.
    per_call: int = 1
    # Calls started, warm-up and calls in flight at the end included (inputs spent).
    started: int = 0
    # The window ended early because every input had been handed out.
    cut_short: bool = False
    planned_seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Items per second."""
        return self.completed * self.per_call / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    def summary(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "per_call": self.per_call,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "p50_ms": round(self.p50 * 1000, 3),
            "p99_ms": round(self.p99 * 1000, 3),
            "errors": self.errors,
            "first_error": self.first_error or None,
            "client_cpu_share": round(self.client_cpu_seconds / self.seconds, 3)
            if self.seconds
            else None,
            "calls_started": self.started,
            **(
                {"cut_short": True, "planned_seconds": round(self.planned_seconds, 3)}
                if self.cut_short
                else {}
            ),
        }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _wait(event: asyncio.Event, until: float) -> None:
    """Until `event` is set or time.perf_counter() reaches `until`."""
    remaining = until - time.perf_counter()
    if remaining > 0 and not event.is_set():
        try:
            await asyncio.wait_for(event.wait(), remaining)
        except TimeoutError:
            pass


async def closed_loop(
    workers: list[Operation],
    duration: float,
    warmup: float,
    max_ops: int = 10_000_000,
    per_call: int = 1,
) -> LoadResult:
    """Run every worker in a loop; count what completes inside [warm-up, warm-up + duration].
    Each call gets a sequence number (to pick its input) and carries `per_call` items.

    At most `max_ops` calls start (sequence numbers 0 .. max_ops - 1: inputs that may be
    used once). When a worker finds them all handed out, the window ends there and then
    (`cut_short`): what completed by that moment is the figure, over the shorter window;
    the calls still in flight are not counted, as at a window's planned end."""
    sequence = 0
    spans: list[tuple[float, float]] = []
    failures: list[tuple[float, str]] = []
    start = time.perf_counter()
    window_start = start + warmup
    window_end = window_start + duration
    ran_out = asyncio.Event()
    ran_out_at = float("inf")
    done = False

    async def run(op: Operation) -> None:
        nonlocal sequence, ran_out_at
        while not done:
            if sequence >= max_ops:
                if not ran_out.is_set():
                    ran_out_at = time.perf_counter()
                    ran_out.set()
                return
            index = sequence
            sequence += 1
            began = time.perf_counter()
            try:
                await op(index)
            except Exception as exc:
                failures.append((time.perf_counter(), _describe(exc)))
                continue
            spans.append((began, time.perf_counter()))

    tasks = [asyncio.create_task(run(op)) for op in workers]
    await _wait(ran_out, window_start)
    cpu_before = _cpu()
    await _wait(ran_out, window_end)
    cpu_after = _cpu()
    end = min(window_end, ran_out_at)
    done = True
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies = [e - b for b, e in spans if window_start <= b and e <= end]
    errors = [what for t, what in failures if window_start <= t <= end]
    return LoadResult(
        completed=len(latencies),
        seconds=max(0.0, end - window_start),
        latencies=latencies,
        errors=len(errors),
        first_error=errors[0] if errors else "",
        client_cpu_seconds=cpu_after - cpu_before,
        per_call=per_call,
        started=sequence,
        cut_short=end < window_end,
        planned_seconds=duration,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1, for POSTing JSON."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def post_json(self, path: str, body: bytes) -> Any:
        reader, writer = await self._connect()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        try:
            raw_head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        payload = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        return json.loads(payload)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
