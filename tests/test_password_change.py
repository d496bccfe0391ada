"""Changing the database password never locks the next start out; pki.db's seals are
checked when it opens (KDF floor, every sealed key and secret)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from keyplane.clients.client import KeyplaneClientError
from keyplane.plugins.errors import (
    BackendUnavailableError,
    PasswordSinkError,
    SealedKeyError,
    WrongPasswordError,
)
from keyplane.plugins.keys import KeyAlgorithm
from keyplane.plugins.manager import KeyBackends
from keyplane.plugins.password import Password
from keyplane.plugins.uri import SoftwareKeyUri
from keyplane.server.interceptor import status_for
from tests.serverkit import running_server
from tests.test_software_backend import opened, password_file, signs

OLD = "old password 1234"
NEW = "new password 5678"


def pki_files(data_dir: Path) -> dict[str, bytes]:
    """pki.db and its key file, byte for byte (read with every connection closed)."""
    return {p.name: p.read_bytes() for p in sorted(data_dir.glob("pki.db*")) if p.is_file()}


@contextlib.contextmanager
def pki_db(data_dir: Path) -> Iterator[sqlite3.Connection]:
    with contextlib.closing(sqlite3.connect(data_dir / "pki.db")) as db, db:
        yield db


def _env_sink(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    monkeypatch.setenv("KEYPLANE_TEST_PKI_PASSWORD", OLD)
    with opened(data, password_file=password_file(tmp_path, OLD)):
        pass
    return {"password_env": "KEYPLANE_TEST_PKI_PASSWORD"}


def _no_sink(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    with opened(data):
        pass
    return {}


def _missing_directory(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, object]:
    with opened(data):
        pass
    return {"password_file": str(tmp_path / "no-such-dir" / "pki-db-password")}


def _unlocked(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    with opened(data, password_file=password_file(tmp_path, OLD)):
        pass
    return {"password": Password(OLD.encode())}  # as a server that was unlocked holds it


@pytest.mark.parametrize(
    ("prepare", "says"),
    [
        (_env_sink, "password_env"),
        (_no_sink, "no password_file is configured"),
        (_missing_directory, "directory of password_file does not exist"),
        (_unlocked, "no password_file is configured"),
    ],
    ids=["password_env", "no-password_file", "missing-directory", "unlocked"],
)
def test_a_change_with_nowhere_to_write_the_password_is_refused_and_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepare: object, says: str
) -> None:
    data = tmp_path / "data"
    options = prepare(tmp_path, data, monkeypatch)  # type: ignore[operator]
    with opened(data, **options) as backends:
        uri = backends.generate_key("software", "root", KeyAlgorithm.EC_P256).uri
    before = pki_files(data)

    with opened(data, **options) as backends:
        with pytest.raises(PasswordSinkError, match=says) as refused:
            backends.secret_store().change_password(NEW.encode())
    assert "password_file" in str(refused.value)  # it says how to configure a sink
    assert NEW not in str(refused.value) and OLD not in str(refused.value)

    assert pki_files(data) == before  # pki.db the same bytes; a key file still there
    assert not list(tmp_path.rglob("*.new"))
    with opened(data, **options) as backends:
        assert signs(backends.private_key(uri))


def test_the_settings_rpc_refuses_a_change_with_no_sink(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data) as server, server.admin_client() as client:
        with pytest.raises(KeyplaneClientError) as refused:
            client.update_setting("PKIDatabasePassword", NEW)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == "NO_PASSWORD_SINK"
        assert "password_file" in refused.value.message
        assert client.get_setting("PKIDatabasePassword").is_default
        audit = [a.action for a in server.hierarchy.store.audit_log(1000)]
        assert "setting.update" not in audit
    assert (data / "pki.db.key").exists()
    with running_server(data) as again, again.admin_client() as client:
        assert client.sign_message(b"still sealed by the key file").signature


def test_a_change_to_a_password_file_writes_it_drops_the_key_file_and_restarts(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with running_server(data):
        pass  # sealed with a key file
    secret = tmp_path / "etc" / "pki-db-password"
    secret.parent.mkdir()
    config = tmp_path / "keyplane.toml"
    config.write_text(f'[backends.software]\npassword_file = "{secret}"\n')
    with running_server(data, config_file=config) as server, server.admin_client() as client:
        roots = [r.fingerprint for r in client.list_root_keys().active]
        client.update_setting("PKIDatabasePassword", NEW)
        assert client.sign_message(b"after the change").signature

    assert secret.read_text() == NEW + "\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not (data / "pki.db.key").exists()
    assert not list(secret.parent.glob("*.new"))
    with running_server(data, config_file=config) as again, again.admin_client() as client:
        assert [r.fingerprint for r in client.list_root_keys().active] == roots
        assert client.get_setting("PKIDatabasePassword", reveal=True).value == NEW


def test_a_worker_that_did_not_make_the_change_follows_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = password_file(tmp_path, OLD)
    with opened(data, password_file=secret) as changer, opened(data, password_file=secret) as other:
        old = changer.generate_key("software", "before", KeyAlgorithm.EC_P256).uri
        changer.secret_store().change_password(NEW.encode())
        # The other process seals under the new key and still reads the old ones.
        made = other.generate_key("software", "after", KeyAlgorithm.EC_P256).uri
        assert signs(other.private_key(old))
        assert other.tls_private_key_pem(old)
    with opened(data, password_file=secret) as backends:
        assert signs(backends.private_key(old)) and signs(backends.private_key(made))


def test_the_old_password_no_longer_opens_pki_db_after_a_change(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = password_file(tmp_path, OLD)
    with opened(data, password_file=secret) as backends:
        backends.secret_store().change_password(NEW.encode())
    with pytest.raises(WrongPasswordError):
        KeyBackends({"software": {"password_file": password_file(tmp_path, OLD, "old")}}, data)


@pytest.mark.parametrize(
    ("params", "salt_bytes"),
    [({"n": 2**10, "r": 8, "p": 1}, 16), ({"n": 2**15, "r": 1, "p": 1}, 16), (None, 4)],
    ids=["small-n", "small-r", "short-salt"],
)
def test_kdf_parameters_below_the_floor_are_refused_when_pki_db_is_opened(
    tmp_path: Path, params: dict[str, int] | None, salt_bytes: int
) -> None:
    data = tmp_path / "data"
    secret = password_file(tmp_path, OLD)
    with opened(data, password_file=secret):
        pass
    with pki_db(data) as db:
        if params is not None:
            db.execute("UPDATE header SET kdf_params = ?", (json.dumps(params),))
        db.execute("UPDATE header SET salt = substr(salt, 1, ?)", (salt_bytes,))

    with pytest.raises(BackendUnavailableError, match="below the safe floor"):
        KeyBackends({"software": {"password_file": secret}}, data)


def _two_keys(data: Path) -> tuple[str, str]:
    with opened(data) as backends:
        victim = backends.generate_key("software", "victim", KeyAlgorithm.EC_P256).uri
        donor = backends.generate_key("software", "donor", KeyAlgorithm.EC_P256).uri
    return SoftwareKeyUri.parse(victim).key_id, SoftwareKeyUri.parse(donor).key_id


def test_a_flipped_byte_in_a_sealed_key_refuses_the_open_naming_the_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    victim, _ = _two_keys(data)
    with pki_db(data) as db:
        (sealed,) = db.execute("SELECT sealed FROM keys WHERE id = ?", (victim,)).fetchone()
        flipped = bytes([sealed[0] ^ 0x01]) + sealed[1:]
        db.execute("UPDATE keys SET sealed = ? WHERE id = ?", (flipped, victim))

    with pytest.raises(SealedKeyError, match=f"software:{victim} \\('victim'\\)"):
        KeyBackends({"software": {}}, data)


def test_a_sealed_key_copied_to_another_row_refuses_the_open_naming_the_row(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    victim, donor = _two_keys(data)
    with pki_db(data) as db:
        row = db.execute("SELECT nonce, sealed FROM keys WHERE id = ?", (donor,)).fetchone()
        db.execute("UPDATE keys SET nonce = ?, sealed = ? WHERE id = ?", (*row, victim))

    with pytest.raises(SealedKeyError, match=f"software:{victim}"):
        KeyBackends({"software": {}}, data)


def test_a_damaged_seal_met_by_an_rpc_is_data_loss(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = password_file(tmp_path, OLD)
    config = tmp_path / "keyplane.toml"
    config.write_text(f'[backends.software]\npassword_file = "{secret}"\n')
    with running_server(data, config_file=config) as server, server.admin_client() as client:
        client.update_setting("PKIDatabasePassword", NEW)
        with pki_db(data) as db:  # damaged under the running server
            db.execute("UPDATE secrets SET sealed = zeroblob(length(sealed))")
        with pytest.raises(KeyplaneClientError) as caught:
            client.get_setting("PKIDatabasePassword", reveal=True)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS
    assert "PKIDatabasePassword" in caught.value.message and NEW not in caught.value.message
    code, _, reason = status_for(SealedKeyError("a key"))
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "SEALED_KEY_DAMAGED")
