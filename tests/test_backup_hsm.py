"""Backups of a server whose roots are on a SoftHSM token: the archive names them by URI
and carries none of them, and `backup verify` looks each one up on the token."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import ObjectClass

from keyplane.plugins.uri import Pkcs11KeyUri
from tests.serverkit import ServerProcess, run_cli
from tests.softhsm import SoftHsmToken
from tests.test_server_hsm import hsm_config

pytestmark = pytest.mark.softhsm


def cli_json(data_dir: Path, *args: str) -> Any:
    result = run_cli(*args, "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_verify_looks_hsm_keys_up_on_the_token(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    config = hsm_config(tmp_path, softhsm_token)
    server = ServerProcess(tmp_path / "data", "--config", str(config))
    try:
        data = server.data_dir
        root0 = cli_json(data, "roots", "list")["active"][0]
        root1 = cli_json(data, "roots", "create")
        archive = tmp_path / "backup.tar"
        cli_json(data, "backup", "create", "--out", str(archive))
        with tarfile.open(archive) as tar:
            source = tar.extractfile("manifest.json")
            assert source is not None
            manifest = json.loads(source.read())
        roots = {k["fingerprint"]: k for k in manifest["keys"] if k["kind"] == "root"}
        assert set(roots) == {root0["fingerprint"], root1["fingerprint"]}
        for key in roots.values():
            assert key["backend"] == "pkcs11" and key["key_uri"].startswith("pkcs11:")
            assert not key["in_archive"]  # an HSM's keys never leave the token
        assert softhsm_token.pin.encode() not in archive.read_bytes()

        before = cli_json(data, "backup", "verify", str(archive))["live"]
        assert before["not_held"] == []

        # Revoking Root 0 destroys its key on the token (and the subordinates it issued).
        run_cli(
            "roots", "revoke", root0["fingerprint"], "--reason", "r", "--yes",
            data_dir=data, check=True,
        )  # fmt: skip
        uri = Pkcs11KeyUri.parse(root0["key_uri"])
        with softhsm_token.session() as session, pytest.raises(pkcs11.NoSuchKey):
            session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=uri.id)

        live = cli_json(data, "backup", "verify", str(archive))["live"]
        revoked_since = {
            c["fingerprint"] for c in live["state_changed"] if c["live_state"] == "revoked"
        }
        assert root0["fingerprint"] in revoked_since
        unheld = {k["fingerprint"]: k for k in live["not_held"]}
        assert set(unheld) == revoked_since
        assert unheld[root0["fingerprint"]]["backend"] == "pkcs11"
        assert unheld[root0["fingerprint"]]["reason"] == "not in the pkcs11 backend"
        assert root1["fingerprint"] not in unheld  # still on the token
    finally:
        assert server.stop() == 0
