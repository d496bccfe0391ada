"""`keyplane serve`: the server's command, registered into the keyplane CLI by entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

from keyplane.plugins.errors import BackendError
from keyplane.plugins.password import Password
from keyplane.server.app import KeyplaneServer
from keyplane.server.config import ServerConfig, load_config
from keyplane.server.console.site import console_url
from keyplane.server.datadir import private_umask
from keyplane.server.errors import ConfigError, StartRefused
from keyplane.server.locked import (
    StoppedWhileLocked,
    open_and_start,
    open_before_workers,
    password_for_workers,
    with_password_source,
)
from keyplane.server.logs import LOG_FORMATS, configure_logging
from keyplane.server.metrics import prepare_worker_metrics, worker_exited
from keyplane.server.ports import Listener, claim_ports
from keyplane.server.sdnotify import SystemdNotifier
from keyplane.server.supervisor import serve_as_worker, supervise
from keyplane.server.vitals import EXIT_VITAL_PART_DIED

log = logging.getLogger("keyplane.server")

SERVE_HELP = """\
Run a keyplane server. The first start initialises the data dir: the state DB
(keyplane.db), the software key store (pki.db), the first root key "<fqdn> Root 0",
the legacy root, a server TLS certificate, and an admin credential in
<data dir>/admin/ that the CLI uses by default. Later starts reuse all of it. Only an
empty data dir is initialised: one that holds part of a state (pki.db without
keyplane.db, say) is refused, and a port another process holds is refused too.

Two listeners serve the same API: --listen requires a client certificate from this
hierarchy (mutual TLS); --bootstrap-listen (default: the next port) is server-TLS only,
for health checks, reflection and what components need before they have a certificate.

With --crl-listen, a third listener serves the CRL of every CA of the hierarchy over
plain HTTP, for TLS stacks that are not keyplane's (nginx, Envoy, HAProxy, Java, openssl
-crl_download): GET /crl/<issuer fingerprint>.crl (DER) or .pem. Set the setting
PKICRLBaseURL to where that is reachable and every certificate issued from then on names
its issuer's CRL there (a CRL distribution point). keyplane's own components never need
it: the trust state tells them of a revocation first.

--metrics-listen adds Prometheus text on plain HTTP (GET /metrics; off by default).

Under systemd (Type=notify; packaging/systemd/) it says READY=1 once it serves,
WATCHDOG=1 while it is healthy and STOPPING=1 as it stops. Exit status 2: refused to
start (a bad option or data dir, a port taken), not worth restarting.

--console-listen adds the admin console (HTTPS with the server's certificate, off by
default): sign in with a one-time link from 'keyplane console login'.

example:
  keyplane serve --data-dir /var/lib/keyplane --listen 0.0.0.0:7443 \\
      --crl-listen 0.0.0.0:8080 --metrics-listen 127.0.0.1:9443 --log-format json \\
      --console-listen 127.0.0.1:7445
  keyplane settings set PKICRLBaseURL http://pki.example.org:8080
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "serve",
        help="run a keyplane server",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML config file (every option has a default)")
    parser.add_argument("--data-dir", type=Path, help="data directory (default ./var)")
    parser.add_argument("--listen", help="mutual-TLS listener HOST:PORT (default 127.0.0.1:7443)")
    parser.add_argument(
        "--bootstrap-listen", help="server-TLS bootstrap listener HOST:PORT (default: next port)"
    )
    parser.add_argument(
        "--console-listen",
        metavar="HOST:PORT",
        help="serve the admin console (HTTPS) here, e.g. 127.0.0.1:7445 (config: "
        "console_listen; default: no console). With --workers, worker 0 serves it",
    )
    parser.add_argument("--fqdn", help="the server's name, used in root names (default: host's)")
    parser.add_argument(
        "--crl-listen",
        metavar="HOST:PORT",
        help="serve CRLs over plain HTTP here (config: crl_listen; default: not served), "
        "e.g. 0.0.0.0:8080; every worker serves it from the same state DB",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="serving processes sharing the ports (SO_REUSEPORT) over one state DB, under a "
        "supervisor that restarts any that dies (config: workers). Without it, one process "
        "serves and exits with status 70 if a part it needs stops (for systemd to restart it)",
    )
    password = parser.add_mutually_exclusive_group()
    password.add_argument(
        "--password-file",
        type=Path,
        help="file holding the pki.db password, for unattended starts (config: "
        "[backends.software] password_file); a password change writes the new one here",
    )
    password.add_argument(
        "--password-env",
        metavar="VARIABLE",
        help="environment variable holding the pki.db password (config: password_env); "
        "the password cannot be changed while it comes from there. With neither (here or "
        "in the config), a password-protected server starts locked: run 'keyplane unlock'",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on plain HTTP here, GET /metrics (config: "
        "metrics_listen; default off). Listen on loopback or a management network",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text (default) or json: one JSON object per line (config: log_format). "
        "gRPC's own C-core lines stay out unless GRPC_VERBOSITY is set",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("KEYPLANE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (default: $KEYPLANE_LOG_LEVEL, else INFO)",
    )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    private_umask()  # before any file is created: files 0600, directories 0700
    notifier = SystemdNotifier()  # read once, here: the workers do not notify
    configure_logging(args.log_level, args.log_format or "text")
    try:
        config = load_config(
            args.config,
            data_dir=args.data_dir,
            listen=args.listen,
            bootstrap_listen=args.bootstrap_listen,
            crl_listen=args.crl_listen,
            console_listen=args.console_listen,
            fqdn=args.fqdn,
            metrics_listen=args.metrics_listen,
            log_format=args.log_format,
        )
        config = with_password_source(config, args.password_file, args.password_env)
    except ConfigError as exc:
        print(f"keyplane serve: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, config.log_format)
    # --workers N (or `workers` in the config), 1 included: N processes under a
    # supervisor that restarts any that dies. Neither: this process serves alone.
    workers = args.workers if args.workers is not None else config.workers
    if workers is not None and not 1 <= workers <= 64:
        print("keyplane serve: --workers must be between 1 and 64", file=sys.stderr)
        return 2
    try:
        # This process owns the ports (its workers bind beside its claim) for its life,
        # claimed before the data dir is opened: see server/ports.py.
        listeners = [
            Listener("--listen", *config.listen_address),
            Listener("--bootstrap-listen", *config.bootstrap_address),
        ]
        if config.crl_address is not None:
            listeners.append(Listener("--crl-listen", *config.crl_address))
        if config.metrics_address is not None:
            listeners.append(Listener("--metrics-listen", *config.metrics_address))
        if config.console_address is not None:
            listeners.append(Listener("--console-listen", *config.console_address))
        with claim_ports(listeners) as claims:
            listen, bootstrap, *extra = claims.addresses
            claimed = iter(extra)
            crl_listen = next(claimed) if config.crl_address is not None else ""
            metrics_listen = next(claimed) if config.metrics_address is not None else ""
            console_listen = next(claimed) if config.console_address is not None else ""
            config = replace(
                config,
                listen=listen,
                bootstrap_listen=bootstrap,
                crl_listen=crl_listen,
                metrics_listen=metrics_listen,
                console_listen=console_listen,
            )
            if workers is None:
                return asyncio.run(_serve(KeyplaneServer(config), notifier))
            return _supervise(config, args, workers, notifier)
    except StartRefused as exc:
        print(f"keyplane serve: refused to start: {exc}", file=sys.stderr)
        return 2
    except (BackendError, ConfigError) as exc:
        print(f"keyplane serve: cannot start: {exc}", file=sys.stderr)
        return 1


def _supervise(
    config: ServerConfig, args: argparse.Namespace, workers: int, notifier: SystemdNotifier
) -> int:
    """Initialise once here, then run `workers` serving processes on the same ports and
    restart any that dies; SIGTERM or SIGINT stops them all."""
    listen, bootstrap = config.listen, config.bootstrap_listen
    first = KeyplaneServer(config)
    try:
        # Locked (a password pki.db, no password given): no worker starts until unlocked.
        password = open_before_workers(first, (listen, bootstrap), notifier)
        password = password or password_for_workers(config)
    except StoppedWhileLocked:
        return 0
    assert first.report is not None  # noqa: S101 - opened
    report = first.report
    first.close()
    if report.created:
        print(f"initialised {config.data_dir}: created {', '.join(report.created)}")
    worker_args = (
        args.config,
        str(config.data_dir),
        listen,
        bootstrap,
        config.crl_listen,
        config.console_listen,
        config.fqdn,
        args.log_level,
        args.password_file,
        args.password_env,
        password,  # through multiprocessing's pipe: never in a worker's argv or environment
        config.metrics_listen,
        config.log_format,
    )
    metrics_dir = prepare_worker_metrics(config.data_dir) if config.metrics_listen else None
    endpoint = config.data_dir / "admin" / "endpoint.json"
    endpoint.unlink(missing_ok=True)  # worker 0 writes it once it serves

    def announce() -> None:
        root = report.issuing_root
        print(f"keyplane server listening on {listen} (mutual TLS, {workers} workers)", flush=True)
        print(f"bootstrap listener on {bootstrap} (server TLS)", flush=True)
        if config.crl_listen:
            print(f"CRLs on http://{config.crl_listen}/crl/ (every worker)", flush=True)
        print(f"issuing root: {root.name} sha256:{root.fingerprint}", flush=True)
        print(f"admin credential: {config.data_dir / 'admin'}", flush=True)
        if config.console_address is not None:
            host, port = config.console_address
            print(f"admin console: {console_url(host, port, config.fqdn)}/ (worker 0)", flush=True)
        print(next_steps(config.data_dir), flush=True)
        if config.metrics_listen:
            print(f"metrics on http://{config.metrics_listen}/metrics", flush=True)

    try:
        return supervise(
            _worker_main,
            worker_args,
            workers,
            endpoint.exists,
            announce,
            "keyplane serve",
            notifier=notifier,
            on_exit=(lambda pid: worker_exited(metrics_dir, pid)) if metrics_dir else None,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def next_steps(data_dir: Path) -> str:
    """What to run next, for whoever just started a server."""
    credentials = "" if data_dir == Path("var") else f" --credentials {data_dir / 'admin'}"
    activate = ". .venv/bin/activate && " if Path(".venv/bin/activate").exists() else ""
    return (
        f"next, in another shell: {activate}keyplane{credentials} roots list "
        "(keyplane --help lists the commands; the README has a five-minute tour)"
    )


def _worker_main(
    config_path: Path | None,
    data_dir: str,
    listen: str,
    bootstrap: str,
    crl_listen: str,
    console_listen: str,
    fqdn: str,
    log_level: str,
    password_file: Path | None,
    password_env: str | None,
    password: Password | None,
    metrics_listen: str,
    log_format: str,
    index: int,
) -> None:
    private_umask()
    configure_logging(log_level, log_format, worker=index)
    config = load_config(
        config_path,
        data_dir=Path(data_dir),
        listen=listen,
        bootstrap_listen=bootstrap,
        crl_listen=crl_listen,
        fqdn=fqdn,
        metrics_listen=metrics_listen,
        log_format=log_format,
        console_listen=console_listen,
    )
    config = with_password_source(config, password_file, password_env)
    asyncio.run(_serve_worker(KeyplaneServer(config, worker=index), password))


async def _watchdog(server: KeyplaneServer, notifier: SystemdNotifier) -> None:
    """WATCHDOG=1 from the serving loop while no part the server needs has stopped:
    a hung loop, or a dead part, stops the pings and systemd restarts the server."""
    interval = notifier.ping_interval
    if interval is None:
        return
    while server.vital_part_died is None:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def _serve_worker(server: KeyplaneServer, password: Password | None) -> None:
    await asyncio.to_thread(server.open, password)
    await server.start()
    await serve_as_worker(lambda: server.stop(grace=5.0), server.wait)
    if server.vital_part_died is not None:
        sys.exit(EXIT_VITAL_PART_DIED)  # the supervisor starts a fresh worker


async def _serve(server: KeyplaneServer, notifier: SystemdNotifier) -> int:
    # Before anything starts: a SIGTERM that comes as soon as the endpoint note exists
    # stops the server cleanly instead of killing it.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    started = await open_and_start(server, stopping, notifier)
    if started is None:  # stopped while locked
        notifier.stopping()
        return 0
    endpoints = started
    assert server.report is not None  # noqa: S101 - opened
    report = server.report
    root = report.issuing_root
    if report.created:
        print(f"initialised {server.config.data_dir}: created {', '.join(report.created)}")
    print(f"keyplane server listening on {endpoints.listen} (mutual TLS)", flush=True)
    print(f"bootstrap listener on {endpoints.bootstrap_listen} (server TLS)", flush=True)
    if endpoints.crl_listen:
        print(f"CRLs on http://{endpoints.crl_listen}/crl/", flush=True)
    print(f"issuing root: {root.name} sha256:{root.fingerprint}", flush=True)
    print(f"admin credential: {server.config.data_dir / 'admin'}", flush=True)
    if server.console_url() is not None:
        print(
            f"admin console: {server.console_url()}/ (sign in: keyplane console login)", flush=True
        )
    print(next_steps(server.config.data_dir), flush=True)
    if endpoints.metrics_listen:
        print(f"metrics on http://{endpoints.metrics_listen}/metrics", flush=True)
    notifier.ready(f"serving on {endpoints.listen}")
    waiter = asyncio.create_task(server.wait())
    watchdog = asyncio.create_task(_watchdog(server, notifier))
    await asyncio.wait(
        [waiter, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    log.info("stopping")
    notifier.stopping()
    watchdog.cancel()
    await server.stop(grace=5.0)
    waiter.cancel()
    # A part the server needs died: exit non-zero so that systemd (or --workers' own
    # supervisor) starts it again.
    return EXIT_VITAL_PART_DIED if server.vital_part_died is not None else 0
