"""B4 re-enrollment storm: N simulated clients, enrolled through a zone server, all renew
(each with its own certificate and a new key) after a root rotation: by default with
RenewWithProof over a few shared connections; with BENCH_B4_RENEW=mtls with Renew over a
new mutual-TLS connection per client. Total time from `CreateRootKey` to the last
renewal.

Every key is fresh and certified once. A renewal proof (v2) binds the current
certificate and the audience (the zone's name) and is good for 15 minutes, so each
client's renewal key, CSR and proof are made after it enrolled and before the storm,
outside the measured time.

The row has a time budget (BENCH_B4_BUDGET). Key generation comes first; enrollment
stops when half of the budget is spent; then the renewal keys and proofs; the storm stops
at the end of the budget (and before the proofs grow stale). When fewer than N clients
renewed, the total for N is extrapolated from the measured renewal rate, and the row says
so, with the N measured."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from bench import b1
from bench.common import Context, Metric, RowResult, median, progress
from bench.csrs import ClientKeys, Renewal, make_clients, make_renewals
from bench.loadgen import CHANNEL_OPTIONS
from bench.procs import LoggedProcess, ServerProcess, ZoneProcess, cpu_seconds, stop_all
from bench.profile import profiled
from keyplane.clients.bundle import load_bundle
from keyplane.v1 import (
    enrollment_service_pb2,
    enrollment_service_pb2_grpc,
    trust_state_pb2,
    trust_state_service_pb2,
    trust_state_service_pb2_grpc,
)

ENROLL_CONCURRENCY = 64
ENROLL_CHANNELS = 4
TARGET_SECONDS = 60.0
RETRIES = 3
MIN_STORM_SECONDS = 30.0
# The server refuses a proof more than 15 minutes from its clock: no renewal starts later
# than this after the proofs' time.
PROOF_FRESH_SECONDS = 14 * 60.0
REPORT_EVERY = 15.0


@dataclass
class StormResult:
    wanted: int
    keygen_seconds: float = 0.0
    enrolled: int = 0
    enroll_errors: int = 0
    enroll_seconds: float = 0.0
    enroll_cut_short: bool = False
    prepare_seconds: float = 0.0  # renewal keys, CSRs (and proofs), after enrollment
    storm_cut_by_proof_age: bool = False
    pickup_seconds: float = 0.0  # CreateRootKey called -> the zone relays the new version
    renewed: int = 0
    storm_seconds: float = 0.0  # the zone relays it -> the last renewal returns
    storm_cut_short: bool = False
    renew_errors: int = 0
    retried: int = 0
    first_error: str = ""
    on_new_root: int = 0
    server_cpu_share: float = 0.0
    zone_cpu_share: float = 0.0
    server_open_files: int = 0

    @property
    def renew_rate(self) -> float:
        return self.renewed / self.storm_seconds if self.storm_seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "clients_wanted": self.wanted,
            "keygen_seconds": round(self.keygen_seconds, 2),
            "enrolled": self.enrolled,
            "enroll_errors": self.enroll_errors,
            "enroll_seconds": round(self.enroll_seconds, 2),
            "enroll_per_s": round(self.enrolled / self.enroll_seconds, 1)
            if self.enroll_seconds
            else None,
            "enroll_cut_short_by_budget": self.enroll_cut_short,
            "renewal_prepare_seconds": round(self.prepare_seconds, 2),
            "pickup_seconds": round(self.pickup_seconds, 3),
            "renewed": self.renewed,
            "storm_seconds": round(self.storm_seconds, 3),
            "storm_cut_short_by_budget": self.storm_cut_short,
            "storm_cut_short_by_proof_age": self.storm_cut_by_proof_age,
            "renewals_per_s": round(self.renew_rate, 1),
            "renewed_onto_new_root": self.on_new_root,
            "renew_errors": self.renew_errors,
            "retried_calls": self.retried,
            "first_error": self.first_error or None,
            "server_cpu_share_during_storm": round(self.server_cpu_share, 3),
            "zone_cpu_share_during_storm": round(self.zone_cpu_share, 3),
            "server_open_files_after": self.server_open_files,
        }


async def _bounded(
    count: int, concurrency: int, deadline: float, op: Callable[[int], Awaitable[None]]
) -> bool:
    """Call `op(i)` for i < count, at most `concurrency` at a time, starting none after
    `deadline` (time.monotonic()). True if every call was started."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            await op(index)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return next_index >= count


class Ticker:
    """A progress line every REPORT_EVERY seconds."""

    def __init__(self, what: str, total: int) -> None:
        self.what = what
        self.total = total
        self.began = self.last = time.monotonic()
        self.last_done = 0

    def tick(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= REPORT_EVERY:
            rate = (done - self.last_done) / (now - self.last)
            progress(f"B4: {self.what} {done}/{self.total} clients ({rate:.0f}/s lately)")
            self.last, self.last_done = now, done


def _body(signed: trust_state_pb2.SignedTrustState) -> trust_state_pb2.TrustStateBody:
    return trust_state_pb2.TrustStateBody.FromString(signed.body)


async def _storm(
    work: Path, clients: list[ClientKeys], ctx: Context, result: StormResult, deadline: float
) -> None:
    """Deploy a server and a zone, enroll `clients` through the zone, rotate, renew."""
    started: list[LoggedProcess] = []
    try:
        server = ServerProcess(work / "server", *ctx.settings.serve_args)
        started.append(server)
        with server.admin() as admin:
            zone_token = admin.create_enrollment_token(role="zone-server").token
            (work / "bundle0.dat").write_bytes(admin.get_init_bundle().SerializeToString())
            zone = ZoneProcess(
                work / "zone", work / "bundle0.dat", zone_token, *ctx.settings.zone_args
            )
            started.append(zone)
            # The bundle again, now naming the zone server.
            bundle = load_bundle(admin.get_init_bundle().SerializeToString())
            endpoint = bundle.enrollment_endpoint()
            if not endpoint.zone:
                raise RuntimeError("the init bundle does not name the zone server")
            token = admin.create_enrollment_token(
                uses=min(len(clients), 1_000_000), ttl_seconds=86400
            ).token
        roots_pem = bundle.roots_pem()
        creds = grpc.ssl_channel_credentials(root_certificates=roots_pem)
        boot = [
            grpc.aio.secure_channel(endpoint.bootstrap_listen, creds, options=CHANNEL_OPTIONS)
            for _ in range(ENROLL_CHANNELS)
        ]
        try:
            chains = await _enroll(boot, token, clients, result, deadline)
            if not result.enrolled:
                raise RuntimeError(f"no client enrolled: {result.first_error}")
            enrolled = [i for i, chain in enumerate(chains) if chain]
            renewals, proof_time = await _prepare(
                [clients[i] for i in enrolled], [chains[i] for i in enrolled], endpoint.name, result
            )
            await _rotate_and_renew(
                server,
                zone,
                endpoint.listen,
                boot,
                roots_pem,
                [clients[i] for i in enrolled],
                [chains[i] for i in enrolled],
                renewals,
                proof_time,
                ctx,
                result,
                deadline,
            )
        except Exception as exc:
            raise RuntimeError(f"{exc} [{server.diagnosis()}]") from exc
        finally:
            for channel in boot:
                await channel.close()
        result.server_open_files = len(list(Path(f"/proc/{server.pid}/fd").iterdir()))
    finally:
        stop_all(started)


async def _enroll(
    boot: list[grpc.aio.Channel],
    token: str,
    clients: list[ClientKeys],
    result: StormResult,
    deadline: float,
) -> list[bytes]:
    """Enroll every client through the zone's bootstrap listener until half the budget."""
    n = len(clients)
    chains: list[bytes] = [b""] * n
    stubs = [enrollment_service_pb2_grpc.EnrollmentServiceStub(c) for c in boot]
    ticker = Ticker("enrolled", n)

    async def enroll(i: int) -> None:
        request = enrollment_service_pb2.EnrollRequest(csr=clients[i].csr_pem, token=token)
        try:
            response = await stubs[i % len(stubs)].Enroll(request, timeout=120)
        except grpc.aio.AioRpcError as exc:
            result.enroll_errors += 1
            result.first_error = result.first_error or f"enroll: {exc.code().name}: {exc.details()}"
            return
        chains[i] = response.certificate.certificate_chain_pem.encode()
        result.enrolled += 1
        ticker.tick(result.enrolled)

    began = time.perf_counter()
    enroll_deadline = time.monotonic() + (deadline - time.monotonic()) / 2
    result.enroll_cut_short = not await _bounded(n, ENROLL_CONCURRENCY, enroll_deadline, enroll)
    result.enroll_seconds = time.perf_counter() - began
    progress(
        f"B4: enrolled {result.enrolled} clients in {result.enroll_seconds:.1f} s "
        f"({result.enrolled / result.enroll_seconds:.0f}/s, {result.enroll_errors} errors"
        f"{', stopped by the budget' if result.enroll_cut_short else ''})"
    )
    return chains


async def _prepare(
    clients: list[ClientKeys], chains: list[bytes], zone_name: str, result: StormResult
) -> tuple[list[Renewal], int]:
    """Each enrolled client's renewal, made now that it holds a certificate: a CSR for a
    new key and, for RenewWithProof, the current key's v2 proof over it for the zone
    (audience: its name in the init bundle), all dated now; on every core, off the loop.
    Returns them and the proofs' time (0 for mtls)."""
    proof = renew_mode() == "proof"
    proof_time = int(time.time()) if proof else 0
    progress(
        f"B4: making {len(clients)} renewal keys and CSRs"
        + (f" with proofs for the zone {zone_name!r}" if proof else "")
    )
    began = time.perf_counter()
    renewals = await asyncio.to_thread(
        make_renewals, clients, chains, zone_name if proof else "", proof_time
    )
    result.prepare_seconds = time.perf_counter() - began
    progress(f"B4: renewals made in {result.prepare_seconds:.1f} s")
    return renewals, proof_time


async def _rotate_and_renew(
    server: ServerProcess,
    zone: ZoneProcess,
    zone_listen: str,
    boot: list[grpc.aio.Channel],
    roots_pem: bytes,
    clients: list[ClientKeys],
    chains: list[bytes],
    renewals: list[Renewal],
    proof_time: int,
    ctx: Context,
    result: StormResult,
    deadline: float,
) -> None:
    """Rotate the root, then every client (enrolled, with its chain and renewal) renews."""
    trust_stub = trust_state_service_pb2_grpc.TrustStateServiceStub(boot[0])
    current = await trust_stub.GetTrustState(
        trust_state_service_pb2.GetTrustStateRequest(since_version=0)
    )
    watch = trust_stub.WatchTrustState(
        trust_state_service_pb2.WatchTrustStateRequest(
            since_version=_body(current.versions[-1]).version
        )
    )

    def create_root() -> Any:
        with server.admin() as admin:
            return admin.create_root_key()

    # Let the zone's report loop drain the enrollments before the clock starts.
    await asyncio.sleep(2.0)
    server_pids, zone_pids = server.pids(), zone.pids()
    t0 = time.perf_counter()
    root = await asyncio.to_thread(create_root)
    new_root = x509.load_pem_x509_certificate(root.certificate_pem.encode())
    async for response in watch:
        if any(
            r.fingerprint == root.fingerprint for s in response.versions for r in _body(s).roots
        ):
            break
    watch.cancel()
    t_zone = time.perf_counter()
    result.pickup_seconds = t_zone - t0
    progress(f"B4: the zone relays the new root {result.pickup_seconds:.2f} s after CreateRootKey")
    all_roots = roots_pem + root.certificate_pem.encode()
    renewed: list[bytes] = []
    cpu_server, cpu_zone = cpu_seconds(server_pids), cpu_seconds(zone_pids)
    ticker = Ticker("renewed", len(clients))

    proof_stubs = [enrollment_service_pb2_grpc.EnrollmentServiceStub(c) for c in boot]

    async def with_retries(call: Callable[[], Awaitable[Any]]) -> None:
        """One client's renewal: retried on UNAVAILABLE, counted once either way."""
        for attempt in range(RETRIES):
            try:
                response = await call()
            except grpc.aio.AioRpcError as exc:
                error = f"renew: {exc.code().name}: {exc.details()}"
                result.first_error = result.first_error or error
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == RETRIES - 1:
                    result.renew_errors += 1
                    return
                result.retried += 1
                continue
            renewed.append(response.certificate.certificate_chain_pem.encode())
            ticker.tick(len(renewed))
            return

    async def renew_with_proof(k: int) -> None:
        request = enrollment_service_pb2.RenewWithProofRequest(
            csr=renewals[k].csr_pem,
            certificate_chain_pem=chains[k].decode(),
            proof=renewals[k].proof,
            proof_time=renewals[k].proof_time,
        )
        stub = proof_stubs[k % len(proof_stubs)]
        await with_retries(lambda: stub.RenewWithProof(request, timeout=120))

    async def renew(k: int) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=all_roots, private_key=clients[k].key_pem, certificate_chain=chains[k]
        )
        request = enrollment_service_pb2.RenewRequest(csr=renewals[k].csr_pem)

        async def over_a_new_connection() -> Any:
            channel = grpc.aio.secure_channel(zone_listen, creds, options=CHANNEL_OPTIONS)
            try:
                stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(channel)
                return await stub.Renew(request, timeout=120)
            finally:
                await channel.close()

        await with_retries(over_a_new_connection)

    storm_deadline = max(deadline, time.monotonic() + MIN_STORM_SECONDS)
    if proof_time:  # no proof is sent stale
        fresh_until = time.monotonic() + proof_time + PROOF_FRESH_SECONDS - time.time()
        if fresh_until < storm_deadline:
            storm_deadline = fresh_until
            result.storm_cut_by_proof_age = True
    with profiled("b4-zone", zone.pid), profiled("b4-server", server.pid):
        finished = await _bounded(
            len(clients),
            ctx.settings.b4_concurrency,
            storm_deadline,
            renew if renew_mode() == "mtls" else renew_with_proof,
        )
    storm = time.perf_counter() - t_zone
    result.storm_seconds = storm
    result.storm_cut_short = not finished
    result.storm_cut_by_proof_age &= not finished
    result.renewed = len(renewed)
    result.server_cpu_share = (cpu_seconds(server_pids) - cpu_server) / storm
    result.zone_cpu_share = (cpu_seconds(zone_pids) - cpu_zone) / storm
    result.on_new_root = _on_new_root(renewed, new_root)
    progress(
        f"B4: {result.renewed} renewals in {storm:.1f} s ({result.renew_rate:.0f}/s), "
        f"{result.on_new_root} on the new root, {result.renew_errors} errors"
        f"{', stopped by the budget' if result.storm_cut_short else ''}"
        f"{' (the proofs would have grown stale)' if result.storm_cut_by_proof_age else ''}"
    )


def renew_mode() -> str:
    """How the clients renew (BENCH_B4_RENEW): "proof" (default) sends RenewWithProof, the
    certificate and a proof by its key, over a few shared connections to the zone's
    bootstrap listener, as clients that already hold a connection do; "mtls" sends Renew
    over a new mutual-TLS connection per client, a full handshake each (the worst case:
    every client reconnecting at once)."""
    mode = os.environ.get("BENCH_B4_RENEW", "proof")
    if mode not in ("proof", "mtls"):
        raise ValueError(f"BENCH_B4_RENEW is 'proof' or 'mtls', not {mode!r}")
    return mode


def _on_new_root(chains: list[bytes], root: x509.Certificate) -> int:
    """How many renewed chains have an intermediate the new root issued."""
    verdicts: dict[bytes, bool] = {}
    count = 0
    marker = b"-----BEGIN CERTIFICATE-----"
    for chain in chains:
        cut = chain.find(marker, len(marker))
        intermediate = chain[cut:] if cut > 0 else b""
        if intermediate not in verdicts:
            try:
                cert = x509.load_pem_x509_certificates(intermediate)[0]
                cert.verify_directly_issued_by(root)
                verdicts[intermediate] = True
            except Exception:
                verdicts[intermediate] = False
        count += verdicts[intermediate]
    return count


def run(ctx: Context) -> RowResult:
    settings = ctx.settings
    row = RowResult("B4", "re-enrollment storm through a zone")
    wanted = min(settings.b4_clients, 1_000_000)
    budget = settings.b4_budget
    deadline = time.monotonic() + budget
    result = StormResult(wanted)
    progress(f"B4: generating {wanted} clients (a P-256 key and CSR each)")
    began = time.perf_counter()
    clients = make_clients("bench-b4", wanted, with_key=True)
    result.keygen_seconds = time.perf_counter() - began
    asyncio.run(_storm(ctx.scratch("b4"), clients, ctx, result, deadline))
    if not result.renewed:
        raise RuntimeError(f"no client renewed: {result.first_error}")
    extrapolated = result.renewed < wanted
    total = result.pickup_seconds + (
        wanted / result.renew_rate if extrapolated else result.storm_seconds
    )
    ceiling_rate = median(b1.issue_ceiling(ctx, [c.csr_pem for c in clients[:512]]))
    label = f"total time N={wanted}"
    if extrapolated:
        label += f" (EXTRAPOLATED from N={result.renewed})"
    failed = result.enroll_errors + result.renew_errors
    stale = (
        "; the storm stopped before the renewal proofs (made after enrollment) grew stale"
        if result.storm_cut_by_proof_age
        else ""
    )
    row.metrics.append(
        Metric(
            label,
            "s",
            total,
            wanted / ceiling_rate,
            "ceiling",
            target=f"<= {TARGET_SECONDS:.0f} s",
            met=total <= TARGET_SECONDS and not failed,
            note="reference: N certificates at the in-process issue ceiling"
            + (f"; {failed} calls failed, first: {result.first_error}" if failed else "")
            + stale,
        )
    )
    row.metrics.append(
        Metric(
            f"renewals/s c={settings.b4_concurrency}",
            "/s",
            result.renew_rate,
            ceiling_rate,
            "ceiling",
        )
    )
    row.metrics.append(
        Metric(
            "enrollments/s through the zone",
            "/s",
            result.enrolled / result.enroll_seconds if result.enroll_seconds else 0.0,
            ceiling_rate,
            "ceiling",
        )
    )
    row.details.update(
        {
            "clients_wanted": wanted,
            "clients_measured": result.renewed,
            "extrapolated": extrapolated,
            "budget_seconds": budget,
            "total_seconds": round(total, 3),
            "measured": result.summary(),
            "concurrency": settings.b4_concurrency,
            "renew": renew_mode(),
            "zone_args": list(settings.zone_args),
            "issue_ceiling_per_s": round(ceiling_rate, 1),
        }
    )
    return row
