"""A real SoftHSM token for the tests: the session fixture `softhsm_token` (a pytest plugin).

SoftHSM reads SOFTHSM2_CONF when the module is first initialised in a process and sees only
the tokens that exist then, so the fixture writes its own softhsm2.conf, points
SOFTHSM2_CONF at it and initialises the token before anything loads the module.
Without SoftHSM its tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "keyplane-test"
# Distinctive values, so that a test can tell that they leak nowhere.
USER_PIN = "kp-user-pin-7391"
SO_PIN = "kp-so-pin-5820"
INSTALL_HINT = "install it with: apt-get install softhsm2 opensc (or run: make system-test-deps)"


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM token and how to reach it."""

    module: str
    label: str
    pin: str
    so_pin: str
    conf: Path

    def backend_options(self, tmp_path: Path, pin: str | None = None) -> dict[str, object]:
        """Options for the pkcs11 backend, with the PIN (or `pin`) in a 0600 file."""
        pin_file = tmp_path / "hsm-pin"
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write((self.pin if pin is None else pin) + "\n")
        pin_file.chmod(0o600)
        return {"module": self.module, "token": self.label, "pin_file": str(pin_file)}

    @contextmanager
    def session(self) -> Iterator[Any]:
        """A python-pkcs11 session on the token, logged in, for looking at it from a test."""
        import pkcs11

        token = pkcs11.lib(self.module).get_token(token_label=self.label)
        try:
            session = token.open(user_pin=self.pin)
        except pkcs11.UserAlreadyLoggedIn:  # a backend in this process is logged in
            session = token.open()
        try:
            yield session
        finally:
            session.close()


def missing_softhsm(reason: str) -> NoReturn:
    """Skip, or fail under CI=true, because SoftHSM is not usable here."""
    message = f"SoftHSM is not usable ({reason}); {INSTALL_HINT}"
    if os.environ.get("CI") == "true":  # under CI=true nothing is skipped: fail instead
        pytest.fail(message, pytrace=False)
    pytest.skip(f"{message} (skipped as CI is not 'true'; under CI=true this fails)")


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """One SoftHSM token for the whole test session, in a temporary token directory."""
    softhsm2_util = shutil.which("softhsm2-util")
    if softhsm2_util is None:
        missing_softhsm("softhsm2-util is not on PATH")
    if not Path(SOFTHSM_MODULE).is_file():
        missing_softhsm(f"{SOFTHSM_MODULE} does not exist")
    try:
        import pkcs11
    except ImportError:
        missing_softhsm("python-pkcs11 is not installed: pip install python-pkcs11")
    loaded = getattr(pkcs11, "_loaded", {})  # python-pkcs11's cache of initialised modules
    if SOFTHSM_MODULE in loaded or os.path.realpath(SOFTHSM_MODULE) in loaded:
        pytest.fail(
            "the SoftHSM module was loaded before the softhsm_token fixture set SOFTHSM2_CONF; "
            "request softhsm_token before anything that opens a pkcs11 backend",
            pytrace=False,
        )

    root = tmp_path_factory.mktemp("softhsm")
    token_dir = root / "tokens"
    token_dir.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        result = subprocess.run(
            [
                str(softhsm2_util),
                "--init-token",
                "--free",
                "--label",
                TOKEN_LABEL,
                "--pin",
                USER_PIN,
                "--so-pin",
                SO_PIN,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"softhsm2-util --init-token failed: {result.stderr.strip()}")
        yield SoftHsmToken(
            module=SOFTHSM_MODULE, label=TOKEN_LABEL, pin=USER_PIN, so_pin=SO_PIN, conf=conf
        )
    finally:
        # The module stays initialised with this configuration for the rest of the process.
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
