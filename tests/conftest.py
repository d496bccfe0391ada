"""Shared test fixtures: each lives in its own module, registered here."""

pytest_plugins = ["tests.softhsm", "tests.served"]
