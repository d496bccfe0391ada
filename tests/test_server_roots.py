"""Root keys end to end over a real gRPC server with the software backend."""

from __future__ import annotations

import datetime
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.credentials import load_credential
from keyplane.v1 import common_pb2
from keyplane.v1 import root_key_service_pb2 as pb
from tests.serverkit import FQDN, RunningServer, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data") as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[KeyplaneClient]:
    with server.admin_client() as c:
        yield c


def software_key_ids(data_dir: Path) -> set[str]:
    with sqlite3.connect(data_dir / "pki.db") as db:
        return {row[0] for row in db.execute("SELECT id FROM keys")}


def audit_actions(data_dir: Path) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(data_dir / "keyplane.db")
    try:
        return list(db.execute("SELECT actor, action, target FROM audit ORDER BY id"))
    finally:
        db.close()


def openssl_verify(
    tmp_path: Path, roots_pem: str, chain_pem: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "roots.pem").write_text(roots_pem)
    certs = x509.load_pem_x509_certificates(chain_pem.encode())
    (tmp_path / "leaf.pem").write_bytes(certs[0].public_bytes(encoding=_PEM))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-CAfile",
            str(tmp_path / "roots.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

_PEM = Encoding.PEM


def test_first_start_creates_root_legacy_tls_and_admin_credential(
    server: RunningServer, client: KeyplaneClient, tmp_path: Path
) -> None:
    listing = client.list_root_keys()
    assert [r.name for r in listing.active] == [f"{FQDN} Root 0"]
    root = listing.active[0]
    assert root.number == 0 and root.backend == "software"
    assert root.key_uri.startswith("software:")
    assert listing.legacy.name == "legacy-root"
    assert listing.legacy.public_key_pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert not listing.revoked

    cert = x509.load_pem_x509_certificate(root.certificate_pem.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject == cert.issuer
    result = openssl_verify(tmp_path, root.certificate_pem, root.certificate_pem)
    assert result.returncode == 0, result.stderr

    credential = server.admin_dir / "admin.pem"
    assert stat.S_IMODE(credential.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.config.data_dir.stat().st_mode) == 0o700
    result = openssl_verify(tmp_path, root.certificate_pem, credential.read_text())
    assert result.returncode == 0, result.stderr
    actions = [a for _, a, _ in audit_actions(server.config.data_dir)]
    assert actions[:2] == ["root.create", "legacy_root.create"]


def test_server_tls_chain_is_accepted_by_openssl_and_cryptography(
    server: RunningServer, tmp_path: Path
) -> None:
    material = server.hierarchy.tls_material()
    chain = x509.load_pem_x509_certificates(material.certificate_chain_pem)
    roots = x509.load_pem_x509_certificates(material.client_ca_pem)
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(datetime.datetime.now(datetime.UTC))
        .build_server_verifier(x509.DNSName(FQDN))
    )
    built = verifier.verify(chain[0], chain[1:])
    assert built[-1] == roots[0]
    result = openssl_verify(
        tmp_path, material.client_ca_pem.decode(), material.certificate_chain_pem.decode()
    )
    assert result.returncode == 0, result.stderr
    leaf = chain[0]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.serial_number.bit_length() > 64
    assert leaf.not_valid_before_utc < datetime.datetime.now(datetime.UTC)


def test_restart_reuses_everything_and_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data) as first, first.admin_client() as c:
        before = c.list_root_keys()
        keys_before = software_key_ids(data)
        assert first.server.report is not None and "root" in first.server.report.created
    with running_server(data) as second, second.admin_client() as c:
        after = c.list_root_keys()
        assert second.server.report is not None and second.server.report.created == ()
    assert [r.fingerprint for r in after.active] == [r.fingerprint for r in before.active]
    assert after.legacy.fingerprint == before.legacy.fingerprint
    assert software_key_ids(data) == keys_before


def test_create_root_names_it_one_above_the_highest_and_reissues_server_tls(
    server: RunningServer, client: KeyplaneClient
) -> None:
    first = client.list_root_keys().active[0]
    created = client.create_root_key("ec-p384")
    assert created.name == f"{FQDN} Root 1" and created.number == 1
    assert created.algorithm == common_pb2.KEY_ALGORITHM_EC_P384
    assert {r.fingerprint for r in client.list_root_keys().active} == {
        first.fingerprint,
        created.fingerprint,
    }
    # The server's TLS key is now issued by the newest root.
    assert server.hierarchy.current_server_tls().issuer_fingerprint == created.fingerprint
    assert ("root.create", created.fingerprint) in [
        (a, t) for _, a, t in audit_actions(server.config.data_dir)
    ]


def test_a_third_active_root_is_refused_and_leaves_no_key(
    server: RunningServer, client: KeyplaneClient
) -> None:
    client.create_root_key()
    keys_before = software_key_ids(server.config.data_dir)
    with pytest.raises(KeyplaneClientError) as caught:
        client.create_root_key()
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "ROOT_LIMIT_REACHED"
    assert "revoke one" in caught.value.message
    assert software_key_ids(server.config.data_dir) == keys_before
    assert len(client.list_root_keys().active) == 2


def test_revoke_rotates_and_destroys_the_private_key(
    server: RunningServer, client: KeyplaneClient
) -> None:
    old = client.list_root_keys().active[0]
    new = client.create_root_key()
    old_key_id = old.key_uri.removeprefix("software:")
    assert old_key_id in software_key_ids(server.config.data_dir)

    revoked = client.revoke_root_key(
        "sha256:" + old.fingerprint.upper(), "scheduled rotation", True
    )
    assert revoked.state == pb.ROOT_KEY_STATE_REVOKED
    assert revoked.revoke_reason == "scheduled rotation"
    assert revoked.revoked_by.startswith(f"admin@{FQDN}")
    assert revoked.HasField("revoke_time")
    assert old_key_id not in software_key_ids(server.config.data_dir)

    # This connection's credential came from the revoked root; the re-issued one works.
    with pytest.raises(KeyplaneClientError) as caught:
        client.list_root_keys()
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    client = server.admin_client()
    listing = client.list_root_keys()
    assert [r.fingerprint for r in listing.active] == [new.fingerprint]
    assert [r.fingerprint for r in listing.revoked] == [old.fingerprint]
    assert client.get_root_key(old.fingerprint).state == pb.ROOT_KEY_STATE_REVOKED
    actions = audit_actions(server.config.data_dir)
    assert any(a == "root.revoke" and t == old.fingerprint for _, a, t in actions)
    # A new root after a revocation still counts up from the highest ever used.
    assert client.create_root_key().number == 2
    client.close()


def test_revoked_root_no_longer_authenticates_its_credentials(
    server: RunningServer, client: KeyplaneClient
) -> None:
    old_credential = load_credential(server.admin_dir)
    old = client.list_root_keys().active[0]
    client.create_root_key()
    client.revoke_root_key(old.fingerprint, "compromised", True)
    # The admin credential on disk was re-issued under the new root and works.
    with server.admin_client() as fresh:
        assert len(fresh.list_root_keys().active) == 1
    # The credential issued by the revoked root does not.
    creds = grpc.ssl_channel_credentials(
        old_credential.root_certificates_pem,
        old_credential.private_key_pem,
        old_credential.certificate_chain_pem,
    )
    with grpc.secure_channel(server.listen, creds) as channel:
        stale = KeyplaneClient(channel, timeout=10)
        with pytest.raises(KeyplaneClientError) as caught:
            stale.list_root_keys()
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize(
    ("fingerprint", "reason", "confirm", "code", "why"),
    [
        ("not-hex", "r", True, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("ab" * 32, "r", True, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        ("ROOT", "", True, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("ROOT", "line\nbreak", True, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("ROOT", "r", False, grpc.StatusCode.FAILED_PRECONDITION, "CONFIRMATION_REQUIRED"),
        ("ROOT", "r", True, grpc.StatusCode.FAILED_PRECONDITION, "LAST_ACTIVE_ROOT"),
        ("LEGACY", "r", True, grpc.StatusCode.FAILED_PRECONDITION, "LEGACY_ROOT_IMMUTABLE"),
    ],
)
def test_revoke_refuses_bad_requests_and_keeps_the_root(
    client: KeyplaneClient,
    fingerprint: str,
    reason: str,
    confirm: bool,
    code: grpc.StatusCode,
    why: str,
) -> None:
    listing = client.list_root_keys()
    target = {"ROOT": listing.active[0].fingerprint, "LEGACY": listing.legacy.fingerprint}.get(
        fingerprint, fingerprint
    )
    with pytest.raises(KeyplaneClientError) as caught:
        client.revoke_root_key(target, reason, confirm)
    assert caught.value.code == code
    assert caught.value.reason == why
    assert caught.value.message and "Traceback" not in caught.value.message
    assert [r.fingerprint for r in client.list_root_keys().active] == [
        listing.active[0].fingerprint
    ]


def test_revoking_twice_is_a_failed_precondition(
    server: RunningServer, client: KeyplaneClient
) -> None:
    old = client.list_root_keys().active[0]
    client.create_root_key()
    client.revoke_root_key(old.fingerprint, "rotation", True)
    with server.admin_client() as fresh, pytest.raises(KeyplaneClientError) as caught:
        fresh.revoke_root_key(old.fingerprint, "rotation", True)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "ALREADY_REVOKED"


def test_get_root_and_legacy_root(client: KeyplaneClient) -> None:
    listing = client.list_root_keys()
    root = client.get_root_key(listing.active[0].fingerprint)
    assert root == listing.active[0]
    legacy = client.get_legacy_root_key()
    assert legacy.fingerprint == listing.legacy.fingerprint
    with pytest.raises(KeyplaneClientError) as caught:
        client.get_root_key("cd" * 32)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(KeyplaneClientError) as caught:
        client.get_root_key(legacy.fingerprint)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
