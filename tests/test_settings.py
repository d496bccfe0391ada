"""Settings over gRPC: defaults, validation, protected values, and the database password."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.v1 import settings_service_pb2
from tests.serverkit import RunningServer, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data") as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[KeyplaneClient]:
    with server.admin_client() as c:
        yield c


def audit(server: RunningServer) -> list[tuple[str, str]]:
    return [(a.action, a.target) for a in server.hierarchy.store.audit_log(10000)]


def test_defaults_are_listed_with_type_scope_and_audience(client: KeyplaneClient) -> None:
    settings = {s.name: s for s in client.list_settings()}
    expected = {
        "PKIClientTLSKeyValidityHours": "168",
        "PKIClientTLSKeyRenewalWindowHours": "4",
        "PKIIntermediateTLSKeyValidityHours": "720",
        "PKIIntermediateTLSKeyRenewalWindowHours": "72",
        "PKIServerTLSKeyValidityHours": "720",
        "PKIServerTLSKeyRenewalWindowHours": "72",
        "PKIMessageSigningKeyValidityHours": "720",
        "PKIMessageSigningKeyRenewalWindowHours": "72",
    }
    assert {n: settings[n].value for n in expected} == expected
    assert all(settings[n].is_default for n in expected)
    assert settings["PKIClientTLSKeyRenewalWindowHours"].affects == "client"
    assert settings["PKIServerTLSKeyRenewalWindowHours"].affects == "server"
    assert settings["PKIDatabasePassword"].scope == "local"
    assert settings["PKIDatabasePassword"].type == settings_service_pb2.SETTING_TYPE_PROTECTED


def test_set_and_get_are_stored_and_audited(server: RunningServer, client: KeyplaneClient) -> None:
    updated = client.update_setting("PKIServerTLSKeyValidityHours", " 240 ")
    assert updated.value == "240" and not updated.is_default
    assert updated.updated_by.startswith("admin@")
    assert client.get_setting("PKIServerTLSKeyValidityHours").value == "240"
    assert ("setting.update", "PKIServerTLSKeyValidityHours") in audit(server)
    assert client.update_setting("EnableLegacyProtocol", "TRUE").value == "true"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("NoSuchSetting", "1", "unknown setting"),
        ("PKIServerTLSKeyValidityHours", "-5", "between 1 and"),
        ("PKIServerTLSKeyValidityHours", "0", "between 1 and"),
        ("PKIServerTLSKeyValidityHours", "ten", "whole number"),
        ("PKIServerTLSKeyRenewalWindowHours", "720", "must be shorter than"),
        ("PKIClientTLSKeyValidityHours", "4", "must be shorter than"),
        ("EnableLegacyProtocol", "yes", "true or false"),
        ("PKIDatabasePassword", "short", "at least 12"),
    ],
)
def test_invalid_values_are_refused_and_nothing_changes(
    server: RunningServer, client: KeyplaneClient, name: str, value: str, message: str
) -> None:
    before = {s.name: s.value for s in client.list_settings()}
    with pytest.raises(KeyplaneClientError) as caught:
        client.update_setting(name, value)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.message
    assert {s.name: s.value for s in client.list_settings()} == before
    assert not [a for a in audit(server) if a[0] == "setting.update"]


def test_client_settings_reach_the_trust_state(
    server: RunningServer, client: KeyplaneClient
) -> None:
    client.update_setting("PKIClientTLSKeyRenewalWindowHours", "6")
    from keyplane.clients.trust import follow

    state = follow(None, client.get_trust_state(0), [server.hierarchy.issuing_root().fingerprint])
    assert state.body.client_settings["PKIClientTLSKeyRenewalWindowHours"] == "6"
    assert "PKIServerTLSKeyValidityHours" not in state.body.client_settings


def test_database_password_reseals_pki_db_and_is_revealed_only_on_request(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    password_file = tmp_path / "pki-password"
    password_file.write_text("first password 1\n")
    config = tmp_path / "keyplane.toml"
    config.write_text(f'[backends.software]\npassword_file = "{password_file}"\n')
    with running_server(data, config_file=config) as server, server.admin_client() as client:
        masked = client.update_setting("PKIDatabasePassword", "a much better password")
        assert masked.value == "********"
        assert client.get_setting("PKIDatabasePassword").value == "********"
        assert {s.name: s.value for s in client.list_settings()}["PKIDatabasePassword"] == (
            "********"
        )
        revealed = client.get_setting("PKIDatabasePassword", reveal=True)
        assert revealed.value == "a much better password"
        assert ("setting.reveal", "PKIDatabasePassword") in audit(server)
        # Keys still sign after the re-seal.
        assert client.sign_message(b"after re-seal").signature
    # The configured password file now holds the new password (0600) and it opens pki.db.
    assert password_file.read_text().strip() == "a much better password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    db = sqlite3.connect(data / "keyplane.db")
    try:
        stored = db.execute(
            "SELECT value FROM settings WHERE name = 'PKIDatabasePassword'"
        ).fetchone()[0]
    finally:
        db.close()
    assert "better" not in stored
    assert b"much better" not in (data / "pki.db").read_bytes()
    with running_server(data, config_file=config) as again, again.admin_client() as client:
        assert len(client.list_root_keys().active) == 1
    password_file.write_text("first password 1\n")
    from keyplane.plugins.errors import BackendAuthError

    with pytest.raises(BackendAuthError, match="password"):
        with running_server(data, config_file=config):
            pass
