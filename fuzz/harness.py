"""What every fuzz target shares: where its fixtures are, and how it runs.

A target is a module with `test_one_input(data: bytes)` that lets only the exceptions its
parser documents escape; anything else is a crash. Run one with
`python -m fuzz.<target> [libFuzzer options] [corpus dirs]` (`make fuzz` runs them all).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris

FUZZ = Path(__file__).resolve().parent
CORPUS = FUZZ / "corpus"
FIXTURES = FUZZ / "fixtures"
# What `make_corpus` signs as the message-signing target's payload.
PAYLOAD = b"keyplane fuzz payload\n"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def run(test_one_input: Callable[[bytes], None]) -> None:
    """libFuzzer's main loop over `test_one_input`, with sys.argv as its options."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
