"""B2 message signing: SignMessage over gRPC (mutual TLS, 1 KiB payloads, concurrency 64)
against the in-process sign ceiling (the same content record, ECDSA P-256, per core)."""

from __future__ import annotations

import asyncio
import os

import grpc

from bench import ceiling
from bench.b1 import BATCH_CHANNELS, batch_size
from bench.common import Context, Metric, RowResult, median, progress, spread
from bench.loadgen import CHANNEL_OPTIONS, LoadResult, Operation, closed_loop
from bench.procs import ServerProcess, cpu_seconds, stop_all
from bench.profile import profiled
from keyplane.v1 import message_signing_service_pb2, message_signing_service_pb2_grpc

CONCURRENCY = 64
CHANNELS = 4
PAYLOAD_BYTES = 1024
TARGET = 5000.0


async def keyplane_run(
    server: ServerProcess, ctx: Context, batch: int = 1
) -> tuple[LoadResult, float]:
    """CONCURRENCY payloads in flight: unary SignMessage calls (batch 1), or SignMessages
    calls of `batch` payloads each, taking the next of BATCH_CHANNELS connections in turn
    (as B1 does)."""
    cred = server.credential()
    creds = grpc.ssl_channel_credentials(
        root_certificates=cred.root_certificates_pem,
        private_key=cred.private_key_pem,
        certificate_chain=cred.certificate_chain_pem,
    )
    calls = max(1, CONCURRENCY // batch)
    channels = [
        grpc.aio.secure_channel(server.listen, creds, options=CHANNEL_OPTIONS)
        for _ in range(CHANNELS if batch == 1 else BATCH_CHANNELS)
    ]
    payloads = [os.urandom(PAYLOAD_BYTES) for _ in range(256)]
    try:
        stubs = [message_signing_service_pb2_grpc.MessageSigningServiceStub(c) for c in channels]
        for stub in stubs:
            await stub.SignMessage(
                message_signing_service_pb2.SignMessageRequest(payload=payloads[0])
            )

        def worker(k: int) -> Operation:
            stub = stubs[k % len(stubs)]

            async def sign(i: int) -> None:
                request = message_signing_service_pb2.SignMessageRequest(
                    payload=payloads[i % len(payloads)]
                )
                response = await stub.SignMessage(request, timeout=60)
                if not response.signed_message.signature:
                    raise RuntimeError("SignMessage returned no signature")

            async def sign_many(i: int) -> None:
                first = (i * batch) % len(payloads)
                request = message_signing_service_pb2.SignMessagesRequest(
                    payloads=[payloads[(first + j) % len(payloads)] for j in range(batch)]
                )
                response = await stubs[i % len(stubs)].SignMessages(request, timeout=60)
                if len(response.signed_messages) != batch:
                    raise RuntimeError("SignMessages returned too few signatures")

            return sign if batch == 1 else sign_many

        warm = 0.5 if ctx.settings.quick else 1.0
        pids = server.pids()
        cpu_before = cpu_seconds(pids)
        result = await closed_loop(
            [worker(k) for k in range(calls)], ctx.settings.duration, warm, per_call=batch
        )
        return result, (cpu_seconds(pids) - cpu_before) / (ctx.settings.duration + warm)
    finally:
        for channel in channels:
            await channel.close()


def run(ctx: Context) -> RowResult:
    settings = ctx.settings
    row = RowResult("B2", "message signing (1 KiB)")
    ceiling_runs = []
    payload = [os.urandom(PAYLOAD_BYTES)]
    for rep in range(settings.repeats):
        rate = ceiling.ceiling("sign", payload, settings.duration)
        progress(f"B2 ceiling run {rep + 1}/{settings.repeats}: {rate:.0f} signatures/s")
        ceiling_runs.append(rate)
    runs: list[LoadResult] = []
    cpu: list[float] = []
    batch = batch_size()
    batched: list[LoadResult] = []
    batched_cpu: list[float] = []
    started: list[ServerProcess] = []
    try:
        server = ServerProcess(ctx.scratch("b2") / "server", *settings.throughput_serve_args)
        started.append(server)
        for rep in range(settings.repeats):
            with profiled("b2-sign", server.pid):
                result, server_cpu = asyncio.run(keyplane_run(server, ctx))
            runs.append(result)
            cpu.append(round(server_cpu, 3))
            with profiled(f"b2-sign-batch{batch}", server.pid):
                many, many_cpu = asyncio.run(keyplane_run(server, ctx, batch))
            batched.append(many)
            batched_cpu.append(round(many_cpu, 3))
            progress(
                f"B2 run {rep + 1}/{settings.repeats}: SignMessage {result.rate:.0f} "
                f"signatures/s (p99 {result.p99 * 1000:.1f} ms, errors {result.errors}); "
                f"SignMessages x{batch} {many.rate:.0f} signatures/s (errors {many.errors})"
            )
    finally:
        stop_all(started)  # type: ignore[arg-type]
    rate = median([r.rate for r in runs])
    ceiling_rate = median(ceiling_runs)
    row.metrics.append(
        Metric(
            f"signatures/s c={CONCURRENCY}",
            "/s",
            rate,
            ceiling_rate,
            "ceiling",
            target=f">= {TARGET:.0f}/s",
            met=rate >= TARGET,
        )
    )
    batch_rate = median([r.rate for r in batched])
    row.metrics.append(
        Metric(
            f"signatures/s c={CONCURRENCY}, SignMessages x{batch}",
            "/s",
            batch_rate,
            ceiling_rate,
            "ceiling",
            target=f">= {TARGET:.0f}/s",
            met=batch_rate >= TARGET,
        )
    )
    row.metrics.append(
        Metric(f"p99 latency c={CONCURRENCY}", "ms", median([r.p99 * 1000 for r in runs]), None)
    )
    row.details["keyplane_batch"] = {
        "payloads_per_call": batch,
        "calls_in_flight": max(1, CONCURRENCY // batch),
        "runs": [r.summary() for r in batched],
        "server_cpu_share": batched_cpu,
    }
    row.details["keyplane"] = [r.summary() for r in runs]
    row.details["keyplane_server_cpu_share"] = cpu
    row.details["ceiling_signatures_per_s"] = spread(ceiling_runs)
    row.details["payload_bytes"] = PAYLOAD_BYTES
    return row
