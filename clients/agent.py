"""The client agent runtime: `keyplane agent run|status|verify` (being written)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `keyplane agent ...` to the CLI."""
    commands.add_parser("agent", help="run a client agent (enroll, renew, follow trust)")
