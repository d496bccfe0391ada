"""Run the fuzz targets, each in its own process, and print what each did.

    python -m fuzz                      every target for FUZZ_SECONDS (300) each
    python -m fuzz --runs 1000000       every target for a million runs each
    python -m fuzz --seconds 20 csr_intake peer_trust

Each target mutates a copy of its seed corpus (fuzz/corpus/<target>, under
build/fuzz/corpus/) after replaying fuzz/regressions/<target>; a crash, a hang (over
--timeout seconds for one input) or a leak past --rss-mb stops it, leaves the input in
build/fuzz/crashes/ and makes the exit status 1. Copy such an input to
fuzz/regressions/<target>/ once it is fixed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz.harness import CORPUS, FUZZ

TARGETS = (
    "csr_intake",
    "init_bundle",
    "trust_state",
    "peer_trust",
    "signed_message",
    "renewal_proof",
    "backup_archive",
    "backup_manifest",
)
REGRESSIONS = FUZZ / "regressions"
BUILD = FUZZ.parent / "build" / "fuzz"
DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.MULTILINE)
RATE = re.compile(r"^stat::average_exec_per_sec:\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Outcome:
    target: str
    ok: bool
    runs: int
    seconds: float  # wall time, start-up included
    rate: int  # runs per second while fuzzing, as libFuzzer counts them
    log: Path


def regressions(target: str) -> list[Path]:
    folder = REGRESSIONS / target
    return sorted(folder.iterdir()) if folder.is_dir() else []


def replay(target: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """Every kept crash input of `target`, once each (libFuzzer's file arguments)."""
    files = [str(p) for p in regressions(target)]
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [python, "-m", f"fuzz.{target}", "-runs=1", *files],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=FUZZ.parent,
        check=False,
    )


def fuzz(
    target: str,
    work: Path,
    *,
    runs: int | None = None,
    seconds: int | None = None,
    seed: int = 0,
    timeout: int = 10,
    rss_mb: int = 2048,
    python: str = sys.executable,
) -> Outcome:
    """Mutate a copy of `target`'s seeds in `work` for `runs` inputs or `seconds`."""
    corpus = work / "corpus" / target
    crashes = work / "crashes"
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.copytree(CORPUS / target, corpus)
    crashes.mkdir(parents=True, exist_ok=True)
    options = [f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}", f"-seed={seed}"]
    options.append("-print_final_stats=1")
    options.append(f"-artifact_prefix={crashes}/{target}-")
    if runs is not None:
        options.append(f"-runs={runs}")
    if seconds is not None:
        options.append(f"-max_total_time={seconds}")
    log = work / f"{target}.log"
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(  # noqa: S603 - our own interpreter and module
            [python, "-m", f"fuzz.{target}", *options, str(corpus)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=FUZZ.parent,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=False,
        )
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    found = DONE.findall(text)
    executed = int(found[-1][0]) if found else 0
    rate = RATE.findall(text)
    ok = done.returncode == 0 and bool(found)
    return Outcome(target, ok, executed, elapsed, int(rate[-1]) if rate else 0, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz",
        description="Run keyplane's fuzz targets and print runs and runs/s for each.",
        epilog="example: python -m fuzz --runs 1000000 csr_intake",
    )
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (all)")
    parser.add_argument("--runs", type=int, help="inputs per target")
    parser.add_argument(
        "--seconds",
        type=int,
        help="seconds per target (default FUZZ_SECONDS, 300, without --runs)",
    )
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--rss-mb", type=int, default=2048, help="memory limit of a target")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"no target {', '.join(unknown)}; the targets are {', '.join(TARGETS)}")
    seconds = args.seconds
    if seconds is None and args.runs is None:
        seconds = int(os.environ.get("FUZZ_SECONDS", "300"))
    failed = []
    print(f"{'target':16} {'runs':>10} {'seconds':>8} {'runs/s':>8}  result", flush=True)
    for target in args.targets or TARGETS:
        replayed = replay(target)
        if replayed.returncode != 0:
            print(f"{target:16} a kept regression input fails again:\n{replayed.stderr}")
            failed.append(target)
            continue
        outcome = fuzz(
            target,
            BUILD,
            runs=args.runs,
            seconds=seconds,
            timeout=args.timeout,
            rss_mb=args.rss_mb,
        )
        result = "ok" if outcome.ok else f"FAILED, see {outcome.log}"
        figures = f"{outcome.runs:>10} {outcome.seconds:>8.0f} {outcome.rate:>8.0f}"
        print(f"{target:16} {figures}  {result}", flush=True)
        if not outcome.ok:
            failed.append(target)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
