"""A C load generator beside the Python one: h2load (Debian's nghttp2-client) sending one
gRPC request over and over, bounded in time (a warm-up, then a fixed window).

h2load speaks plain HTTP/2, so the request is built here: the method's path, the gRPC
headers, and a body that is one length-prefixed message. h2load counts an HTTP 2xx as a
success, but a gRPC call reports its outcome in `grpc-status` (a trailer, or the only
headers of a trailers-only answer), which h2load never reads: a call the server refused
is a success to h2load. Callers count what really succeeded another way (B1 counts the
certificates the server recorded). When the window ends h2load closes its connections
with requests still in flight, as load generators do: that is a client cancelling them."""

from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = "h2load is not installed: make bench-deps (apt-get install nghttp2-client)"
_SUMMARY = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, "
    r"(?P<timeout>\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_RATE = re.compile(r"finished in [\d.]+m?s, (?P<rate>[\d.]+) req/s")
_REQUEST_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def executable() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


def grpc_message(serialized: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0 (not compressed), 4-byte length, bytes."""
    return b"\0" + struct.pack(">I", len(serialized)) + serialized


def _seconds(text: str) -> float:
    number = re.match(r"[\d.]+", text)
    unit = text[number.end() :] if number else ""
    return float(number.group()) * _UNITS.get(unit, float("nan")) if number else float("nan")


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


@dataclass
class H2loadResult:
    """h2load's summary of one window, and when (time.time()) the window began and ended,
    from the lines h2load prints as its phases change."""

    rate: float  # h2load's req/s: requests done in the window / the window
    total: int
    done: int
    succeeded: int  # HTTP 2xx (and 3xx): not the same as a successful RPC
    failed: int
    errored: int
    timeout: int
    status: tuple[int, int, int, int]  # 2xx, 3xx, 4xx, 5xx
    mean_request_s: float
    max_request_s: float
    window_start: float
    window_end: float
    seconds: float
    client_cpu_seconds: float
    command: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "h2load_req_per_s": round(self.rate, 1),
            "done": self.done,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "errored": self.errored,
            "timeout": self.timeout,
            "status_codes": dict(zip(("2xx", "3xx", "4xx", "5xx"), self.status, strict=True)),
            "mean_request_ms": round(self.mean_request_s * 1000, 3),
            "max_request_ms": round(self.max_request_s * 1000, 3),
            "seconds": round(self.seconds, 3),
            "client_cpu_share": round(self.client_cpu_seconds / self.seconds, 3)
            if self.seconds
            else None,
            "command": " ".join(self.command),
        }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    url: str,
    body: Path,
    *,
    connections: int,
    streams: int,
    duration: float,
    warmup: float,
    log: Path,
) -> H2loadResult:
    """POST `body` to `url` (https, ALPN h2) on `connections` connections with `streams`
    requests in flight on each, for `warmup` then `duration` seconds. h2load's output goes
    to `log`; a failed run raises with its tail."""
    args = [executable(), "-t", "1", "-c", str(connections), "-m", str(streams)]
    args += ["-D", _duration(duration), "--warm-up-time", _duration(warmup), "-d", str(body)]
    args += ["-H", "content-type: application/grpc", "-H", "te: trailers", url]
    marks: dict[str, float] = {}
    lines: list[str] = []
    cpu_before = _children_cpu()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time()
            lines.append(line)
            if line.startswith("Warm-up phase is over"):
                marks.setdefault("start", now)
            elif line.startswith("Main benchmark duration is over"):
                marks.setdefault("end", now)

    reader = threading.Thread(target=read, name="h2load-output", daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=warmup + duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    reader.join(timeout=10)
    client_cpu = _children_cpu() - cpu_before
    output = "".join(lines)
    log.write_text(f"$ {' '.join(args)}\n{output}")
    summary, status, rate = _SUMMARY.search(output), _STATUS.search(output), _RATE.search(output)
    if code != 0 or not (summary and status and rate and "start" in marks and "end" in marks):
        tail = "\n".join(output.splitlines()[-15:])
        raise RuntimeError(f"h2load {'timed out' if code is None else f'exited {code}'}:\n{tail}")
    request_time = _REQUEST_TIME.search(output)
    mean, top = (
        (_seconds(request_time.group(3)), _seconds(request_time.group(2)))
        if request_time
        else (float("nan"), float("nan"))
    )
    counts = {k: int(v) for k, v in summary.groupdict().items()}
    return H2loadResult(
        rate=float(rate.group("rate")),
        total=counts["total"],
        done=counts["done"],
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        errored=counts["errored"],
        timeout=counts["timeout"],
        status=(
            int(status.group(1)),
            int(status.group(2)),
            int(status.group(3)),
            int(status.group(4)),
        ),
        mean_request_s=mean,
        max_request_s=top,
        window_start=marks["start"],
        window_end=marks["end"],
        seconds=marks["end"] - marks["start"],
        client_cpu_seconds=client_cpu,
        command=args,
    )


def version() -> str:
    made = subprocess.run(
        [executable(), "--version"], capture_output=True, text=True, check=False, timeout=30
    )
    return made.stdout.strip()
