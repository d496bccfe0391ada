"""A real `keyplane serve` with its roots and message-signing key on a real SoftHSM token,
loaded through OpenSC's pkcs11-spy (which logs every PKCS#11 call, so the test counts
the logins): a wrong PIN at start is one refused login and a one-line refusal, no
second try, nothing made in software, and the right PIN works after it (the PIN was
not locked); a token taken away while serving (its files moved out of SoftHSM's token
dir) makes signing UNAVAILABLE with nothing signed by a software key, and signing
works again once the token is back. After each, every invariant holds."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.credentials import load_credential
from keyplane.server.vitals import EXIT_VITAL_PART_DIED
from tests.invariants import check_invariants
from tests.serverkit import KEYPLANE, ServerProcess
from tests.softhsm import SoftHsmToken

pytestmark = pytest.mark.softhsm

SPY = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"


@pytest.fixture
def spy(tmp_path: Path, softhsm_token: SoftHsmToken) -> Iterator[dict[str, str]]:
    """The environment that has pkcs11-spy pass every call on to SoftHSM and log it."""
    if not Path(SPY).is_file():
        pytest.fail(f"{SPY} is missing: it comes with opensc (make system-test-deps)")
    yield {"PKCS11SPY": softhsm_token.module, "PKCS11SPY_OUTPUT": str(tmp_path / "spy.log")}


def _config(tmp_path: Path, token: SoftHsmToken, pin: str | None = None) -> Path:
    options = token.backend_options(tmp_path, pin=pin)
    config = tmp_path / "keyplane.toml"
    config.write_text(
        '[key_backends]\nroot = "pkcs11"\nmessage_signing = "pkcs11"\n\n'
        f'[backends.pkcs11]\nmodule = "{SPY}"\ntoken = "{options["token"]}"\n'
        f'pin_file = "{options["pin_file"]}"\n'
    )
    return config


def _logins(spy: dict[str, str]) -> int:
    log = Path(spy["PKCS11SPY_OUTPUT"])
    return log.read_text(errors="replace").count("C_Login") if log.exists() else 0


def _software_keys(data: Path) -> int:
    if not (data / "pki.db").exists():
        return 0
    with sqlite3.connect(f"file:{data / 'pki.db'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM keys").fetchone()[0])


def _token_dir(token: SoftHsmToken) -> Path:
    """The token's own directory under SoftHSM's tokendir (one token: one directory)."""
    line = next(
        x for x in token.conf.read_text().splitlines() if x.startswith("directories.tokendir")
    )
    [found] = [p for p in Path(line.partition("=")[2].strip()).iterdir() if p.is_dir()]
    return found


@pytest.mark.timeout(240)
def test_a_wrong_pin_at_start_is_one_login_and_locks_nothing(
    tmp_path: Path, softhsm_token: SoftHsmToken, spy: dict[str, str]
) -> None:
    data = tmp_path / "data"
    wrong = _config(tmp_path, softhsm_token, pin="not-the-pin-000")
    for attempt in range(3):  # as systemd restarting a server again and again would
        result = subprocess.run(
            [KEYPLANE, "serve", "--config", str(wrong), "--data-dir", str(data),
             "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **spy},
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        [line] = [x for x in result.stderr.splitlines() if "cannot start" in x]
        assert "refused the PIN" in line and "Traceback" not in result.stderr, line
        assert "not-the-pin-000" not in result.stderr and softhsm_token.pin not in result.stderr
        assert _logins(spy) == attempt + 1  # one login per start, never a retry loop
    # Nothing fell back to software: no key was made anywhere.
    assert _software_keys(data) == 0
    assert not (data / "keyplane.db").exists()
    # The PIN is not locked: the right one starts the server.
    server = ServerProcess(data, "--config", str(_config(tmp_path, softhsm_token)), env=spy)
    try:
        with KeyplaneClient.connect(server.listen, load_credential(data / "admin")) as admin:
            assert admin.sign_message(b"after wrong pins").signature
    finally:
        assert server.stop() == 0
    check_invariants(data, token=softhsm_token)


@pytest.mark.timeout(240)
def test_a_token_taken_away_while_serving_is_unavailable_and_comes_back(
    tmp_path: Path, softhsm_token: SoftHsmToken, spy: dict[str, str]
) -> None:
    """SoftHSM cannot open a token again in a process that saw it go (only a fresh
    C_Initialize can), so the server says UNAVAILABLE, logs in at most once more (no
    loop), reports NOT_SERVING and exits 70 for its supervisor or systemd; started again
    with the token back, it signs with the same key."""
    data = tmp_path / "data"
    config = _config(tmp_path, softhsm_token)
    server = ServerProcess(data, "--config", str(config), env=spy)
    token_dir = _token_dir(softhsm_token)
    away = tmp_path / "token-away"
    try:
        with KeyplaneClient.connect(server.listen, load_credential(data / "admin")) as admin:
            before = admin.sign_message(b"before")
            software = _software_keys(data)
            logins = _logins(spy)
            token_dir.rename(away)  # the token is pulled out
            try:
                refused = []
                for i in range(5):
                    with pytest.raises(KeyplaneClientError) as caught:
                        admin.sign_message(f"away {i}".encode())
                    refused.append(caught.value)
                status = server.proc.wait(timeout=30)
            finally:
                away.rename(token_dir)  # and put back
        for exc in refused:
            assert exc.code.name == "UNAVAILABLE", exc
            assert softhsm_token.pin not in exc.message
        assert status == EXIT_VITAL_PART_DIED
        assert "its key backend stopped; reporting NOT_SERVING" in server.output()
        assert _logins(spy) - logins <= 1  # one try to log in again, no loop
        assert _software_keys(data) == software  # nothing fell back to a software key
    finally:
        server.stop()
    again = ServerProcess(data, "--config", str(config), env=spy)
    try:
        with KeyplaneClient.connect(again.listen, load_credential(data / "admin")) as admin:
            after = admin.sign_message(b"after")
        assert after.certificate_chain[0] == before.certificate_chain[0]
    finally:
        assert again.stop() == 0
    check_invariants(data, token=softhsm_token)
