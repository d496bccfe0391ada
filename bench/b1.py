"""B1 enrollment: CSR -> stored client certificate over gRPC (Enroll with a token on the
bootstrap listener, full validation, every certificate recorded), against `cfssl serve`
signing CSRs over HTTP, and the in-process ceiling.

A key is certified once, so every CSR keyplane gets is for a fresh key, sent once: they
are made before anything is timed, enough for every window at the rate the in-process
ceiling (measured first) allows, with a margin; a window that runs out anyway ends early
and says so. cfssl and the ceiling store nothing, so they sign a smaller pool over and
over (the same work per CSR).

Beside the Python load generator, h2load (a C client) drives the same server at c=64,
unary and batch. h2load sends one body, so it replays one CSR, enrolled before its
windows: every call is refused ALREADY_EXISTS, and the row measures that refusal. Each
of its windows ends with calls in flight that it cancels, and the Python row measured
right after it says whether the server took that in its stride."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench import ceiling, h2load
from bench.common import Context, Metric, RowResult, env_int, median, progress, spread
from bench.csrs import make_csrs
from bench.loadgen import CHANNEL_OPTIONS, HttpConnection, LoadResult, Operation, closed_loop
from bench.procs import HOST, CfsslProcess, ServerProcess, cpu_seconds, stop_all
from bench.profile import profiled
from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.v1 import enrollment_service_pb2, enrollment_service_pb2_grpc

CONCURRENCIES = (1, 64)
# CSRs cfssl and the ceiling sign round-robin (they store nothing, so reuse is the same
# work); keyplane gets fresh ones.
CSR_POOL = 2048
# Fresh CSRs made per window: the expected rate (the ceiling's) over the warm-up and the
# window, times this, plus twice what is in flight.
MARGIN = 1.3
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
    `batch` CSRs each. Each CSR in `csrs` is sent once (a fresh key each); when they are
    all sent the window ends early (LoadResult.cut_short). Batch calls take the next of
    BATCH_CHANNELS connections in turn, so that however the kernel spread the connections
    over the server's workers, the calls are spread evenly (few connections for few calls
    could all land on one worker)."""
    calls = max(1, concurrency // batch)
    creds = grpc.ssl_channel_credentials(root_certificates=server.roots_pem())
    channel_count = channels_for(concurrency) if batch == 1 else BATCH_CHANNELS
    channels = [
        grpc.aio.secure_channel(server.bootstrap, creds, options=CHANNEL_OPTIONS)
        for _ in range(channel_count)
    ]
    try:
        stubs = [enrollment_service_pb2_grpc.EnrollmentServiceStub(c) for c in channels]
        # Connect (TLS and HTTP/2 set up) before the clock starts, spending no CSR.
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), timeout)

        def worker(k: int) -> Operation:
            stub = stubs[k % len(stubs)]

            async def enroll(i: int) -> None:
                request = enrollment_service_pb2.EnrollRequest(csr=csrs[i], token=token)
                response = await stub.Enroll(request, timeout=timeout)
                if not response.certificate.serial:
                    raise RuntimeError("Enroll returned no certificate")

            async def enroll_batch(i: int) -> None:
                request = enrollment_service_pb2.EnrollBatchRequest(
                    csrs=csrs[i * batch : (i + 1) * batch], token=token
                )
                response = await stubs[i % len(stubs)].EnrollBatch(request, timeout=timeout)
                if len(response.certificates) != batch:
                    raise RuntimeError("EnrollBatch returned too few certificates")

            return enroll if batch == 1 else enroll_batch

        pids = server.pids()
        cpu_before = cpu_seconds(pids)
        began = time.perf_counter()
        result = await closed_loop(
            [worker(k) for k in range(calls)],
            ctx.settings.duration,
            warmup(ctx),
            max_ops=len(csrs) // batch,
            per_call=batch,
        )
        server_cpu = (cpu_seconds(pids) - cpu_before) / (time.perf_counter() - began)
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


# The keyplane windows of one repeat, in the order they run; each gets fresh CSRs.
C1, C64, C64_AFTER, BATCH, BATCH_AFTER = (
    "Enroll c=1",
    "Enroll c=64",
    "Enroll c=64 after h2load",
    "EnrollBatch c=64",
    "EnrollBatch c=64 after h2load",
)
WINDOWS = (C1, C64, C64_AFTER, BATCH, BATCH_AFTER)


@dataclass
class Window:
    """One keyplane window: the fresh CSRs it may spend (each sent once, made before
    anything is timed), the token it spends, and what it measured."""

    name: str
    repeat: int
    batch: int
    expected_rate: float  # certificates/s the CSRs were made for
    csrs: list[bytes] = field(default_factory=list)
    token: str = ""
    result: LoadResult | None = None

    def summary(self) -> dict[str, Any]:
        spent = min(len(self.csrs), self.result.started * self.batch) if self.result else 0
        return {
            "window": self.name,
            "repeat": self.repeat + 1,
            "expected_rate_per_s": round(self.expected_rate, 1),
            "fresh_csrs": len(self.csrs),
            "spent": spent,
            "cut_short": bool(self.result and self.result.cut_short),
        }


def fresh_needed(rate: float, ctx: Context, batch: int) -> int:
    """Fresh CSRs for one window at `rate`: over its warm-up and window with MARGIN, plus
    twice what is in flight, in whole calls."""
    count = math.ceil(rate * (warmup(ctx) + ctx.settings.duration) * MARGIN)
    count += 2 * max(CONCURRENCIES)
    return -(-count // batch) * batch


def plan_windows(ctx: Context, ceiling_rate: float, batch: int) -> dict[tuple[str, int], Window]:
    """Every keyplane window of the run, sized for the in-process ceiling's rate (keyplane
    does that work and more on the same cores); one call at a time gets a core's share."""
    cores = os.cpu_count() or 1
    windows = {}
    for rep in range(ctx.settings.repeats):
        for name in WINDOWS:
            rate = ceiling_rate / cores if name == C1 else ceiling_rate
            per_call = batch if name.startswith("EnrollBatch") else 1
            windows[name, rep] = Window(name, rep, per_call, rate)
    return windows


def cut_note(runs: list[LoadResult]) -> str:
    """What the table says about windows that ran out of fresh CSRs."""
    cut = [r for r in runs if r.cut_short]
    if not cut:
        return ""
    shortest = min(r.seconds for r in cut)
    when = (
        "during the warm-up, so with no time measured (0/s)"
        if not shortest
        else f"early (shortest {shortest:.2f} s of {cut[0].planned_seconds:g} s)"
    )
    return (
        f"{len(cut)} of {len(runs)} window(s) ran out of fresh CSRs and ended {when}; "
        "a key is certified once, so none is reused: the figure is over the time measured"
    )


def measure(
    server: ServerProcess, window: Window, concurrency: int, ctx: Context, timeout: float = 60
) -> tuple[LoadResult, float]:
    result, cpu = asyncio.run(
        keyplane_run(
            server, window.token, window.csrs, concurrency, ctx, window.batch, timeout=timeout
        )
    )
    window.result = result
    return result, cpu


@dataclass
class H2loadRun:
    """One h2load window replaying one CSR that was enrolled before it. h2load counts every
    HTTP 2xx as a success, whatever the grpc-status, so the refusals are counted as its 2xx
    answers less the certificates the state DB recorded in the window; `probe` is what a
    gRPC client got for the same request body after the window."""

    load: h2load.H2loadResult
    per_call: int
    calls_in_flight: int  # at any moment, so when the window ends too
    signed: list[float]  # when each certificate recorded since h2load started was signed
    server_cpu: float
    probe: str  # "CODE: details" (or "OK") for h2load's body sent once by a gRPC client

    @property
    def recorded(self) -> int:
        """Certificates recorded inside the window (0 expected: the CSR is enrolled)."""
        return sum(self.load.window_start <= t <= self.load.window_end for t in self.signed)

    @property
    def grew(self) -> int:
        """Certificates recorded from h2load's start until the count settled."""
        return len(self.signed)

    @property
    def refused(self) -> int:
        """Calls answered in the window (HTTP 2xx) that recorded no certificate."""
        return max(0, self.load.succeeded - self.recorded)

    @property
    def rate(self) -> float:
        """Refused calls per second of the window."""
        return self.refused / self.load.seconds if self.load.seconds else 0.0

    @property
    def probe_code(self) -> str:
        return self.probe.split(":", 1)[0]

    def summary(self) -> dict[str, Any]:
        return {
            **self.load.summary(),
            "csrs_per_call": self.per_call,
            "calls_in_flight": self.calls_in_flight,
            "refused_in_window": self.refused,
            "refused_calls_per_s": round(self.rate, 1),
            "recorded_in_window": self.recorded,
            "recorded_during_run": self.grew,
            "replay_probe": self.probe,
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


def bootstrap_client(server: ServerProcess) -> KeyplaneClient:
    return KeyplaneClient(bootstrap_channel_for(server.bootstrap, server.roots_pem()))


def replay_probe(server: ServerProcess, method: str, message: bytes) -> str:
    """h2load's request body sent once more by a gRPC client, which reads grpc-status:
    "CODE: details", or "OK" if it was accepted."""
    creds = grpc.ssl_channel_credentials(root_certificates=server.roots_pem())
    with grpc.secure_channel(server.bootstrap, creds) as channel:
        stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(channel)
        try:
            if method == "Enroll":
                stub.Enroll(enrollment_service_pb2.EnrollRequest.FromString(message), timeout=30)
            else:
                request = enrollment_service_pb2.EnrollBatchRequest.FromString(message)
                stub.EnrollBatch(request, timeout=30)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return "OK"


def h2load_run(
    server: ServerProcess, token: str, csr: bytes, ctx: Context, batch: int
) -> H2loadRun:
    """h2load against the bootstrap listener at c=64: unary Enroll calls (batch 1) or
    EnrollBatch calls of `batch` copies of the CSR, every one the same request (h2load
    sends one body). The CSR was enrolled before, so each call is refused ALREADY_EXISTS
    (a replayed CSR). The window's end cancels what is in flight."""
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
    probe = replay_probe(server, method, message)
    return H2loadRun(load, batch, connections * streams, signed, server_cpu, probe)


def after_run(
    server: ServerProcess,
    window: Window,
    ctx: Context,
    before: LoadResult,
    pids: list[int],
    log_offset: int,
) -> AfterRun:
    """The Python row at c=64 again (unary or batch, fresh CSRs), with a deadline short
    enough for a stalled call to show within the row, and what else says whether the
    server stalled."""
    began = time.perf_counter()
    try:
        result, _ = measure(server, window, max(CONCURRENCIES), ctx, timeout=AFTER_DEADLINE_S)
    except (grpc.aio.AioRpcError, TimeoutError) as exc:  # connecting, before the window
        error = (
            f"{exc.code().name}: {exc.details()}"
            if isinstance(exc, grpc.aio.AioRpcError)
            else f"could not connect in {AFTER_DEADLINE_S:g} s"
        )
        result = LoadResult(
            0, ctx.settings.duration, errors=1, first_error=error, per_call=window.batch
        )
        window.result = result
    late = time.perf_counter() - began - warmup(ctx) - result.seconds
    restarted = len(set(pids) - set(server.pids()))
    return AfterRun(result, before, late, restarted, server.errors_logged_since(log_offset))


def h2load_then_python(
    server: ServerProcess,
    token: str,
    csr: bytes,
    window: Window,
    ctx: Context,
    before: LoadResult,
) -> tuple[H2loadRun, AfterRun]:
    """An h2load window replaying `csr` (with its own token), then the Python row again
    against the same server (`window`: fresh CSRs and a token of its own)."""
    pids = server.pids()
    log_offset = server.log.stat().st_size
    h2 = h2load_run(server, token, csr, ctx, window.batch)
    after = after_run(server, window, ctx, before, pids, log_offset)
    what = "Enroll" if window.batch == 1 else f"EnrollBatch x{window.batch}"
    stalled = f"; STALLED: {'; '.join(after.stalls)}" if after.stalls else ""
    progress(
        f"B1 c={max(CONCURRENCIES)} run {window.repeat + 1}/{ctx.settings.repeats}: h2load "
        f"{what} (a replayed CSR) {h2.rate:.0f} refused calls/s ({h2.refused} answered "
        f"without a certificate, {h2.grew} recorded, a gRPC client got {h2.probe_code}; "
        f"failed {h2.load.failed}, errored {h2.load.errored}), hung up on "
        f"{h2.calls_in_flight} calls in flight; then keyplane {after.result.rate:.0f}/s "
        f"(before {before.rate:.0f}/s, errors {after.result.errors}){stalled}"
    )
    return h2, after


def h2load_metrics(what: str, runs: list[H2loadRun], afters: list[AfterRun]) -> list[Metric]:
    """The h2load figure (refused calls: a replayed CSR) and the Python row after it
    (against the same row before it)."""
    top = max(CONCURRENCIES)
    grew = sum(r.grew for r in runs)
    probes = sorted({r.probe_code for r in runs})
    refused = all(code == "ALREADY_EXISTS" for code in probes)
    note = (
        "h2load replays one CSR, enrolled before its windows; a call is counted refused "
        "when h2load got an HTTP 2xx and no certificate was recorded (h2load reads no "
        f"grpc-status); the same body from a gRPC client got {', '.join(probes)}; "
        f"{grew} certificate(s) recorded over this row's h2load windows; each window ends "
        f"with {runs[0].calls_in_flight} calls in flight, cancelled"
    )
    stalled = [f"run {i + 1}: {', '.join(a.stalls)}" for i, a in enumerate(afters) if a.stalls]
    suffix = "" if what == "Enroll" else f", {what}"
    after_note = "; ".join(
        n
        for n in (
            f"STALLED {'; '.join(stalled)}" if stalled else "",
            cut_note([a.result for a in afters]),
        )
        if n
    )
    return [
        Metric(
            f"calls/s c={top}, h2load {what}: a replayed CSR, refused",
            "/s",
            median([r.rate for r in runs]),
            None,
            target="<= 1 cert, ALREADY_EXISTS",
            met=grew <= 1 and refused,
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
            note=after_note,
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
    progress(f"B1: generating {pool} P-256 keys and CSRs for cfssl and the ceiling (reused)")
    reused = make_csrs("bench-b1-pool", pool)
    bodies = [json.dumps({"certificate_request": c.decode()}).encode() for c in reused]
    ceiling_runs = issue_ceiling(ctx, reused)
    ceiling_rate = median(ceiling_runs)

    batch = batch_size()
    windows = plan_windows(ctx, ceiling_rate, batch)
    needed = {key: fresh_needed(w.expected_rate, ctx, w.batch) for key, w in windows.items()}
    total = sum(needed.values()) + 2  # and one CSR for each h2load row to replay
    progress(
        f"B1: generating {total} fresh P-256 keys and CSRs for keyplane, one per certificate "
        f"({len(windows)} windows at up to {ceiling_rate:.0f}/s, the ceiling, x{MARGIN})"
    )
    began = time.perf_counter()
    fresh = make_csrs("bench-b1", total)
    made_seconds = time.perf_counter() - began
    offset = 0
    for key, window in windows.items():
        window.csrs = fresh[offset : offset + needed[key]]
        offset += needed[key]
    h2_csrs = {"enroll": fresh[offset], "batch": fresh[offset + 1]}
    del fresh

    work = ctx.scratch("b1")
    started: list[Any] = []
    results: dict[str, dict[int, list[LoadResult]]] = {"keyplane": {}, "cfssl": {}}
    server_cpu: dict[int, list[float]] = {}
    batched: list[LoadResult] = []
    batched_cpu: list[float] = []
    h2_runs: dict[str, list[H2loadRun]] = {"enroll": [], "batch": []}
    afters: dict[str, list[AfterRun]] = {"enroll": [], "batch": []}
    h2load.executable()  # installed? (make bench-deps), before anything is measured
    try:
        server = ServerProcess(work / "server", *settings.throughput_serve_args)
        started.append(server)
        with server.admin() as admin:
            for window in windows.values():  # a token per window: a use per fresh CSR
                window.token = admin.create_enrollment_token(
                    uses=len(window.csrs), ttl_seconds=86400
                ).token
            setup_token = admin.create_enrollment_token(uses=2, ttl_seconds=86400).token
            # h2load's calls are all refused, so they spend nothing; the token has uses
            # left, so that what refuses them is the replayed CSR, not the token.
            h2_token = admin.create_enrollment_token(uses=1000, ttl_seconds=86400).token
        with bootstrap_client(server) as boot:  # the CSRs h2load replays, enrolled once
            for csr in h2_csrs.values():
                boot.enroll(csr, setup_token)
        cfssl = CfsslProcess(work / "cfssl")
        started.append(cfssl)
        row.details["cfssl_version"] = cfssl.version
        for concurrency in CONCURRENCIES:
            for rep in range(settings.repeats):
                name = C1 if concurrency == 1 else C64
                with profiled(f"b1-enroll-c{concurrency}", server.pid):
                    kp, cpu = measure(server, windows[name, rep], concurrency, ctx)
                results["keyplane"].setdefault(concurrency, []).append(kp)
                server_cpu.setdefault(concurrency, []).append(cpu)
                if concurrency == max(CONCURRENCIES):
                    h2, after = h2load_then_python(
                        server, h2_token, h2_csrs["enroll"], windows[C64_AFTER, rep], ctx, kp
                    )
                    h2_runs["enroll"].append(h2)
                    afters["enroll"].append(after)
                    with profiled(f"b1-enroll-batch{batch}", server.pid):
                        kb, cpu = measure(server, windows[BATCH, rep], concurrency, ctx)
                    batched.append(kb)
                    batched_cpu.append(cpu)
                    progress(
                        f"B1 c={concurrency} run {rep + 1}/{settings.repeats}: keyplane "
                        f"EnrollBatch x{batch} {kb.rate:.0f} certs/s (p99 per call "
                        f"{kb.p99 * 1000:.1f} ms, errors {kb.errors}"
                        f"{', ran out of fresh CSRs' if kb.cut_short else ''})"
                    )
                    h2, after = h2load_then_python(
                        server, h2_token, h2_csrs["batch"], windows[BATCH_AFTER, rep], ctx, kb
                    )
                    h2_runs["batch"].append(h2)
                    afters["batch"].append(after)
                cf = asyncio.run(cfssl_run(cfssl, bodies, concurrency, ctx))
                results["cfssl"].setdefault(concurrency, []).append(cf)
                progress(
                    f"B1 c={concurrency} run {rep + 1}/{settings.repeats}: keyplane "
                    f"{kp.rate:.0f}/s (p99 {kp.p99 * 1000:.1f} ms, errors {kp.errors}"
                    f"{', ran out of fresh CSRs' if kp.cut_short else ''}), "
                    f"cfssl {cf.rate:.0f}/s (p99 {cf.p99 * 1000:.1f} ms, errors {cf.errors})"
                )
    finally:
        stop_all(started)

    row.details["fresh_csrs"] = {
        "note": "keyplane gets a fresh key and CSR per certificate, each sent once, made "
        "before anything is timed; a window that runs out ends early (cut_short)",
        "made": total,
        "seconds_to_make": round(made_seconds, 2),
        "margin": MARGIN,
        "windows": [w.summary() for w in windows.values()],
    }
    row.details["reused_csr_pool"] = {
        "csrs": pool,
        "used_by": "cfssl and the in-process ceiling, round-robin (they store nothing)",
    }
    row.details["ceiling_certs_per_s"] = spread(ceiling_runs)
    row.details["ceiling_processes"] = os.cpu_count()
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
        "note": "h2load sends one body: every request replays one CSR, enrolled before the "
        "windows, and is refused ALREADY_EXISTS (counted as 2xx answers less the "
        "certificates recorded)",
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
                note=cut_note(kp_runs),
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
            batch_rate = median([r.rate for r in batched])
            label = f"certs/s c={concurrency}, EnrollBatch x{batch}"
            for reference, name, target, met, note in (
                (cf_rate, "cfssl", ">= 1.0x cfssl", batch_rate >= cf_rate, cut_note(batched)),
                (
                    ceiling_rate,
                    "ceiling",
                    ">= 0.65x ceiling",
                    batch_rate >= 0.65 * ceiling_rate,
                    "",
                ),
            ):
                row.metrics.append(
                    Metric(
                        label, "/s", batch_rate, reference, name, target=target, met=met, note=note
                    )
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
