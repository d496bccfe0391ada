"""Roots in a real SoftHSM token: the root-key flows, a rotation pass, message signing
and trust state signed by HSM roots, and a server that refuses to start without its HSM."""

from __future__ import annotations

import datetime
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass

from keyplane.clients.trust import follow
from keyplane.clients.verify import MessageVerificationError, verify_message
from keyplane.plugins.errors import BackendUnavailableError
from keyplane.plugins.uri import Pkcs11KeyUri
from keyplane.server.domain.clock import ManualClock
from tests.serverkit import KEYPLANE, RunningServer, ServerProcess, run_cli, running_server
from tests.softhsm import SoftHsmToken

pytestmark = pytest.mark.softhsm


def hsm_config(tmp_path: Path, token: SoftHsmToken, label: str | None = None) -> Path:
    options = token.backend_options(tmp_path)
    config = tmp_path / "keyplane.toml"
    config.write_text(
        '[key_backends]\nroot = "pkcs11"\n\n[backends.pkcs11]\n'
        f'module = "{options["module"]}"\ntoken = "{label or options["token"]}"\n'
        f'pin_file = "{options["pin_file"]}"\n'
    )
    return config


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.datetime.now(datetime.UTC))


@pytest.fixture
def server(
    tmp_path: Path, softhsm_token: SoftHsmToken, clock: ManualClock
) -> Iterator[RunningServer]:
    config = hsm_config(tmp_path, softhsm_token)
    with running_server(tmp_path / "data", clock=clock, config_file=config) as running:
        yield running


def token_objects(token: SoftHsmToken) -> str:
    return subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            token.module,
            "--token-label",
            token.label,
            "--login",
            "--pin",
            token.pin,
            "--list-objects",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_root_flows_with_roots_on_the_token(
    server: RunningServer, softhsm_token: SoftHsmToken
) -> None:
    with server.admin_client() as client:
        root0 = client.list_root_keys().active[0]
        assert root0.backend == "pkcs11"
        uri = Pkcs11KeyUri.parse(root0.key_uri)
        assert uri.token == softhsm_token.label and uri.id
        assert softhsm_token.pin not in root0.key_uri
        # Visible on the token, under its name, and not extractable.
        listing = token_objects(softhsm_token)
        assert root0.name in listing
        with softhsm_token.session() as session:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=uri.id)
            assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
            assert key[Attribute.NEVER_EXTRACTABLE]
        # The legacy root never lives in the HSM.
        assert client.list_root_keys().legacy.name == "legacy-root"
        assert server.hierarchy.legacy_root().backend == "software"

        root1 = client.create_root_key()
        assert root1.backend == "pkcs11" and root1.name.endswith("Root 1")
        for kind in ("server_tls", "intermediate_tls", "message_signing"):
            assert server.hierarchy.active_key(kind).issuer_fingerprint == root1.fingerprint
        client.revoke_root_key(root0.fingerprint, "rotation", True)
    with softhsm_token.session() as session:
        with pytest.raises(pkcs11.NoSuchKey):
            session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=uri.id)
    with server.admin_client() as client:
        assert [r.fingerprint for r in client.list_root_keys().active] == [root1.fingerprint]


def test_rotation_trust_state_and_signing_with_hsm_roots(
    server: RunningServer, clock: ManualClock
) -> None:
    hierarchy = server.hierarchy
    with server.admin_client() as client:
        root0 = hierarchy.issuing_root().fingerprint
        state = follow(None, client.get_trust_state(0), [root0])
        payload = b"pushed policy"
        signed = client.sign_message(payload)
        assert verify_message(payload, signed, state).root_fingerprint == root0
        client.create_root_key()
    with server.admin_client() as client:
        client.revoke_root_key(root0, "rotation", True)
    with server.admin_client() as client:
        state = follow(state, client.get_trust_state(state.version))
        with pytest.raises(MessageVerificationError, match="revoked"):
            verify_message(payload, signed, state)
    # 40 days of automatic rotation under the HSM root, never a gap.
    for _ in range(40 * 4):
        clock.advance(datetime.timedelta(hours=6))
        hierarchy.reconcile()
        now = clock.now()
        for kind in ("server_tls", "intermediate_tls", "message_signing"):
            record = hierarchy.active_key(kind)
            assert record.not_before <= now < record.not_after
    renewed = [k for k in hierarchy.subordinate_keys("message_signing") if k.state == "retired"]
    assert renewed


def test_a_server_whose_hsm_is_unreachable_refuses_to_start(
    tmp_path: Path, softhsm_token: SoftHsmToken
) -> None:
    config = hsm_config(tmp_path, softhsm_token, label="no-such-token")
    with pytest.raises(BackendUnavailableError, match="no-such-token"):
        with running_server(tmp_path / "data", config_file=config):
            pass
    result = subprocess.run(
        [
            KEYPLANE,
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "cli"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "no-such-token" in result.stderr
    assert softhsm_token.pin not in result.stderr
    # Nothing fell back to software: no root was made anywhere.
    assert not (tmp_path / "cli" / "keyplane.db").exists()


def test_the_cli_flow_with_roots_in_the_hsm(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    config = hsm_config(tmp_path, softhsm_token)
    process = ServerProcess(tmp_path / "data", "--config", str(config))
    try:
        data = process.data_dir
        listing = json.loads(run_cli("roots", "list", "--json", data_dir=data, check=True).stdout)
        assert listing["active"][0]["backend"] == "pkcs11"
        created = json.loads(run_cli("roots", "create", "--json", data_dir=data, check=True).stdout)
        assert created["key_uri"].startswith("pkcs11:")
        run_cli(
            "roots",
            "revoke",
            listing["active"][0]["fingerprint"],
            "--reason",
            "r",
            "--yes",
            data_dir=data,
            check=True,
        )
    finally:
        assert process.stop() == 0
