"""A key made and never recorded is never left behind: a real `keyplane serve` killed
with SIGKILL between generating a key and recording it (a root, a subordinate), with
the key in pki.db or on a real SoftHSM token; the restart destroys the key, audits
that, and every invariant holds. A key being made by another worker is not touched."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest

from keyplane.plugins.manager import KeyBackends
from keyplane.server.domain.clock import SystemClock
from keyplane.server.domain.key_intents import KeyMaker
from keyplane.server.store import StateStore
from tests.invariants import check_invariants, token_keys
from tests.serverkit import ServerProcess, run_cli
from tests.softhsm import SoftHsmToken
from tests.test_crash_safety import software_key_ids


def _config(tmp_path: Path, point: str, token: SoftHsmToken | None) -> Path:
    text = f'[testing]\nkill_at = "{point}"\n'
    if token is not None:
        options = token.backend_options(tmp_path)
        text = (
            '[key_backends]\nroot = "pkcs11"\nmessage_signing = "pkcs11"\n\n'
            f'[backends.pkcs11]\nmodule = "{options["module"]}"\n'
            f'token = "{options["token"]}"\npin_file = "{options["pin_file"]}"\n\n' + text
        )
    config = tmp_path / "keyplane.toml"
    config.write_text(text)
    return config


def _audit(data: Path, action: str) -> list[tuple[str, str]]:
    with sqlite3.connect(f"file:{data / 'keyplane.db'}?mode=ro", uri=True) as db:
        return db.execute(
            "SELECT target, details FROM audit WHERE action = ?", (action,)
        ).fetchall()


def _intents(data: Path) -> list[str]:
    with sqlite3.connect(f"file:{data / 'keyplane.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT name FROM meta WHERE name LIKE 'key_intent:%'").fetchall()
    return [r[0].removeprefix("key_intent:") for r in rows]


@pytest.fixture(params=["software", "softhsm"])
def token(request: pytest.FixtureRequest) -> SoftHsmToken | None:
    if request.param == "software":
        return None
    request.applymarker(pytest.mark.softhsm)
    found: SoftHsmToken = request.getfixturevalue("softhsm_token")
    return found


# (kill point, what the CLI does to reach it, backend of the key made there with a token)
CASES = {
    "root": ("root.generated", ("roots", "create")),
    "subordinate": ("subordinate.generated", ("keys", "rotate", "message-signing")),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_a_key_made_but_not_recorded_is_destroyed_at_the_restart(
    case: str, token: SoftHsmToken | None, tmp_path: Path
) -> None:
    point, command = CASES[case]
    data = tmp_path / "data"
    config = _config(tmp_path, point, token)
    # A clean first start (the kill point is not reached: no key of that kind is made
    # by a later step), then the kill.
    plain = tmp_path / "plain.toml"
    plain.write_text(config.read_text().split("[testing]")[0])
    assert ServerProcess(data, "--config", str(plain)).stop() == 0
    before = check_invariants(data, token=token)
    pki_before = software_key_ids(data)

    process = ServerProcess(data, "--config", str(config))
    result = run_cli(*command, data_dir=data)
    assert result.returncode != 0, f"the server did not reach {point}"
    assert process.proc.wait(timeout=30) == -signal.SIGKILL
    process.stop()
    # Killed with the key made and no record of it: only its intent names it.
    [orphan] = _intents(data)
    if token is None:
        assert software_key_ids(data) - pki_before == {orphan.removeprefix("software:")}
    else:
        assert orphan.startswith("pkcs11:")
        assert len(set(token_keys(token)) - (before.token_keys or frozenset())) == 1

    restarted = ServerProcess(data, "--config", str(plain))
    listing = run_cli("keys", "list", "--json", data_dir=data, check=True)
    assert restarted.stop() == 0
    assert _intents(data) == []
    [(target, details)] = _audit(data, "key.destroy_unrecorded")
    assert target == orphan and json.loads(details)["backend"] == (
        "software" if not token else "pkcs11"
    )
    assert orphan not in listing.stdout
    # Nothing but what records name: the invariant checker compares the token with the
    # snapshot from before the kill, and pki.db with the inventory.
    check_invariants(data, token=token, previous=before)
    assert software_key_ids(data) == pki_before


def test_a_key_another_worker_is_making_is_left_alone(tmp_path: Path) -> None:
    """clean_up skips while a key is being made (keys.lock held shared), and resolves the
    intent once it can take the lock."""
    data = tmp_path / "data"
    assert ServerProcess(data).stop() == 0
    store = StateStore(data / "keyplane.db")
    backends = KeyBackends({"software": {}}, data)
    try:
        maker = KeyMaker(store, backends, SystemClock(), data)
        other = KeyMaker(store, backends, SystemClock(), data)
        with maker.making("software", "in flight", "ec-p256") as generated:
            assert _intents(data) == [generated.uri]
            assert other.clean_up() == []  # another process's key in the making
            assert backends.holds_key(generated.uri)
        # The block ended without recording the key: it is destroyed, intent and all.
        assert not backends.holds_key(generated.uri)
        assert _intents(data) == []
        # An intent a dead process left (its lock went with it): the key is destroyed.
        uri = backends.new_key_uri("software", "dies")
        assert uri is not None
        with store.transaction(SystemClock().now()) as tx:
            tx.record_key_intent(uri, "software", "dies")
        backends.generate_key("software", "dies", "ec-p256", uri)
        assert other.clean_up() == [uri]
        assert not backends.holds_key(uri) and _intents(data) == []
        # One whose key a record names after all is adopted: the key stays.
        root = store.keys("root")[0]
        with store.transaction(SystemClock().now()) as tx:
            tx.record_key_intent(root.key_uri, "software", root.name)
        assert other.clean_up() == [] and _intents(data) == []
        assert backends.holds_key(root.key_uri)
    finally:
        backends.close()
        store.close()
    shutil.rmtree(data)
