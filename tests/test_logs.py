"""`keyplane serve --log-format json`: a real server's stderr is one JSON object per line,
every change is an event at info with the RPC, the caller and the key it concerns, and
nothing in the output is a secret (no PEM, no key in any encoding, no token, no
password); gRPC's C-core lines stay out unless GRPC_VERBOSITY asks for them."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.client import (
    KeyplaneClient,
    KeyplaneClientError,
    bootstrap_channel_for,
    channel_for,
)
from keyplane.clients.credentials import Credential, load_credential
from keyplane.clients.entry import quiet_grpc_core
from keyplane.plugins.keys import fingerprint
from tests.opskit import listen_address, serve
from tests.test_enrollment import make_csr, p256

OLD_PASSWORD = "json log old password 1"
NEW_PASSWORD = "json log new password 2"


def key_forms(key: ec.EllipticCurvePrivateKey) -> list[str]:
    """A private key as it could leak: its DER in hex and base64, its PEM body."""
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    return [
        der.hex(),
        base64.b64encode(der).decode(),
        scalar.hex(),
        base64.b64encode(scalar).decode(),
    ]


def agent(listen: str, key: ec.EllipticCurvePrivateKey, issued: Any) -> KeyplaneClient:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    credential = Credential(
        issued.certificate_chain_pem.encode(), pem, issued.roots_pem.encode(), Path()
    )
    return KeyplaneClient(channel_for(listen, credential), timeout=10)


def quiet_env() -> dict[str, str]:
    """The environment a user who set nothing about gRPC's logging starts keyplane in."""
    return {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}


@pytest.mark.timeout(120)
def test_a_json_log_has_every_change_as_an_event_and_no_secret(tmp_path: Path) -> None:
    password = tmp_path / "pki-db-password"
    password.write_text(OLD_PASSWORD + "\n")
    data = tmp_path / "data"
    process = serve(
        data,
        tmp_path / "serve",
        "--log-format",
        "json",
        "--password-file",
        str(password),
        env=quiet_env(),
        clean_env=True,
    )
    try:
        listen = listen_address(data)
        note = json.loads((data / "admin" / "endpoint.json").read_text())
        admin_credential = load_credential(data / "admin")
        roots = admin_credential.root_certificates_pem
        with KeyplaneClient.connect(listen, admin_credential) as admin:
            token = admin.create_enrollment_token(uses=1).token
            agent_key, renewed_key = p256(), p256()
            with KeyplaneClient(bootstrap_channel_for(note["bootstrap_listen"], roots)) as anon:
                issued = anon.enroll(make_csr(agent_key, cn="logged-agent"), token)
            with agent(listen, agent_key, issued) as holder:
                renewed = holder.renew(make_csr(renewed_key, cn="logged-agent"))
            admin.revoke_certificate(renewed.serial, "lost laptop")
            admin.update_setting("PKIDatabasePassword", NEW_PASSWORD)
            admin.rotate_key("message-signing")
            archive = b"".join(chunk.chunk for chunk in admin.create_backup())
        # A client without a certificate at the mutual-TLS listener: its handshake
        # fails, which gRPC's C core would log (ssl_transport_security.cc).
        with KeyplaneClient(bootstrap_channel_for(listen, roots), timeout=5) as stranger:
            with pytest.raises(KeyplaneClientError) as refused:
                stranger.list_keys()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        assert process.stop() == 0
    stderr = process.stderr()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # every line, or this fails
    for entry in entries:
        assert {"time", "level", "logger", "event", "message"} <= entry.keys(), entry
    events: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        events.setdefault(entry["event"], []).append(entry)

    agent_fp = issued_fingerprint(agent_key)
    enrolled = one(events, "certificate.issue", target=issued.serial)
    assert enrolled["level"] == "info"
    assert enrolled["rpc"] == "/keyplane.v1.EnrollmentService/Enroll"
    assert enrolled["caller"] == "enrollment (logged-agent)"
    assert enrolled["fingerprint"] == agent_fp
    again = one(events, "certificate.issue", target=renewed.serial)
    assert again["rpc"] == "/keyplane.v1.EnrollmentService/Renew"
    assert again["details"]["renews"] == issued.serial
    assert again["caller"].startswith("logged-agent (serial ")
    assert again["fingerprint"] == issued_fingerprint(renewed_key)
    revoked = one(events, "certificate.revoke", target=renewed.serial)
    assert revoked["rpc"] == "/keyplane.v1.CertificateService/RevokeCertificate"
    assert revoked["caller"].startswith("admin@pki.test (serial ")
    assert revoked["fingerprint"] == issued_fingerprint(renewed_key)
    assert revoked["details"]["reason"] == "lost laptop"
    setting = one(events, "setting.update", target="PKIDatabasePassword")
    assert setting["rpc"] == "/keyplane.v1.SettingsService/UpdateSetting"
    assert setting["details"]["value"] == "********"
    created = events["token.create"][-1]
    assert created["rpc"] == "/keyplane.v1.CertificateService/CreateEnrollmentToken"
    assert one(events, "backup.create")["rpc"] == "/keyplane.v1.BackupService/CreateBackup"
    rotation = [e for e in events["key.prepare"] if e.get("rpc", "").endswith("/RotateKey")]
    assert rotation and rotation[0]["details"]["kind"] == "message_signing"
    assert any(e.get("rpc", "").endswith("/RotateKey") for e in events["trust_state.publish"])

    # Nothing of a secret anywhere in what the server wrote.
    everything = stderr + process.stdout()
    assert "-----BEGIN" not in everything and "PRIVATE KEY" not in everything
    assert "ssl_transport_security" not in everything and "Handshake failed" not in everything
    secrets = [token, token.split("_")[-1], OLD_PASSWORD, NEW_PASSWORD]
    secrets += key_forms(agent_key) + key_forms(renewed_key)
    admin_key = serialization.load_pem_private_key(admin_credential.private_key_pem, None)
    assert isinstance(admin_key, ec.EllipticCurvePrivateKey)
    secrets += key_forms(admin_key)
    for secret in secrets:
        assert secret not in everything
    assert archive  # the backup came through (it holds sealed keys; the log does not)


def test_grpc_core_logging_stays_quiet_unless_asked_for() -> None:
    asked: dict[str, str] = {"GRPC_VERBOSITY": "INFO"}
    quiet_grpc_core(asked)
    assert asked == {"GRPC_VERBOSITY": "INFO"}
    tracing: dict[str, str] = {"GRPC_TRACE": "handshaker"}
    quiet_grpc_core(tracing)
    assert tracing["GRPC_VERBOSITY"] == "DEBUG"
    quiet: dict[str, str] = {}
    quiet_grpc_core(quiet)
    assert quiet == {"GRPC_VERBOSITY": "NONE"}


def issued_fingerprint(key: ec.EllipticCurvePrivateKey) -> str:
    return fingerprint(key.public_key())


def one(events: dict[str, list[dict[str, Any]]], event: str, **fields: str) -> dict[str, Any]:
    found = [e for e in events.get(event, []) if all(e.get(k) == v for k, v in fields.items())]
    assert len(found) == 1, (event, fields, events.get(event))
    return found[0]
