"""Finding a server and the credential to call it with.

Defaults: the local server's data dir `./var` (or $KEYPLANE_DATA_DIR); its admin
credential in `<data dir>/admin` (or $KEYPLANE_CREDENTIALS / --credentials); the
address the server wrote beside it (or $KEYPLANE_SERVER / --server).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

DEFAULT_DATA_DIR = Path("var")
DEFAULT_SERVER = "127.0.0.1:7443"
CREDENTIAL_FILE = "admin.pem"
CA_FILE = "ca.pem"
ENDPOINT_FILE = "endpoint.json"


# The start of a PEM private-key block (PKCS#8, EC or RSA), which follows the chain.
_KEY_BLOCK = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


class CredentialError(Exception):
    """The credential directory is missing or incomplete."""


@dataclass(frozen=True)
class Credential:
    """A client certificate chain and key (PEM), and the roots to trust the server by."""

    certificate_chain_pem: bytes
    private_key_pem: bytes
    root_certificates_pem: bytes
    directory: Path

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_chain_pem)


def default_credentials_dir() -> Path:
    if os.environ.get("KEYPLANE_CREDENTIALS"):
        return Path(os.environ["KEYPLANE_CREDENTIALS"])
    return Path(os.environ.get("KEYPLANE_DATA_DIR") or DEFAULT_DATA_DIR) / "admin"


def load_credential(directory: Path) -> Credential:
    """Read `admin.pem` (certificate then key) and `ca.pem` from `directory`."""
    try:
        combined = (directory / CREDENTIAL_FILE).read_bytes()
        roots = (directory / CA_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise CredentialError(
            f"no credential in {directory} ({Path(str(exc.filename)).name} is missing); start "
            "the server once to create its admin credential, or pass --credentials DIR"
        ) from None
    except PermissionError:
        raise CredentialError(
            f"cannot read the credential in {directory}: permission denied"
        ) from None
    key_block = _KEY_BLOCK.search(combined)
    if key_block is None:
        raise CredentialError(f"{directory / CREDENTIAL_FILE} holds no private key")
    cut = key_block.start()
    return Credential(combined[:cut], combined[cut:], roots, directory)


def default_server(credentials_dir: Path) -> str:
    """$KEYPLANE_SERVER, else the address the server noted beside its credential."""
    if os.environ.get("KEYPLANE_SERVER"):
        return os.environ["KEYPLANE_SERVER"]
    try:
        note = json.loads((credentials_dir / ENDPOINT_FILE).read_text())
        return str(note["listen"])
    except (OSError, ValueError, KeyError):
        return DEFAULT_SERVER
