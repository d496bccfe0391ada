"""The agent's data dir: every file written atomically, the certificate set swapped as
one step through `.renewal/` (a start that finds a complete staged set finishes the move,
an incomplete one is dropped), and agent.json (its name and the server it enrolled with).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyplane.clients.agent.errors import AgentError
from keyplane.clients.agent.keys import Issued, _parse_iso, _public_der
from keyplane.v1 import bundle_service_pb2

AGENT_FILE = "agent.json"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
ROOTS_FILE = "roots.pem"
ISSUED_FILE = "issued.json"
TRUST_FILE = "trust.bin"
STATUS_FILE = "status.json"
STAGING_DIR = ".renewal"
STAGED_COMPLETE = "complete"
# The key and CSR of a renewal not yet saved (0600): reused until it is.
PENDING_FILE = "pending-renewal.json"
# The files of one certificate, swapped together; the key goes first.
CREDENTIAL_FILES = (KEY_FILE, CERT_FILE, ROOTS_FILE, ISSUED_FILE)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temp file beside `path`, fsync it, and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def endpoint_json(endpoint: bundle_service_pb2.ServerEndpoint) -> dict[str, Any]:
    return {
        "name": endpoint.name,
        "listen": endpoint.listen,
        "bootstrap_listen": endpoint.bootstrap_listen,
        "zone": endpoint.zone,
        "peer": endpoint.peer,
    }


def _endpoint_from_json(data: dict[str, Any]) -> bundle_service_pb2.ServerEndpoint:
    return bundle_service_pb2.ServerEndpoint(
        name=str(data["name"]),
        listen=str(data["listen"]),
        bootstrap_listen=str(data["bootstrap_listen"]),
        zone=bool(data.get("zone", False)),
    )


def finish_staged_swap(directory: Path) -> bool:
    """Move a complete staged certificate into place; drop an incomplete one."""
    staging = directory / STAGING_DIR
    if not staging.is_dir():
        return False
    if not (staging / STAGED_COMPLETE).exists():
        shutil.rmtree(staging)  # never committed: the current certificate stays
        return False
    for name in CREDENTIAL_FILES:
        if (staging / name).exists():
            os.replace(staging / name, directory / name)
    _fsync_dir(directory)
    (staging / STAGED_COMPLETE).unlink()
    staging.rmdir()
    _fsync_dir(directory)
    return True


def save_issued(directory: Path, issued: Issued) -> None:
    """Replace the certificate set (key, chain, roots, schedule) as one step."""
    staging = directory / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700)
    write_atomic(staging / KEY_FILE, issued.key_pem, 0o600)
    write_atomic(staging / CERT_FILE, issued.chain_pem)
    write_atomic(staging / ROOTS_FILE, issued.roots_pem)
    write_atomic(staging / ISSUED_FILE, json.dumps(issued.issued_json(), indent=2).encode())
    write_atomic(staging / STAGED_COMPLETE, b"")
    finish_staged_swap(directory)


def load_issued(directory: Path) -> Issued | None:
    """The certificate set in `directory`, None if there is none; AgentError if damaged."""
    finish_staged_swap(directory)
    if not (directory / CERT_FILE).exists():
        return None
    try:
        key_pem = (directory / KEY_FILE).read_bytes()
        chain_pem = (directory / CERT_FILE).read_bytes()
        roots_pem = (directory / ROOTS_FILE).read_bytes()
        meta = json.loads((directory / ISSUED_FILE).read_text())
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        issued = Issued(
            key_pem=key_pem,
            chain_pem=chain_pem,
            roots_pem=roots_pem,
            serial=str(meta["serial"]),
            not_after=_parse_iso(meta["not_after"]),
            renew_after=_parse_iso(meta["renew_after"]),
            renewals=int(meta.get("renewals", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AgentError(
            f"the certificate in {directory} is damaged ({type(exc).__name__}); move the "
            "directory aside and enroll again with a new token"
        ) from None
    if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
        raise AgentError(
            f"{directory / KEY_FILE} is not the key of {directory / CERT_FILE}; move the "
            "directory aside and enroll again with a new token"
        )
    return issued


def _read_agent_json(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / AGENT_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AgentError(f"{directory / AGENT_FILE} is damaged ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise AgentError(f"{directory / AGENT_FILE} is damaged (not an object)")
    return data


def _write_agent_json(
    directory: Path, name: str, endpoint: bundle_service_pb2.ServerEndpoint | None
) -> None:
    data: dict[str, Any] = {"name": name}
    if endpoint is not None:
        data["endpoint"] = endpoint_json(endpoint)
    write_atomic(directory / AGENT_FILE, json.dumps(data, indent=2).encode())
