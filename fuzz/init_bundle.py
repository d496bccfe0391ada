"""The init bundle (clients/bundle.py): any bytes as `keyplane-init.dat`, with and without
a pinned fingerprint, give a verified Bundle or BundleError, never another exception."""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["keyplane"]):
    from keyplane.clients.bundle import BundleError, load_bundle

from fuzz.harness import run

PIN = "sha256:" + "ab" * 32


def test_one_input(data: bytes) -> None:
    for fingerprint in (None, PIN):
        try:
            bundle = load_bundle(data, fingerprint)
        except BundleError:
            continue
        try:
            bundle.enrollment_endpoint()
            bundle.server()
        except BundleError:
            pass
        bundle.roots_pem()


if __name__ == "__main__":
    run(test_one_input)
