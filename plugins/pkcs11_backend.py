"""The `pkcs11` key backend (python-pkcs11): keys generated on an HSM token, never extractable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from keyplane.plugins.hookspecs import hookimpl
from keyplane.plugins.keys import KeyBackend

NAME = "pkcs11"


@hookimpl
def keyplane_backend_names() -> list[str]:
    return [NAME]


@hookimpl
def keyplane_open_backend(
    name: str, options: Mapping[str, object], data_dir: Path
) -> KeyBackend | None:
    if name != NAME:
        return None
    raise NotImplementedError("pkcs11 backend: being written")
