"""B1 enrollment: CSR -> stored client certificate over gRPC (Enroll with a token on the
bootstrap listener, full validation, every certificate recorded), against `cfssl serve`
signing the same CSRs over HTTP, and the in-process ceiling. Beside the Python load
generator, h2load (a C client) drives the same server at c=64, unary and batch; each of
its windows ends with calls in flight that it cancels, and the Python row measured right
after it says whether the server took that in its stride."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench import ceiling, h2load
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
ENROLLMENT_SERVICE = "/keyplane.v1.EnrollmentService"
# h2load's connections at c=64 (as many as the Python row's channels): unary calls run
# 16 streams on each, batch calls one (4 calls of 16 CSRs).
H2LOAD_CONNECTIONS = 4
# The Python row measured right after an h2load window stalled if it completed less than
# this share of the window before it, had a failed call, or came back this many seconds
# late; its calls get a shorter deadline, so a stall shows within the row.
AFTER_SHARE = 0.5
AFTER_LATE_S = 2.0
AFTER_DEADLINE_S = 15.0


def channels_for(concurrency: int) -> int:
    return 1 if concurrency == 1 else 4


async def keyplane_run(
    server: ServerProcess,
    token: str,
    csrs: list[bytes],
    concurrency: int,
    ctx: Context,
    batch: int = 1,
    timeout: float = 60,
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
            request = enrollment_service_pb2.EnrollRequest(csr=csrs[0], token=token)
            await stub.Enroll(request, timeout=timeout)

        def worker(k: int) -> Operation:
            stub = stubs[k % len(stubs)]

            async def enroll(i: int) -> None:
                request = enrollment_service_pb2.EnrollRequest(csr=csrs[i % len(csrs)], token=token)
                response = await stub.Enroll(request, timeout=timeout)
                if not response.certificate.serial:
                    raise RuntimeError("Enroll returned no certificate")

            async def enroll_batch(i: int) -> None:
                first = (i * batch) % len(csrs)
                request = enrollment_service_pb2.EnrollBatchRequest(
                    csrs=[csrs[(first + j) % len(csrs)] for j in range(batch)], token=token
                )
                response = await stubs[i % len(stubs)].EnrollBatch(request, timeout=timeout)
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


@dataclass
class H2loadRun:
    """One h2load window and the certificates the server recorded meanwhile. h2load counts
    every HTTP 2xx as a success, whatever the grpc-status, so what succeeded is counted from
    the state DB: the certificates signed inside the window."""

    load: h2load.H2loadResult
    per_call: int
    in_flight: int  # CSRs in flight at any moment, so when the window ends too
    signed: list[float]  # when each certificate recorded since h2load started was signed
    server_cpu: float

    @property
    def recorded(self) -> int:
        return sum(self.load.window_start <= t <= self.load.window_end for t in self.signed)

    @property
    def rate(self) -> float:
        """Certificates recorded per second of the window."""
        return self.recorded / self.load.seconds if self.load.seconds else 0.0

    @property
    def reported_rate(self) -> float:
        """What h2load's 2xx count says, in certificates per second."""
        return self.load.succeeded * self.per_call / self.load.seconds if self.load.seconds else 0.0

    @property
    def after_hangup(self) -> int:
        """Certificates signed after h2load hung up: cancelled calls the server finished."""
        return sum(t > self.load.window_end for t in self.signed)

    def summary(self) -> dict[str, Any]:
        return {
            **self.load.summary(),
            "csrs_per_call": self.per_call,
            "csrs_in_flight": self.in_flight,
            "recorded_in_window": self.recorded,
            "certs_per_s": round(self.rate, 1),
            "h2load_2xx_certs_per_s": round(self.reported_rate, 1),
            "recorded_during_run": len(self.signed),
            "signed_after_hangup": self.after_hangup,
            "server_cpu_share": round(self.server_cpu, 3),
        }


@dataclass
class AfterRun:
    """The Python row measured again right after an h2load window, against the run before."""

    result: LoadResult
    before: LoadResult
    late: float  # seconds the run took past its warm-up and window
    restarted: int  # server processes gone since before the h2load window
    errors_logged: list[str] = field(default_factory=list)

    @property
    def stalls(self) -> list[str]:
        """What says that this window stalled; nothing if it did not."""
        said = []
        if self.result.rate < AFTER_SHARE * self.before.rate:
            said.append(f"{self.result.rate:.0f}/s against {self.before.rate:.0f}/s before")
        if self.result.errors:
            said.append(f"{self.result.errors} failed call(s), first {self.result.first_error}")
        if self.late > AFTER_LATE_S:
            said.append(f"its calls came back {self.late:.1f} s after the window")
        if self.restarted:
            said.append(f"{self.restarted} server process(es) died and were restarted")
        if self.errors_logged:
            said.append(f"server log: {self.errors_logged[-1][:160]}")
        return said

    def summary(self) -> dict[str, Any]:
        return {
            **self.result.summary(),
            "before_rate": round(self.before.rate, 1),
            "late_s": round(self.late, 3),
            "server_processes_restarted": self.restarted,
            "server_errors_logged": self.errors_logged[-5:],
            "stalled": self.stalls,
        }


def h2load_run(
    server: ServerProcess, token: str, csr: bytes, ctx: Context, batch: int
) -> H2loadRun:
    """h2load against the bootstrap listener at c=64: unary Enroll calls (batch 1) or
    EnrollBatch calls of `batch` CSRs, every one the same request (h2load sends one body),
    so the same CSR over and over. The window's end cancels what is in flight."""
    top = max(CONCURRENCIES)
    if batch == 1:
        method = "Enroll"
        message = enrollment_service_pb2.EnrollRequest(csr=csr, token=token).SerializeToString()
    else:
        method = "EnrollBatch"
        request = enrollment_service_pb2.EnrollBatchRequest(csrs=[csr] * batch, token=token)
        message = request.SerializeToString()
    calls = max(1, top // batch)
    connections = min(H2LOAD_CONNECTIONS, calls)
    streams = max(1, calls // connections)
    work = ctx.scratch("b1")
    body = work / f"h2load-{method}.bin"
    body.write_bytes(h2load.grpc_message(message))
    pids = server.pids()
    cpu_before = cpu_seconds(pids)
    began = time.time()
    load = h2load.run(
        f"https://{server.bootstrap}{ENROLLMENT_SERVICE}/{method}",
        body,
        connections=connections,
        streams=streams,
        duration=ctx.settings.duration,
        warmup=warmup(ctx),
        log=work / f"h2load-{method}.log",
    )
    server_cpu = (cpu_seconds(pids) - cpu_before) / (time.time() - began)
    signed = server.signed_since_settled(began)
    return H2loadRun(load, batch, connections * streams * batch, signed, server_cpu)


def after_run(
    server: ServerProcess,
    token: str,
    csrs: list[bytes],
    ctx: Context,
    batch: int,
    before: LoadResult,
    pids: list[int],
    log_offset: int,
) -> AfterRun:
    """The Python row at c=64 again (unary or batch), with a deadline short enough for a
    stalled call to show within the row, and what else says whether the server stalled."""
    began = time.perf_counter()
    try:
        result, _ = asyncio.run(
            keyplane_run(
                server, token, csrs, max(CONCURRENCIES), ctx, batch, timeout=AFTER_DEADLINE_S
            )
        )
    except grpc.aio.AioRpcError as exc:  # a call that connects, before the window
        error = f"{exc.code().name}: {exc.details()}"
        result = LoadResult(0, ctx.settings.duration, errors=1, first_error=error, per_call=batch)
    late = time.perf_counter() - began - warmup(ctx) - ctx.settings.duration
    restarted = len(set(pids) - set(server.pids()))
    return AfterRun(result, before, late, restarted, server.errors_logged_since(log_offset))


def h2load_then_python(
    server: ServerProcess,
    tokens: tuple[str, str],
    csrs: list[bytes],
    ctx: Context,
    batch: int,
    before: LoadResult,
    run_name: str,
) -> tuple[H2loadRun, AfterRun]:
    """An h2load window (with the first token), then the Python row again against the same
    server (with the second)."""
    pids = server.pids()
    log_offset = server.log.stat().st_size
    h2 = h2load_run(server, tokens[0], csrs[0], ctx, batch)
    after = after_run(server, tokens[1], csrs, ctx, batch, before, pids, log_offset)
    what = "Enroll" if batch == 1 else f"EnrollBatch x{batch}"
    stalled = f"; STALLED: {'; '.join(after.stalls)}" if after.stalls else ""
    progress(
        f"B1 c={max(CONCURRENCIES)} {run_name}: h2load {what} (1 CSR repeated) "
        f"{h2.rate:.0f} certs/s recorded, h2load 2xx {h2.reported_rate:.0f}/s "
        f"(failed {h2.load.failed}, errored {h2.load.errored}), {h2.after_hangup} signed "
        f"after it hung up on {h2.in_flight} in flight; then keyplane {after.result.rate:.0f}"
        f"/s (before {before.rate:.0f}/s, errors {after.result.errors}){stalled}"
    )
    return h2, after


def h2load_metrics(what: str, runs: list[H2loadRun], afters: list[AfterRun]) -> list[Metric]:
    """The h2load figure (certificates recorded, against h2load's 2xx count) and the Python
    row after it (against the same row before it)."""
    top = max(CONCURRENCIES)
    rate = median([r.rate for r in runs])
    short = [r for r in runs if r.rate < 0.95 * r.reported_rate]
    note = (
        f"each window ends with {runs[0].in_flight} CSRs in flight, cancelled; "
        f"{median([r.after_hangup for r in runs]):.0f} certificates signed after h2load hung up"
    )
    if short:
        note += (
            f"; h2load counted {short[0].load.succeeded} 2xx but the server recorded "
            f"{short[0].recorded} certificates in that window (a 200 is not a gRPC OK)"
        )
    stalled = [f"run {i + 1}: {', '.join(a.stalls)}" for i, a in enumerate(afters) if a.stalls]
    suffix = "" if what == "Enroll" else f", {what}"
    return [
        Metric(
            f"certs/s c={top}, h2load {what}, 1 CSR repeated",
            "/s",
            rate,
            median([r.reported_rate for r in runs]),
            "h2load 2xx",
            target=">= 0.95x h2load 2xx",
            met=not short,
            note=note,
        ),
        Metric(
            f"certs/s c={top}{suffix}, after h2load",
            "/s",
            median([a.result.rate for a in afters]),
            median([a.before.rate for a in afters]),
            "before h2load",
            target=f">= {AFTER_SHARE}x before, no stall",
            met=not stalled,
            note=f"STALLED {'; '.join(stalled)}" if stalled else "",
        ),
    ]


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
    h2_runs: dict[str, list[H2loadRun]] = {"enroll": [], "batch": []}
    afters: dict[str, list[AfterRun]] = {"enroll": [], "batch": []}
    h2load.executable()  # installed? (make bench-deps), before anything is measured
    try:
        server = ServerProcess(work / "server", *settings.throughput_serve_args)
        started.append(server)
        with server.admin() as admin:
            token = admin.create_enrollment_token(uses=1_000_000, ttl_seconds=86400).token
            # h2load's windows spend a token of their own (a fast machine could spend most
            # of a million in them).
            h2_token = admin.create_enrollment_token(uses=1_000_000, ttl_seconds=86400).token
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
                    run_name = f"run {rep + 1}/{settings.repeats}"
                    h2, after = h2load_then_python(
                        server, (h2_token, token), csrs, ctx, 1, kp, run_name
                    )
                    h2_runs["enroll"].append(h2)
                    afters["enroll"].append(after)
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
                    h2, after = h2load_then_python(
                        server, (h2_token, token), csrs, ctx, batch, kb, run_name
                    )
                    h2_runs["batch"].append(h2)
                    afters["batch"].append(after)
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
    row.details["h2load"] = {
        "version": h2load.version(),
        "note": "h2load sends one body: every request carries the same CSR",
        **{
            kind: {
                "runs": [r.summary() for r in h2_runs[kind]],
                "after_h2load": [a.summary() for a in afters[kind]],
            }
            for kind in ("enroll", "batch")
        },
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
            row.metrics += h2load_metrics("Enroll", h2_runs["enroll"], afters["enroll"])
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
            row.metrics += h2load_metrics(
                f"EnrollBatch x{batch}", h2_runs["batch"], afters["batch"]
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
