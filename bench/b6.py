"""B6 memory: the server's RSS with 1,000,000 recorded certificates.

The certificates table is filled directly with sqlite3 while the server is stopped: one
real certificate (enrolled through the server) is reused as every row's PEM, with unique
serials, subjects and key fingerprints, none revoked. Then the server starts on that data
dir, answers a few calls (list certificates with page_size 1000, enroll one, the trust
state), and VmRSS is read from /proc. The reference is the same server on the same data
dir before the table was filled."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench.common import Context, Metric, RowResult, progress
from bench.csrs import make_clients
from bench.procs import LoggedProcess, ServerProcess, proc_status_kib, stop_all
from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for

TARGET_MIB = 300.0
BATCH = 50_000


def _exercise(server: ServerProcess, csr: bytes) -> dict[str, Any]:
    """The calls made before RSS is read; their wall times."""
    timings: dict[str, Any] = {}
    with server.admin() as admin:
        token = admin.create_enrollment_token().token
        began = time.perf_counter()
        listed = admin.list_certificates(page_size=1000)
        timings["list_certificates_1000_s"] = round(time.perf_counter() - began, 3)
        timings["listed"] = len(listed)
        with KeyplaneClient(bootstrap_channel_for(server.bootstrap, server.roots_pem())) as boot:
            began = time.perf_counter()
            issued = boot.enroll(csr, token)
            timings["enroll_s"] = round(time.perf_counter() - began, 3)
            timings["enrolled_serial"] = issued.serial
            began = time.perf_counter()
            boot.get_trust_state()
            timings["get_trust_state_s"] = round(time.perf_counter() - began, 3)
    return timings


def _memory(server: ServerProcess) -> dict[str, float]:
    pids = server.pids()
    return {
        "rss_mib": sum(proc_status_kib(p, "VmRSS") for p in pids) / 1024,
        "hwm_mib": sum(proc_status_kib(p, "VmHWM") for p in pids) / 1024,
        "processes": len(pids),
    }


def _populate(db_path: Path, count: int, template_serial: str) -> float:
    """Insert `count` certificate rows modelled on the row `template_serial`."""
    db = sqlite3.connect(db_path)
    try:
        row = db.execute(
            "SELECT role, issuer_fingerprint, not_before, not_after, certificate_pem, issued_at "
            "FROM certificates WHERE serial = ?",
            (template_serial,),
        ).fetchone()
        if row is None:
            raise RuntimeError(f"no certificate {template_serial} to model the rows on")
        role, issuer, not_before, not_after, pem, issued_at = row
        db.execute("PRAGMA synchronous = OFF")
        began = time.perf_counter()
        base = 0xB6 << 120
        for start in range(0, count, BATCH):
            rows = [
                (
                    f"{base | i:032x}",
                    os.urandom(32).hex(),
                    f"CN=bench-b6-{i},OU=agent,O=keyplane",
                    role,
                    issuer,
                    not_before,
                    not_after,
                    pem,
                    issued_at,
                )
                for i in range(start, min(count, start + BATCH))
            ]
            with db:
                db.executemany(
                    "INSERT INTO certificates (serial, fingerprint, subject, role, "
                    "issuer_fingerprint, not_before, not_after, certificate_pem, issued_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            if start and not start % (BATCH * 4):
                progress(f"B6: {start}/{count} rows")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return time.perf_counter() - began
    finally:
        db.close()


def run(ctx: Context) -> RowResult:
    settings = ctx.settings
    count = settings.b6_certificates
    row = RowResult("B6", "memory with recorded certificates")
    data = ctx.scratch("b6") / "server"
    csrs = [c.csr_pem for c in make_clients("bench-b6", 2)]
    started: list[LoggedProcess] = []
    try:
        began = time.perf_counter()
        server = ServerProcess(data, *settings.serve_args)
        started.append(server)
        baseline_start = time.perf_counter() - began
        baseline_calls = _exercise(server, csrs[0])
        baseline = _memory(server)
        stop_all(started)
        started.clear()
        progress(f"B6: empty server {baseline['rss_mib']:.0f} MiB; inserting {count} rows")
        populate = _populate(data / "keyplane.db", count, baseline_calls["enrolled_serial"])
        size = sum(f.stat().st_size for f in data.glob("keyplane.db*")) / 2**20
        progress(f"B6: {count} rows in {populate:.1f} s ({size:.0f} MiB); starting the server")
        began = time.perf_counter()
        server = ServerProcess(data, *settings.serve_args)
        started.append(server)
        loaded_start = time.perf_counter() - began
        loaded_calls = _exercise(server, csrs[1])
        loaded = _memory(server)
    finally:
        stop_all(started)
    progress(
        f"B6: {loaded['rss_mib']:.0f} MiB RSS with {count} certificates "
        f"(peak {loaded['hwm_mib']:.0f} MiB; empty {baseline['rss_mib']:.0f} MiB)"
    )
    row.metrics.append(
        Metric(
            f"server RSS, {count} certs",
            "MiB",
            loaded["rss_mib"],
            baseline["rss_mib"],
            "empty DB",
            target=f"< {TARGET_MIB:.0f} MiB",
            met=loaded["rss_mib"] < TARGET_MIB,
        )
    )
    row.metrics.append(
        Metric(f"server peak RSS (VmHWM), {count} certs", "MiB", loaded["hwm_mib"], None)
    )
    row.metrics.append(
        Metric(f"start-up, {count} certs", "s", loaded_start, baseline_start, "empty DB")
    )
    row.details.update(
        {
            "certificates": count,
            "rows": "one real certificate PEM reused; unique serials, subjects, fingerprints; "
            "none revoked",
            "populate_seconds": round(populate, 1),
            "db_mib": round(size, 1),
            "empty": {**{k: round(v, 1) for k, v in baseline.items()}, **baseline_calls},
            "loaded": {**{k: round(v, 1) for k, v in loaded.items()}, **loaded_calls},
            "startup_seconds": {
                "empty": round(baseline_start, 2),
                "loaded": round(loaded_start, 2),
            },
        }
    )
    return row
