"""The trust state (clients/trust.py): any bytes as a trust-state file (binary or either
JSON form), loaded as given and pinned, and followed from a version held before, give a
TrustState or TrustStateError, never another exception."""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["keyplane"]):
    from keyplane.clients.trust import TrustStateError, decode_file, follow, load

from fuzz.harness import fixture, run

HELD = load(fixture("trust-first.bin"))


def test_one_input(data: bytes) -> None:
    try:
        state = load(data)
        state.root_certificates  # noqa: B018 - parses every root certificate
        state.roots_pem()
        state.issue_time  # noqa: B018
    except TrustStateError:
        pass
    try:
        load(data, HELD.root_fingerprints)
    except TrustStateError:
        pass
    try:
        follow(HELD, [decode_file(data)])
    except TrustStateError:
        pass


if __name__ == "__main__":
    run(test_one_input)
