"""Prometheus metrics of a serving process (a server or a zone server), and what a
scrape reads.

Counts are kept where things happen (the interceptor, the key-backend facade, the
domain) in one `Metrics` object per process, each with its own registry (no global
one). With `--workers N` every worker writes them to files of its own in
`<data dir>/metrics` (prometheus_client's multiprocess mode: the supervisor empties the
directory at each start and names it in PROMETHEUS_MULTIPROC_DIR before any worker
starts), and a scrape, answered by whichever worker the kernel hands it to, adds up the
files of every worker of the run, those of workers that died included: a restarted
worker writes new files (they are named by process id), so no count is lost or counted
twice. A process serving alone keeps its counts in memory.

What the state says (the trust-state version, each active key's not-after) is read from
it at scrape time rather than counted, so every worker answers the same.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR = "metrics"
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# Calls take from well under a millisecond (a cached read) to seconds (a root on an HSM).
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
KEY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)


class RpcMetrics:
    """The series of one RPC method (looked up once per method, not per call)."""

    def __init__(self, metrics: Metrics, method: str, grpc_type: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        labels = (grpc_type, service, name)
        self._labels = labels
        self._handled = metrics.handled
        self._started = metrics.started.labels(*labels)
        self._seconds = metrics.handling_seconds.labels(*labels)
        self._by_code: dict[str, Counter] = {}

    def started(self) -> None:
        self._started.inc()

    def handled(self, code: str, seconds: float) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._handled.labels(*self._labels, code)
        counter.inc()
        self._seconds.observe(seconds)


class Metrics:
    """Every metric one serving process counts."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", GRPC_LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*GRPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "How long RPCs took to complete, until the status was sent.",
            GRPC_LABELS,
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.certificates_issued = Counter(
            "keyplane_certificates_issued",
            "Certificates issued and recorded, by the kind of key that signed them.",
            ("issuer_kind",),
            registry=registry,
        )
        self.key_operations = Counter(
            "keyplane_key_operations",
            "Private-key operations (generate, sign, destroy) per key backend.",
            ("backend", "operation", "outcome"),
            registry=registry,
        )
        self.key_operation_seconds = Histogram(
            "keyplane_key_operation_seconds",
            "How long private-key operations took, per key backend.",
            ("backend", "operation"),
            buckets=KEY_BUCKETS,
            registry=registry,
        )
        self.rotations = Counter(
            "keyplane_rotations",
            "Key rotations (a new key and certificate for a kind), done and failed.",
            ("kind", "outcome"),
            registry=registry,
        )
        self.watchers = Gauge(
            "keyplane_trust_state_watchers",
            "Components watching the trust state now (WatchTrustState streams).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.backend_up = Gauge(
            "keyplane_backend_up",
            "1 if the key backend answered its last health check (for pkcs11: the HSM), else 0.",
            ("backend",),
            registry=registry,
            multiprocess_mode="livemin",
        )
        self._rpcs: dict[tuple[str, str], RpcMetrics] = {}
        self._key_ops: dict[tuple[str, str, bool], tuple[Counter, Histogram]] = {}

    def rpc(self, method: str, grpc_type: str) -> RpcMetrics:
        found = self._rpcs.get((method, grpc_type))
        if found is None:
            found = self._rpcs[(method, grpc_type)] = RpcMetrics(self, method, grpc_type)
        return found

    def key_operation(self, backend: str, operation: str, seconds: float, ok: bool) -> None:
        """A key backend's operation (the facade tells of each, keyplane.plugins.manager)."""
        series = self._key_ops.get((backend, operation, ok))
        if series is None:
            series = self._key_ops[(backend, operation, ok)] = (
                self.key_operations.labels(backend, operation, "ok" if ok else "error"),
                self.key_operation_seconds.labels(backend, operation),
            )
        series[0].inc()
        series[1].observe(seconds)

    def issued(self, issuer_kind: str, count: int = 1) -> None:
        self.certificates_issued.labels(str(issuer_kind)).inc(count)

    def rotation(self, kind: str, ok: bool) -> None:
        self.rotations.labels(str(kind), "done" if ok else "failed").inc()


def status_code_name(code: object) -> str:
    """A status code (grpc.StatusCode, or the int that grpc's aio context may hold) by
    name, e.g. NOT_FOUND."""
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    for known in grpc.StatusCode:
        if known.value[0] == code:
            return str(known.name)
    return "UNKNOWN"


@dataclass(frozen=True)
class KeyExpiry:
    """An active key and when its certificate ends (Unix seconds)."""

    kind: str
    fingerprint: str
    not_after: float


@dataclass(frozen=True)
class LiveReading:
    """What a scrape reads from the process's state."""

    trust_state_version: int
    keys: Sequence[KeyExpiry]


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], LiveReading]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        try:
            reading = self._read()
        except Exception:  # a scrape still shows the counts
            log.exception("metrics: could not read the trust-state version and key expiries")
            return []
        version = GaugeMetricFamily(
            "keyplane_trust_state_version",
            "The newest trust-state version this process serves.",
            value=reading.trust_state_version,
        )
        not_after = GaugeMetricFamily(
            "keyplane_key_not_after_timestamp_seconds",
            "When each active key's certificate expires (Unix time), to alert on.",
            labels=("kind", "fingerprint"),
        )
        for key in reading.keys:
            not_after.add_metric((key.kind, key.fingerprint), key.not_after)
        return [version, not_after]


class Exposition:
    """The text a scrape gets: this run's counts (every worker's files, or this
    process's memory) and the live reading."""

    def __init__(self, metrics: Metrics, live: Callable[[], LiveReading]) -> None:
        self.registry = CollectorRegistry()
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory:
            MultiProcessCollector(self.registry, directory)  # type: ignore[no-untyped-call]
        else:
            self.registry.register(metrics.registry)
        self.registry.register(_LiveCollector(live))

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def prepare_worker_metrics(data_dir: Path) -> Path:
    """For `--workers` with metrics on: an empty `<data dir>/metrics` (0700), named in
    the environment the workers inherit, so that prometheus_client writes each one's
    counts there as it loads. Called by the supervisor before any worker starts."""
    path = (data_dir / METRICS_DIR).resolve()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    os.environ[MULTIPROCESS_ENV] = str(path)
    return path


def worker_exited(path: Path, pid: int) -> None:
    """A worker is gone: its live gauges (watchers, backend health) go with it; its
    counters stay in the run's totals."""
    try:
        mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.warning("metrics: could not drop the gauges of worker process %d: %s", pid, exc)
