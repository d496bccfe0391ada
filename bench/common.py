"""Shared pieces of the harness: settings from the environment, progress, statistics and
the result records every row returns."""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_START = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, with the time since the harness started."""
    print(f"[bench {time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def default_signals() -> None:
    """Pool initializer: workers die quietly on SIGTERM (the harness handles it itself)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value.replace("_", "")) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Settings:
    """What one run measures, from BENCH_* environment variables (see bench/README.md)."""

    quick: bool
    repeats: int
    duration: float  # seconds per throughput run
    rows: tuple[str, ...]
    b4_clients: int
    b4_budget: float
    b4_concurrency: int
    b5_watchers: int
    b5_processes: int
    b6_certificates: int
    serve_args: tuple[str, ...]
    # B1, B2 and B5 measure throughput: the server runs one worker process per core.
    throughput_serve_args: tuple[str, ...]
    # B4's zone server runs one worker process per core too.
    zone_args: tuple[str, ...]
    keep: bool

    @classmethod
    def from_env(cls) -> Settings:
        quick = env_flag("BENCH_QUICK")
        rows = os.environ.get("BENCH_ROWS", "").replace(",", " ").upper().split()
        return cls(
            quick=quick,
            repeats=max(1, env_int("BENCH_REPEATS", 1 if quick else 3)),
            duration=env_float("BENCH_DURATION", 2.0 if quick else 5.0),
            rows=tuple(rows) or ("B1", "B2", "B3", "B4", "B5", "B6"),
            b4_clients=env_int("BENCH_B4_CLIENTS", 300 if quick else 100_000),
            b4_budget=env_float("BENCH_B4_BUDGET", 120.0 if quick else 600.0),
            b4_concurrency=env_int("BENCH_B4_CONCURRENCY", 64),
            b5_watchers=env_int("BENCH_B5_WATCHERS", 500 if quick else 10_000),
            b5_processes=max(1, env_int("BENCH_B5_PROCESSES", 2)),
            b6_certificates=env_int("BENCH_B6_CERTS", 50_000 if quick else 1_000_000),
            serve_args=tuple(os.environ.get("BENCH_SERVE_ARGS", "").split()),
            throughput_serve_args=tuple(
                os.environ.get(
                    "BENCH_THROUGHPUT_SERVE_ARGS", f"--workers {os.cpu_count() or 1}"
                ).split()
            ),
            zone_args=tuple(
                os.environ.get("BENCH_ZONE_ARGS", f"--workers {os.cpu_count() or 1}").split()
            ),
            keep=env_flag("BENCH_KEEP"),
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Every repeat's value, and their median, min and max (for the JSON)."""
    return {
        "runs": [round(v, 6) for v in values],
        "median": round(median(values), 6),
        "min": round(min(values), 6) if values else None,
        "max": round(max(values), 6) if values else None,
    }


@dataclass
class Metric:
    """One line of the table: keyplane's figure, the peer's or ceiling's, and the target.

    `ratio` is keyplane / reference unless `ratio_inverted`, then reference / keyplane
    (for an overhead, where the reference is the faster one)."""

    name: str
    unit: str
    value: float
    reference: float | None = None
    reference_name: str = ""
    ratio_inverted: bool = False
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference is None or not self.reference or not self.value:
            return None
        return self.reference / self.value if self.ratio_inverted else self.value / self.reference

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "value": round(self.value, 6),
            "reference": None if self.reference is None else round(self.reference, 6),
            "reference_name": self.reference_name or None,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "target": self.target or None,
            "met": self.met,
            "note": self.note or None,
        }


@dataclass
class RowResult:
    """What a row hands back: its metrics and the details behind them (for the JSON)."""

    row: str
    title: str
    metrics: list[Metric] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "metrics": [m.to_json() for m in self.metrics],
            "details": self.details,
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


@dataclass
class Context:
    """What every row gets: the settings, a scratch directory of its own, and figures
    shared between rows of the same run (a ceiling measured once, say)."""

    settings: Settings
    workdir: Path
    shared: dict[str, Any] = field(default_factory=dict)

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
