"""Files a server writes for its operators: the admin credential and the endpoint note.

The admin credential is a client certificate with the admin role and its key, in one
file (`admin.pem`, 0600) so that they are replaced together, plus the active roots
(`ca.pem`), in `<data dir>/admin/`, where the CLI finds them. Files are replaced
atomically so a reader never sees half a credential; every one is 0600, like the rest of
the data dir.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

CREDENTIAL_FILE = "admin.pem"
CA_FILE = "ca.pem"
ENDPOINT_FILE = "endpoint.json"


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` through a temporary file, fsync, and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class AdminCredentialDir:
    """`<data dir>/admin`: what the CLI needs to call this server as an admin."""

    path: Path

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)

    def current_certificate(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate((self.path / CREDENTIAL_FILE).read_bytes())
        except (OSError, ValueError):
            return None

    def write_credential(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.ensure()
        write_atomically(self.path / CREDENTIAL_FILE, cert_pem + key_pem, 0o600)

    def write_trust(self, roots_pem: bytes) -> None:
        self.ensure()
        write_atomically(self.path / CA_FILE, roots_pem)

    def write_endpoint(
        self,
        listen: str,
        bootstrap: str,
        server_name: str,
        crl_listen: str = "",
        console: str | None = None,
    ) -> None:
        self.ensure()
        note = {"listen": listen, "bootstrap_listen": bootstrap, "server_name": server_name}
        if crl_listen:
            note["crl_listen"] = crl_listen
        if console is not None:  # the admin console's address (serve --console-listen)
            note["console"] = console
        write_atomically(self.path / ENDPOINT_FILE, json.dumps(note, indent=2).encode())
