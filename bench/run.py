"""`make bench`: run the rows, print one table, write bench/results/latest.json.

Settings come from BENCH_* environment variables (bench/README.md). Progress goes to
stderr, the table to stdout. Targets are reported, never asserted: the exit status is
non-zero only when a row could not be measured."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench import b1, b2, b3, b4, b5, b6
from bench.common import Context, Metric, RowResult, Settings, progress

ROWS: dict[str, Callable[[Context], RowResult]] = {
    "B1": b1.run,
    "B2": b2.run,
    "B3": b3.run,
    "B4": b4.run,
    "B5": b5.run,
    "B6": b6.run,
}
TITLES = {
    "B1": "enrollment",
    "B2": "message signing",
    "B3": "roots in SoftHSM",
    "B4": "re-enrollment storm",
    "B5": "revocation fan-out",
    "B6": "memory",
}
RESULTS = Path(__file__).resolve().parent / "results"


def _figure(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:g} {unit}"


def _met(metric: Metric) -> str:
    if metric.met is None:
        return "-"
    return "yes" if metric.met else "NO"


def table(results: list[RowResult]) -> str:
    header = ("row", "metric", "keyplane", "peer / ceiling", "ratio", "target", "met?")
    lines: list[tuple[str, ...]] = []
    for result in results:
        if result.error:
            lines.append((result.row, result.title, "ERROR", "-", "-", "-", "-"))
            continue
        for i, m in enumerate(result.metrics):
            reference = "-"
            if m.reference is not None:
                reference = f"{_figure(m.reference, m.unit)} ({m.reference_name})"
            ratio = "-" if m.ratio is None else f"{m.ratio:.2f}x"
            lines.append(
                (
                    result.row if i == 0 else "",
                    m.name,
                    _figure(m.value, m.unit),
                    reference,
                    ratio,
                    m.target or "-",
                    _met(m),
                )
            )
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if 2 <= i <= 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [fmt(header), fmt(tuple("-" * w for w in widths))]
    out += [fmt(line) for line in lines]
    notes = [f"  {r.row} {m.name}: {m.note}" for r in results for m in r.metrics if m.note] + [
        f"  {r.row}: error: {r.error.splitlines()[-1]}" for r in results if r.error
    ]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except OSError:
        return ""


def _meta(settings: Settings, seconds: float) -> dict[str, object]:
    cfssl = shutil.which("cfssl")
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "mode": "quick" if settings.quick else "full",
        "repeats": settings.repeats,
        "duration_s": settings.duration,
        "serve_args": list(settings.serve_args),
        "throughput_serve_args": list(settings.throughput_serve_args),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cfssl": cfssl
        and subprocess.run([cfssl, "version"], capture_output=True, text=True, check=False)
        .stdout.split("\n")[0]
        .strip(),
        "seconds": round(seconds, 1),
    }


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    settings = Settings.from_env()
    unknown = [r for r in settings.rows if r not in ROWS]
    if unknown:
        print(f"bench: unknown row(s) {', '.join(unknown)}; rows are B1..B6", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="keyplane-bench-"))
    ctx = Context(settings, workdir)
    mode = "quick" if settings.quick else "full"
    progress(
        f"{mode} run: rows {' '.join(settings.rows)}, {settings.repeats} repeat(s) of "
        f"{settings.duration:g} s, {os.cpu_count()} cores, scratch {workdir}"
    )
    results: list[RowResult] = []
    began = time.perf_counter()
    try:
        for name in settings.rows:
            row_began = time.perf_counter()
            progress(f"{name}: start")
            try:
                result = ROWS[name](ctx)
            except Exception:
                result = RowResult(name, TITLES[name], error=traceback.format_exc())
                progress(f"{name}: FAILED\n{result.error}")
            result.seconds = time.perf_counter() - row_began
            progress(f"{name}: done in {result.seconds:.0f} s")
            results.append(result)
    finally:
        if settings.keep:
            progress(f"kept the scratch directory {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    document = {"meta": _meta(settings, time.perf_counter() - began)}
    document.update({r.row: r.to_json() for r in results})
    RESULTS.mkdir(exist_ok=True)
    latest = RESULTS / "latest.json"
    text = json.dumps(document, indent=2) + "\n"
    latest.write_text(text)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"run-{stamp}-{mode}.json").write_text(text)
    print()
    print(
        f"keyplane bench ({mode}; medians of {settings.repeats} run(s); "
        f"{os.cpu_count()} cores; 127.0.0.1)"
    )
    print(table(results))
    shown = latest.relative_to(Path.cwd()) if latest.is_relative_to(Path.cwd()) else latest
    print(f"\nresults: {shown}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
