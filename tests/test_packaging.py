"""`pip install .` builds a wheel that carries the generated API and every package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_has_the_generated_api_and_every_package(tmp_path: Path) -> None:
    # No build isolation: the venv already has setuptools and grpcio-tools (dev extra),
    # so this runs offline; pip install . does the same in an isolated build env.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("keyplane-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "root_key_service_pb2.py",
        "root_key_service_pb2_grpc.py",
        "trust_state_pb2.py",
        "enrollment_service_pb2_grpc.py",
        "unlock_service_pb2_grpc.py",
        "py.typed",
    ):
        assert f"keyplane/v1/{module}" in names, module
    for package in ("server", "server/domain", "server/services", "plugins", "clients", "zone"):
        assert f"keyplane/{package}/__init__.py" in names, package
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "keyplane = keyplane.clients.entry:main" in text
    assert "serve = keyplane.server.cli:register" in text
    assert "unlock = keyplane.server.unlock_command:register" in text
    assert "zone = keyplane.zone.cli:register" in text
    assert "backup-restore = keyplane.server.restore_cli:register" in text
    # Generated code is built, never committed.
    tracked = subprocess.run(
        ["git", "ls-files", "gen"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout
    assert tracked == ""
