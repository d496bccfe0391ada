"""B3 roots in SoftHSM: the wall time of creating a root (on the token) and re-issuing
every subordinate under it, by the CLI and by the RPC; and the HSM sign overhead of
keyplane's pkcs11 backend against raw python-pkcs11 signing with the same key."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.common import Context, Metric, RowResult, median, progress, spread
from bench.procs import LoggedProcess, ServerProcess, SoftHsm, stop_all

# SoftHSM token labels (not secrets).
SERVER_TOKEN = "keyplane-bench"  # noqa: S105
SIGN_TOKEN = "keyplane-bench-sign"  # noqa: S105
CREATE_TARGET = 1.0
OVERHEAD_TARGET = 1.3


def _create_and_revoke_cli(server: ServerProcess) -> tuple[float, dict[str, object]]:
    began = time.perf_counter()
    created = server.cli("roots", "create", "--json")
    seconds = time.perf_counter() - began
    root = json.loads(created.stdout)
    server.cli("roots", "revoke", root["fingerprint"], "--reason", "benchmark", "--yes")
    return seconds, root


def _create_and_revoke_rpc(server: ServerProcess) -> tuple[float, int, str]:
    with server.admin() as admin:
        began = time.perf_counter()
        root = admin.create_root_key()
        seconds = time.perf_counter() - began
        reissued = sum(1 for k in admin.list_keys() if k.issuer_fingerprint == root.fingerprint)
        admin.revoke_root_key(root.fingerprint, "benchmark", True)
    return seconds, reissued, root.backend


def run(ctx: Context) -> RowResult:
    settings = ctx.settings
    row = RowResult("B3", "roots in SoftHSM")
    work = ctx.scratch("b3")
    hsm = SoftHsm(work / "softhsm")
    hsm.init_token(SERVER_TOKEN)
    hsm.init_token(SIGN_TOKEN)
    options = hsm.options(SERVER_TOKEN)
    config = work / "keyplane.toml"
    config.write_text(
        '[key_backends]\nroot = "pkcs11"\n\n[backends.pkcs11]\n'
        + "".join(f'{name} = "{value}"\n' for name, value in options.items())
    )
    runs = max(3, settings.repeats)
    cli_times: list[float] = []
    rpc_times: list[float] = []
    cli_baseline: list[float] = []
    reissued: list[int] = []
    started: list[LoggedProcess] = []
    try:
        server = ServerProcess(work / "server", *settings.serve_args, config=config, env=hsm.env)
        started.append(server)
        for rep in range(runs):
            began = time.perf_counter()
            server.cli("roots", "list", "--json")
            cli_baseline.append(time.perf_counter() - began)
            seconds, root = _create_and_revoke_cli(server)
            if root.get("backend") != "pkcs11":
                raise RuntimeError(f"the new root is in {root.get('backend')}, not pkcs11")
            cli_times.append(seconds)
            seconds, count, _ = _create_and_revoke_rpc(server)
            rpc_times.append(seconds)
            reissued.append(count)
            progress(
                f"B3 run {rep + 1}/{runs}: roots create {cli_times[-1]:.3f} s by the CLI, "
                f"{seconds:.3f} s by the RPC ({count} subordinates re-issued)"
            )
    finally:
        stop_all(started)

    progress("B3: HSM sign overhead (backend object vs raw python-pkcs11)")
    signed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.hsm_sign",
            SIGN_TOKEN,
            str(hsm.pin_file),
            str(min(settings.duration, 3.0)),
            str(settings.repeats),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **hsm.env},
        timeout=600,
        check=False,
    )
    if signed.returncode != 0:
        raise RuntimeError(f"bench.hsm_sign failed:\n{signed.stderr[-3000:]}")
    rates = json.loads(signed.stdout)
    backend_rate, raw_rate = median(rates["backend"]), median(rates["raw"])
    overhead = raw_rate / backend_rate if backend_rate else float("inf")
    progress(f"B3: backend {backend_rate:.0f}/s, raw {raw_rate:.0f}/s ({overhead:.2f}x)")

    cli_median = median(cli_times)
    row.metrics.append(
        Metric(
            "roots create (CLI, wall)",
            "s",
            cli_median,
            target=f"< {CREATE_TARGET:.0f} s",
            met=cli_median < CREATE_TARGET,
        )
    )
    row.metrics.append(
        Metric(
            "CreateRootKey RPC (wall)",
            "s",
            median(rpc_times),
            note="the same work without the CLI's start-up",
        )
    )
    row.metrics.append(
        Metric(
            "HSM ECDSA P-256 signs/s",
            "/s",
            backend_rate,
            raw_rate,
            "raw pkcs11",
            ratio_inverted=True,
            target=f"overhead <= {OVERHEAD_TARGET}x",
            met=overhead <= OVERHEAD_TARGET,
        )
    )
    row.details.update(
        {
            "roots_create_cli_seconds": spread(cli_times),
            "create_root_rpc_seconds": spread(rpc_times),
            "cli_roots_list_seconds": spread(cli_baseline),
            "subordinates_reissued": reissued,
            "backend_signs_per_s": spread(rates["backend"]),
            "raw_pkcs11_signs_per_s": spread(rates["raw"]),
            "overhead": round(overhead, 4),
            "runs": runs,
        }
    )
    return row
