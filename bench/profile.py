"""Optional profiles (BENCH_PROFILE=1): py-spy samples a server or zone process while a
row loads it, writing collapsed stacks to bench/results/profile-<label>.txt and the
functions with the most samples to stderr. Off by default: sampling costs throughput."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import env_flag, progress

RESULTS = Path(__file__).resolve().parent / "results"


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextmanager
def profiled(label: str, pid: int) -> Iterator[None]:
    """Sample `pid` for the duration of the block, if BENCH_PROFILE is set."""
    py_spy = _py_spy() if env_flag("BENCH_PROFILE") else None
    if py_spy is None:
        yield
        return
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{label}.txt"
    args = ["record", "-p", str(pid), "-f", "raw", "-o", str(out), "-r", "100", "-s"]
    recorder = subprocess.Popen(
        [py_spy, *args, "--nolineno", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(timeout=10)
        if out.exists():
            progress(f"profile {label} -> {out}\n{summary(out)}")


def summary(path: Path, top: int = 15) -> str:
    """The functions most often on top of the stack (self) and anywhere on it (total)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if "(" in f and not f.startswith("process ")]
        if not frames:
            continue
        n = int(count)
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return "  (no samples)"
    lines = [f"  {samples} samples; self:"]
    lines += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  total:")
    lines += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)
