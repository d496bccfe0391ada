"""The `keyplane` command's entry point.

gRPC's C core reads GRPC_VERBOSITY and GRPC_TRACE once, as grpc loads, and then logs on
its own to stderr (lines like `I1201 … ssl_transport_security.cc`), past Python's
logging and through a JSON log. So before anything imports grpc, its verbosity defaults
to NONE here, unless the user set GRPC_VERBOSITY (or GRPC_TRACE, which then gets DEBUG
so that the traces asked for show): `GRPC_VERBOSITY=INFO keyplane serve` brings the C
core's lines back.
"""

from __future__ import annotations

import os


def quiet_grpc_core(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Default GRPC_VERBOSITY to NONE (DEBUG with GRPC_TRACE set), unless it is set."""
    if "GRPC_VERBOSITY" not in environ:
        environ["GRPC_VERBOSITY"] = "DEBUG" if environ.get("GRPC_TRACE") else "NONE"


def main() -> int:
    quiet_grpc_core()
    from keyplane.clients.cli import main as cli_main  # imports grpc: after the default

    return cli_main()
