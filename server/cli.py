"""`keyplane serve`: the server's command, registered into the keyplane CLI by entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from keyplane.plugins.errors import BackendError
from keyplane.server.app import KeyplaneServer
from keyplane.server.config import load_config
from keyplane.server.errors import ConfigError

log = logging.getLogger("keyplane.server")

SERVE_HELP = """\
Run a keyplane server. The first start initialises the data dir: the state DB
(keyplane.db), the software key store (pki.db), the first root key "<fqdn> Root 0",
the legacy root, a server TLS certificate, and an admin credential in
<data dir>/admin/ that the CLI uses by default. Later starts reuse all of it.

Two listeners serve the same API: --listen requires a client certificate from this
hierarchy (mutual TLS); --bootstrap-listen (default: the next port) is server-TLS only,
for health checks, reflection and what components need before they have a certificate.
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
    parser.add_argument("--fqdn", help="the server's name, used in root names (default: host's)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(
            args.config,
            data_dir=args.data_dir,
            listen=args.listen,
            bootstrap_listen=args.bootstrap_listen,
            fqdn=args.fqdn,
        )
    except ConfigError as exc:
        print(f"keyplane serve: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(KeyplaneServer(config)))
    except (BackendError, ConfigError) as exc:
        print(f"keyplane serve: cannot start: {exc}", file=sys.stderr)
        return 1


async def _serve(server: KeyplaneServer) -> int:
    report = await asyncio.to_thread(server.open)
    endpoints = await server.start()
    root = report.issuing_root
    if report.created:
        print(f"initialised {server.config.data_dir}: created {', '.join(report.created)}")
    print(f"keyplane server listening on {endpoints.listen} (mutual TLS)", flush=True)
    print(f"bootstrap listener on {endpoints.bootstrap_listen} (server TLS)", flush=True)
    print(f"issuing root: {root.name} sha256:{root.fingerprint}", flush=True)
    print(f"admin credential: {server.config.data_dir / 'admin'}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    waiter = asyncio.create_task(server.wait())
    await asyncio.wait(
        [waiter, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    log.info("stopping")
    await server.stop(grace=5.0)
    waiter.cancel()
    return 0
