"""A real `keyplane serve` killed with SIGKILL at each step of a database password change
starts again, with every key, and the password it then needs is the old or the new one;
every invariant of tests/invariants.py holds after the restart."""

from __future__ import annotations

import shutil
import signal
import sqlite3
from pathlib import Path

import pytest

from keyplane.plugins.errors import BackendError
from keyplane.plugins.manager import KeyBackends
from keyplane.server.domain.faults import PASSWORD_POINTS
from tests.invariants import check_invariants
from tests.serverkit import ServerProcess, run_cli

OLD = "old password 1234"
NEW = "new password 5678"
# Where each kill leaves the change: before the re-seal it never happened.
RESEALED = {point: point != "password.staged" for point in PASSWORD_POINTS}


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Data dirs after one clean start and stop: sealed by a password, by a key file."""
    base = tmp_path_factory.mktemp("templates")
    password = base / "pki-db-password"
    password.write_text(OLD + "\n")
    made = {}
    for origin, extra in (("password", ["--password-file", str(password)]), ("keyfile", [])):
        (base / origin).mkdir()
        data = base / origin / "data"
        assert ServerProcess(data, *extra).stop() == 0
        made[origin] = data
    return made


def key_ids(data: Path) -> set[str]:
    db = sqlite3.connect(data / "pki.db")
    try:
        return {r[0] for r in db.execute("SELECT id FROM keys")}
    finally:
        db.close()


def opens_with(data: Path, tmp_path: Path, password: str) -> bool:
    probe = tmp_path / "probe-password"
    probe.write_text(password + "\n")
    try:
        KeyBackends({"software": {"password_file": str(probe)}}, data).close()
    except BackendError:
        return False
    return True


@pytest.mark.parametrize("origin", ["password", "keyfile"])
@pytest.mark.parametrize("point", PASSWORD_POINTS)
def test_sigkill_at_each_step_of_a_password_change_starts_with_old_or_new(
    point: str, origin: str, templates: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(templates[origin], data)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    password = secrets_dir / "pki-db-password"
    if origin == "password":
        password.write_text(OLD + "\n")
    # (From a key file, the password file is configured but not made yet.)
    kill = tmp_path / "kill.toml"
    kill.write_text(
        f'[backends.software]\npassword_file = "{password}"\n[testing]\nkill_at = "{point}"\n'
    )
    before = key_ids(data)
    snapshot = check_invariants(data)

    process = ServerProcess(data, "--config", str(kill))
    result = run_cli("settings", "set", "PKIDatabasePassword", NEW, data_dir=data)
    assert result.returncode != 0, f"the server did not reach {point}"
    assert process.proc.wait(timeout=30) == -signal.SIGKILL
    process.stop()
    # Killed between staging the new password and putting it in place, both are on disk.
    mid_change = point in ("password.staged", "password.resealed")
    assert (secrets_dir / "pki-db-password.new").exists() == mid_change

    again = ServerProcess(data, "--password-file", str(password))
    listing = run_cli("roots", "list", "--json", data_dir=data)
    signed = run_cli("sign", str(kill), "--out", str(tmp_path / "sig"), data_dir=data)
    assert again.stop() == 0
    assert listing.returncode == 0, listing.stderr
    assert signed.returncode == 0, signed.stderr
    assert key_ids(data) == before  # every key, none lost and none made
    check_invariants(data, previous=snapshot)
    assert not list(secrets_dir.glob("*.new"))  # the start finished or undid the change
    if RESEALED[point]:
        assert password.read_text().strip() == NEW
        assert not (data / "pki.db.key").exists()
        assert opens_with(data, tmp_path, NEW) and not opens_with(data, tmp_path, OLD)
    elif origin == "password":
        assert password.read_text().strip() == OLD
        assert opens_with(data, tmp_path, OLD) and not opens_with(data, tmp_path, NEW)
    else:
        assert not password.exists() and (data / "pki.db.key").exists()
    assert NEW not in again.output() and OLD not in again.output()
