"""B1 enrollment: CSR -> stored client certificate over gRPC (Enroll with a token on the
bootstrap listener, full validation, every certificate recorded), against `cfssl serve`
signing the same CSRs over HTTP, and the in-process ceiling."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from bench import ceiling
from bench.common import Context, Metric, RowResult, env_int, median, progress, spread
from bench.csrs import make_clients
from bench.loadgen import CHANNEL_OPTIONS, HttpConnection, LoadResult, Operation, closed_loop
from bench.procs import HOST, CfsslProcess, ServerProcess, cpu_seconds, stop_all
from bench.profile import profiled
from keyplane.v1 import enrollment_service_pb2, enrollment_service_pb2_grpc

CONCURRENCIES = (1, 64)
CSR_POOL = 2048
# Connections the batch calls take in turn (see keyplane_run).
BATCH_CHANNELS = 16
CFSSL_SIGN = "/api/v1/cfssl/sign"


def channels_for(concurrency: int) -> int:
    return 1 if concurrency == 1 else 4


async def keyplane_run(
    server: ServerProcess,
    token: str,
    csrs: list[bytes],
    concurrency: int,
    ctx: Context,
    batch: int = 1,
) -> tuple[LoadResult, float]:
    """`concurrency` CSRs in flight: unary Enroll calls (batch 1), or EnrollBatch calls of
    `batch` CSRs each. Batch calls take the next of BATCH_CHANNELS connections in turn, so
    that however the kernel spread the connections over the server's workers, the calls
    are spread evenly (few connections for few calls could all land on one worker)."""
    calls = max(1, concurrency // batch)
    creds = grpc.ssl_channel_credentials(root_certificates=server.roots_pem())
    channel_count = channels_for(concurrency) if batch == 1 else BATCH_CHANNELS
    channels = [
        grpc.aio.secure_channel(server.bootstrap, creds, options=CHANNEL_OPTIONS)
        for _ in range(channel_count)
    ]
    try:
        stubs = [enrollment_service_pb2_grpc.EnrollmentServiceStub(c) for c in channels]
        for stub in stubs:  # connect before the clock starts
            await stub.Enroll(enrollment_service_pb2.EnrollRequest(csr=csrs[0], token=token))

        def worker(k: int) -> Operation:
            stub = stubs[k % len(stubs)]

            async def enroll(i: int) -> None:
                request = enrollment_service_pb2.EnrollRequest(csr=csrs[i % len(csrs)], token=token)
                response = await stub.Enroll(request, timeout=60)
                if not response.certificate.serial:
                    raise RuntimeError("Enroll returned no certificate")

            async def enroll_batch(i: int) -> None:
                first = (i * batch) % len(csrs)
                request = enrollment_service_pb2.EnrollBatchRequest(
                    csrs=[csrs[(first + j) % len(csrs)] for j in range(batch)], token=token
                )
                response = await stubs[i % len(stubs)].EnrollBatch(request, timeout=60)
                if len(response.certificates) != batch:
                    raise RuntimeError("EnrollBatch returned too few certificates")

            return enroll if batch == 1 else enroll_batch

        pids = server.pids()
        cpu_before = cpu_seconds(pids)
        result = await closed_loop(
            [worker(k) for k in range(calls)],
            ctx.settings.duration,
            warmup(ctx),
            per_call=batch,
        )
        server_cpu = (cpu_seconds(pids) - cpu_before) / (ctx.settings.duration + warmup(ctx))
        return result, server_cpu
    finally:
        for channel in channels:
            await channel.close()


async def cfssl_run(
    cfssl: CfsslProcess, bodies: list[bytes], concurrency: int, ctx: Context
) -> LoadResult:
    connections = [HttpConnection(HOST, cfssl.port) for _ in range(concurrency)]
    try:
        for connection in connections:
            await connection.post_json(CFSSL_SIGN, bodies[0])

        def worker(k: int) -> Operation:
            connection = connections[k]

            async def op(i: int) -> None:
                answer = await connection.post_json(CFSSL_SIGN, bodies[i % len(bodies)])
                if not answer.get("success") or not answer["result"].get("certificate"):
                    raise RuntimeError(f"cfssl refused: {answer.get('errors')}")

            return op

        return await closed_loop(
            [worker(k) for k in range(concurrency)], ctx.settings.duration, warmup(ctx)
        )
    finally:
        for connection in connections:
            await connection.close()


def batch_size() -> int:
    """CSRs per EnrollBatch call (BENCH_BATCH, default 16): 64 in flight = 4 calls."""
    return max(1, min(64, env_int("BENCH_BATCH", 16)))


def warmup(ctx: Context) -> float:
    return 0.5 if ctx.settings.quick else 1.0


def issue_ceiling(ctx: Context, csrs: list[bytes]) -> list[float]:
    """The ceiling, measured once per run (B4 reuses it)."""
    if "issue_ceiling" not in ctx.shared:
        runs = []
        for rep in range(ctx.settings.repeats):
            rate = ceiling.ceiling("issue", csrs, ctx.settings.duration)
            progress(f"B1 ceiling run {rep + 1}/{ctx.settings.repeats}: {rate:.0f} certs/s")
            runs.append(rate)
        ctx.shared["issue_ceiling"] = runs
    runs: list[float] = ctx.shared["issue_ceiling"]
    return runs


def run(ctx: Context) -> RowResult:
    settings = ctx.settings
    row = RowResult("B1", "enrollment: CSR -> stored certificate")
    pool = CSR_POOL // 4 if settings.quick else CSR_POOL
    progress(f"B1: generating {pool} P-256 keys and CSRs")
    csrs = [c.csr_pem for c in make_clients("bench-b1", pool)]
    bodies = [json.dumps({"certificate_request": c.decode()}).encode() for c in csrs]
    ceiling_runs = issue_ceiling(ctx, csrs)

    work = ctx.scratch("b1")
    started: list[Any] = []
    results: dict[str, dict[int, list[LoadResult]]] = {"keyplane": {}, "cfssl": {}}
    server_cpu: dict[int, list[float]] = {}
    batch = batch_size()
    batched: list[LoadResult] = []
    batched_cpu: list[float] = []
    try:
        server = ServerProcess(work / "server", *settings.throughput_serve_args)
        started.append(server)
        with server.admin() as admin:
            token = admin.create_enrollment_token(uses=1_000_000, ttl_seconds=86400).token
        cfssl = CfsslProcess(work / "cfssl")
        started.append(cfssl)
        row.details["cfssl_version"] = cfssl.version
        for concurrency in CONCURRENCIES:
            for rep in range(settings.repeats):
                with profiled(f"b1-enroll-c{concurrency}", server.pid):
                    kp, cpu = asyncio.run(keyplane_run(server, token, csrs, concurrency, ctx))
                results["keyplane"].setdefault(concurrency, []).append(kp)
                server_cpu.setdefault(concurrency, []).append(cpu)
                if concurrency == max(CONCURRENCIES):
                    with profiled(f"b1-enroll-batch{batch}", server.pid):
                        kb, cpu = asyncio.run(
                            keyplane_run(server, token, csrs, concurrency, ctx, batch)
                        )
                    batched.append(kb)
                    batched_cpu.append(cpu)
                    progress(
                        f"B1 c={concurrency} run {rep + 1}/{settings.repeats}: keyplane "
                        f"EnrollBatch x{batch} {kb.rate:.0f} certs/s (p99 per call "
                        f"{kb.p99 * 1000:.1f} ms, errors {kb.errors})"
                    )
                cf = asyncio.run(cfssl_run(cfssl, bodies, concurrency, ctx))
                results["cfssl"].setdefault(concurrency, []).append(cf)
                progress(
                    f"B1 c={concurrency} run {rep + 1}/{settings.repeats}: keyplane "
                    f"{kp.rate:.0f}/s (p99 {kp.p99 * 1000:.1f} ms, errors {kp.errors}), "
                    f"cfssl {cf.rate:.0f}/s (p99 {cf.p99 * 1000:.1f} ms, errors {cf.errors})"
                )
    finally:
        stop_all(started)

    ceiling_rate = median(ceiling_runs)
    row.details["csr_pool"] = pool
    row.details["ceiling_certs_per_s"] = spread(ceiling_runs)
    row.details["ceiling_processes"] = __import__("os").cpu_count()
    for who in ("keyplane", "cfssl"):
        row.details[who] = {
            f"c{c}": [r.summary() for r in runs] for c, runs in results[who].items()
        }
    row.details["keyplane_server_cpu_share"] = {
        f"c{c}": [round(v, 3) for v in values] for c, values in server_cpu.items()
    }
    row.details["keyplane_batch"] = {
        "csrs_per_call": batch,
        "calls_in_flight": max(1, max(CONCURRENCIES) // batch),
        "runs": [r.summary() for r in batched],
        "server_cpu_share": [round(v, 3) for v in batched_cpu],
    }
    for concurrency in CONCURRENCIES:
        kp_runs, cf_runs = results["keyplane"][concurrency], results["cfssl"][concurrency]
        kp_rate = median([r.rate for r in kp_runs])
        cf_rate = median([r.rate for r in cf_runs])
        top = concurrency == max(CONCURRENCIES)
        row.metrics.append(
            Metric(
                f"certs/s c={concurrency}",
                "/s",
                kp_rate,
                cf_rate,
                "cfssl",
                target=">= 1.0x cfssl" if top else "",
                met=kp_rate >= cf_rate if top else None,
            )
        )
        if top:
            row.metrics.append(
                Metric(
                    f"certs/s c={concurrency}",
                    "/s",
                    kp_rate,
                    ceiling_rate,
                    "ceiling",
                    target=">= 0.65x ceiling",
                    met=kp_rate >= 0.65 * ceiling_rate,
                )
            )
        if top:
            batch_rate = median([r.rate for r in batched])
            label = f"certs/s c={concurrency}, EnrollBatch x{batch}"
            for reference, name, target, met in (
                (cf_rate, "cfssl", ">= 1.0x cfssl", batch_rate >= cf_rate),
                (ceiling_rate, "ceiling", ">= 0.65x ceiling", batch_rate >= 0.65 * ceiling_rate),
            ):
                row.metrics.append(
                    Metric(label, "/s", batch_rate, reference, name, target=target, met=met)
                )
        for q in ("p50", "p99"):
            row.metrics.append(
                Metric(
                    f"{q} latency c={concurrency}",
                    "ms",
                    median([getattr(r, q) * 1000 for r in kp_runs]),
                    median([getattr(r, q) * 1000 for r in cf_runs]),
                    "cfssl",
                )
            )
    return row
