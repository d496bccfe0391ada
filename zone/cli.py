"""`keyplane zone serve`: registered into the keyplane CLI by entry point."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

from keyplane.clients.bundle import BundleError
from keyplane.clients.client import KeyplaneClientError
from keyplane.plugins.errors import BackendError
from keyplane.server.config import parse_address
from keyplane.server.datadir import private_umask
from keyplane.server.domain.sightings import SIGHTINGS_SECONDS
from keyplane.server.errors import ConfigError, StartRefused
from keyplane.server.logs import LOG_FORMATS, configure_logging
from keyplane.server.metrics import prepare_worker_metrics, worker_exited
from keyplane.server.sdnotify import SystemdNotifier
from keyplane.server.supervisor import serve_as_worker, supervise
from keyplane.server.vitals import EXIT_REVOKED, EXIT_VITAL_PART_DIED
from keyplane.zone.runtime import ZoneError, ZoneOptions, ZoneRevoked, ZoneServer

ZONE_HELP = """\
Run a zone server. The first start enrolls with the server named in the init bundle
(--bundle, --token of role zone-server): the zone server makes its intermediate key
here (the private key never leaves it) and the server's root certifies it. Then it
enrolls and renews its own clients locally, relays the trust state to them, reports
the certificates it issues, and renews its intermediate when the server's newest root
changes. Later starts reuse the data dir and need neither --bundle nor --token.
--metrics-listen adds Prometheus text on plain HTTP (GET /metrics; off by default).
Under systemd (Type=notify) it says READY=1, WATCHDOG=1 and STOPPING=1; exit status 2
means it refused to start, 3 that its server revoked it (neither is worth a restart).

example:
  keyplane zone serve --data-dir /var/lib/keyplane-zone --name zone1 \\
      --bundle keyplane-init.dat --token "$(keyplane tokens create --role zone-server)"
"""


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    zone = commands.add_parser("zone", help="run a zone server (a relay close to clients)")
    verbs = zone.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "serve",
        help="run a zone server",
        description=ZONE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, required=True, help="the zone server's data dir")
    p.add_argument("--bundle", type=Path, help="init bundle (first start)")
    p.add_argument("--token", help="enrollment token of role zone-server (first start)")
    p.add_argument("--fingerprint", help="expected root fingerprint; a mismatch stops it")
    p.add_argument("--name", default="zone", help="the zone server's name (default zone)")
    p.add_argument("--listen", default="127.0.0.1:0", help="mutual-TLS listener HOST:PORT")
    p.add_argument(
        "--bootstrap-listen",
        default="127.0.0.1:0",
        help="bootstrap listener HOST:PORT (0: a free port, kept across restarts)",
    )
    p.add_argument(
        "--crl-listen",
        metavar="HOST:PORT",
        help="serve the CRL of the zone's intermediate over plain HTTP here (default: not "
        "served), e.g. 0.0.0.0:8080; the server serves it too, under PKICRLBaseURL",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="TOML with [backends.*], intermediate_backend (default software) and "
        "sightings_seconds (how often the agents seen are reported; default 30)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="serving processes sharing the ports (SO_REUSEPORT) over one zone.db, under a "
        "supervisor that restarts any that dies: the first renews the intermediate and "
        "reports, all issue. Without it, one process serves and exits with status 70 if "
        "a part it needs stops (for systemd to restart it)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on plain HTTP here, GET /metrics (default off)",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default) or json: one JSON object per line",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("KEYPLANE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (default: $KEYPLANE_LOG_LEVEL, else INFO)",
    )
    p.set_defaults(func=run_zone)


def run_zone(args: argparse.Namespace) -> int:
    private_umask()  # before any file is created: files 0600, directories 0700
    notifier = SystemdNotifier()  # read once, here: the workers do not notify
    configure_logging(args.log_level, args.log_format)
    backends: dict[str, dict[str, object]] = {"software": {}}
    backend = "software"
    dies_after = None
    check_seconds = 10.0
    sightings_seconds = SIGHTINGS_SECONDS
    if args.config:
        try:
            raw = tomllib.loads(args.config.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            print(f"keyplane zone serve: cannot read {args.config}: {exc}", file=sys.stderr)
            return 2
        backends.update({k: dict(v) for k, v in raw.get("backends", {}).items()})
        backend = str(raw.get("intermediate_backend", "software"))
        check_seconds = raw.get("backend_check_seconds", check_seconds)
        if not isinstance(check_seconds, int | float) or check_seconds <= 0:
            print(
                "keyplane zone serve: backend_check_seconds must be a positive number",
                file=sys.stderr,
            )
            return 2
        dies_after = raw.get("testing", {}).get("report_writer_dies_after")
        sightings_seconds = raw.get("sightings_seconds", SIGHTINGS_SECONDS)
        if not isinstance(sightings_seconds, int | float) or sightings_seconds <= 0:
            print(
                "keyplane zone serve: sightings_seconds must be a positive number",
                file=sys.stderr,
            )
            return 2
        if dies_after is not None and (not isinstance(dies_after, int) or dies_after < 0):
            print(
                "keyplane zone serve: [testing] report_writer_dies_after must be a whole number",
                file=sys.stderr,
            )
            return 2
    if args.workers is not None and not 1 <= args.workers <= 64:
        print("keyplane zone serve: --workers must be between 1 and 64", file=sys.stderr)
        return 2
    options = ZoneOptions(
        args.data_dir,
        args.name,
        args.listen,
        args.bootstrap_listen,
        backend,
        backends,
        crl_listen=args.crl_listen or "",
        sightings_seconds=float(sightings_seconds),
        report_writer_dies_after=dies_after,
        metrics_listen=args.metrics_listen or "",
        backend_check_seconds=float(check_seconds),
    )
    try:
        # This process owns the ports, claimed before the data dir is opened (its
        # workers bind beside the claim): see server/ports.py.
        zone = ZoneServer(options, own_ports=True)
    except StartRefused as exc:
        print(f"keyplane zone serve: refused to start: {exc}", file=sys.stderr)
        return 2
    except (BackendError, ConfigError, OSError) as exc:
        print(f"keyplane zone serve: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        return _run_prepared(zone, options, args, notifier)
    finally:
        if zone.ports is not None:
            zone.ports.close()


def _run_prepared(
    zone: ZoneServer, options: ZoneOptions, args: argparse.Namespace, notifier: SystemdNotifier
) -> int:
    """Enroll (first start) and serve, alone or with --workers."""
    try:
        bundle = args.bundle.read_bytes() if args.bundle else None
        zone.prepare(bundle, args.fingerprint, args.token)
        if args.workers is not None:
            zone.close()  # enrolled and up to date: the workers take it from here
            return _supervise(zone, options, args, notifier)
    except ZoneRevoked as exc:
        print(f"keyplane zone serve: {exc}", file=sys.stderr)
        return EXIT_REVOKED
    except (ZoneError, BundleError, BackendError, ConfigError, OSError) as exc:
        print(f"keyplane zone serve: cannot start: {exc}", file=sys.stderr)
        return 2
    except KeyplaneClientError as exc:
        print(
            f"keyplane zone serve: cannot enroll: {exc.code.name}: {exc.message}", file=sys.stderr
        )
        return 1
    try:
        return asyncio.run(_serve(zone, notifier))
    except StartRefused as exc:
        print(f"keyplane zone serve: refused to start: {exc}", file=sys.stderr)
        return 2


async def _serve(zone: ZoneServer, notifier: SystemdNotifier) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await zone.start()
    print(f"zone server {zone.options.name} listening on {zone.listen} (mutual TLS)", flush=True)
    print(f"bootstrap listener on {zone.bootstrap} (server TLS)", flush=True)
    if zone.crl_listen:
        print(f"CRLs on http://{zone.crl_listen}/crl/", flush=True)
    if zone.metrics_listen:
        print(f"metrics on http://{zone.metrics_listen}/metrics", flush=True)
    notifier.ready(f"zone server {zone.options.name} serving on {zone.listen}")
    signalled = asyncio.create_task(stopping.wait())
    served = asyncio.create_task(zone.wait())
    watchdog = asyncio.create_task(_watchdog(zone, notifier))
    await asyncio.wait([signalled, served], return_when=asyncio.FIRST_COMPLETED)
    notifier.stopping()
    signalled.cancel()
    served.cancel()
    watchdog.cancel()
    await zone.stop()
    if zone.revoked_because is not None:
        return EXIT_REVOKED  # starting it again is no use: it must enroll again
    # A part the zone needs died: exit non-zero so that it is started again.
    return EXIT_VITAL_PART_DIED if zone.vital_part_died is not None else 0


async def _watchdog(zone: ZoneServer, notifier: SystemdNotifier) -> None:
    """WATCHDOG=1 from the serving loop while no part the zone needs has stopped."""
    interval = notifier.ping_interval
    if interval is None:
        return
    while zone.vital_part_died is None:
        notifier.watchdog()
        await asyncio.sleep(interval)


def _supervise(
    prepared: ZoneServer, options: ZoneOptions, args: argparse.Namespace, notifier: SystemdNotifier
) -> int:
    """Run `args.workers` serving processes on the ports `prepared` chose and restart any
    that dies; SIGTERM or SIGINT stops them all."""
    options = replace(
        options,
        listen=prepared.listen,
        bootstrap_listen=prepared.bootstrap,
        crl_listen=prepared.crl_listen,
        metrics_listen=prepared.metrics_listen,
    )
    metrics_dir = prepare_worker_metrics(options.data_dir) if options.metrics_listen else None

    def announce() -> None:
        print(
            f"zone server {options.name} listening on {prepared.listen} "
            f"(mutual TLS, {args.workers} workers)",
            flush=True,
        )
        print(f"bootstrap listener on {prepared.bootstrap} (server TLS)", flush=True)
        if options.metrics_listen:
            print(f"metrics on http://{options.metrics_listen}/metrics", flush=True)

    try:
        return supervise(
            _worker_main,
            (options, args.fingerprint, args.log_level, args.log_format),
            args.workers,
            lambda: _accepts(prepared.bootstrap),
            announce,
            "keyplane zone serve",
            notifier=notifier,
            on_exit=(lambda pid: worker_exited(metrics_dir, pid)) if metrics_dir else None,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _accepts(address: str) -> bool:
    host, port = parse_address(address, "--bootstrap-listen")
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=0.5):
            return True
    except OSError:
        return False


def _worker_main(
    options: ZoneOptions, fingerprint: str | None, log_level: str, log_format: str, index: int
) -> None:
    private_umask()
    configure_logging(log_level, log_format, worker=index)
    zone = ZoneServer(options, worker=index)
    try:
        zone.prepare(None, fingerprint, None)
    except ZoneRevoked as exc:
        print(f"keyplane zone serve: {exc}", file=sys.stderr)
        sys.exit(EXIT_REVOKED)
    asyncio.run(_serve_worker(zone))


async def _serve_worker(zone: ZoneServer) -> None:
    await zone.start()
    await serve_as_worker(zone.stop, zone.wait)
    if zone.revoked_because is not None:
        sys.exit(EXIT_REVOKED)  # the supervisor stops every worker
    if zone.vital_part_died is not None:
        sys.exit(EXIT_VITAL_PART_DIED)  # the supervisor starts a fresh worker
