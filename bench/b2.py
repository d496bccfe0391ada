"""B2 message signing: SignMessage over gRPC (mutual TLS, 1 KiB payloads, concurrency 64)
against the in-process sign ceiling (the same content record, ECDSA P-256, per core)."""

from __future__ import annotations

import asyncio
import os

import grpc

from bench import ceiling
from bench.common import Context, Metric, RowResult, median, progress, spread
from bench.loadgen import CHANNEL_OPTIONS, LoadResult, Operation, closed_loop
from bench.procs import ServerProcess, cpu_seconds, stop_all
from bench.profile import profiled
from keyplane.v1 import message_signing_service_pb2, message_signing_service_pb2_grpc

CONCURRENCY = 64
CHANNELS = 4
PAYLOAD_BYTES = 1024
TARGET = 5000.0


async def keyplane_run(server: ServerProcess, ctx: Context) -> tuple[LoadResult, float]:
    cred = server.credential()
    creds = grpc.ssl_channel_credentials(
        root_certificates=cred.root_certificates_pem,
        private_key=cred.private_key_pem,
        certificate_chain=cred.certificate_chain_pem,
    )
    channels = [
        grpc.aio.secure_channel(server.listen, creds, options=CHANNEL_OPTIONS)
        for _ in range(CHANNELS)
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

            async def op(i: int) -> None:
                request = message_signing_service_pb2.SignMessageRequest(
                    payload=payloads[i % len(payloads)]
                )
                response = await stub.SignMessage(request, timeout=60)
                if not response.signed_message.signature:
                    raise RuntimeError("SignMessage returned no signature")

            return op

        warm = 0.5 if ctx.settings.quick else 1.0
        pids = server.pids()
        cpu_before = cpu_seconds(pids)
        result = await closed_loop(
            [worker(k) for k in range(CONCURRENCY)], ctx.settings.duration, warm
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
    started: list[ServerProcess] = []
    try:
        server = ServerProcess(ctx.scratch("b2") / "server", *settings.throughput_serve_args)
        started.append(server)
        for rep in range(settings.repeats):
            with profiled("b2-sign", server.pid):
                result, server_cpu = asyncio.run(keyplane_run(server, ctx))
            runs.append(result)
            cpu.append(round(server_cpu, 3))
            progress(
                f"B2 run {rep + 1}/{settings.repeats}: {result.rate:.0f} signatures/s "
                f"(p99 {result.p99 * 1000:.1f} ms, errors {result.errors})"
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
    row.metrics.append(
        Metric(f"p99 latency c={CONCURRENCY}", "ms", median([r.p99 * 1000 for r in runs]), None)
    )
    row.details["keyplane"] = [r.summary() for r in runs]
    row.details["keyplane_server_cpu_share"] = cpu
    row.details["ceiling_signatures_per_s"] = spread(ceiling_runs)
    row.details["payload_bytes"] = PAYLOAD_BYTES
    return row
