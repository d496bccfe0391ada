"""People's identities: what CreateIdentity certifies and refuses, how they are listed,
and that a revoked one is refused at once; then `keyplane identities` against a real
`keyplane serve`, with the credential it writes used through `--credentials DIR`."""

from __future__ import annotations

import datetime
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.trust import load
from keyplane.server.domain import certs
from keyplane.v1 import identity_service_pb2 as pb
from tests.serverkit import RunningServer, ServerProcess, openssl_verify, run_cli
from tests.test_enrollment import make_csr, p256
from tests.test_roles import new_identity, snapshot_state


def _refused(code: grpc.StatusCode, call: object, *args: object) -> KeyplaneClientError:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code == code, caught.value
    return caught.value


def _audit(server: RunningServer) -> list[tuple[str, str, object]]:
    return [
        (a.action, a.target, a.details.get("name"))
        for a in server.hierarchy.store.audit_log(1_000_000)
    ]


def test_an_identity_is_a_root_issued_client_certificate_with_its_role(
    server: RunningServer, admin: KeyplaneClient, tmp_path: Path
) -> None:
    key = p256()
    created = admin.create_identity(
        "alice@example.org", "operator", make_csr(key, cn="alice@example.org")
    )
    identity = created.identity
    assert identity.name == "alice@example.org"
    assert identity.role == pb.IDENTITY_ROLE_OPERATOR
    assert identity.state == pb.IDENTITY_STATE_LIVE
    cert = x509.load_pem_x509_certificate(created.certificate_pem.encode())
    assert certs.common_name_of(cert) == "alice@example.org"
    assert certs.roles_of(cert) == {"operator"}
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert (
        datetime.timedelta(days=90)
        <= lifetime
        <= datetime.timedelta(days=90, minutes=1) + certs.BACKDATE
    )
    newest = max(admin.list_root_keys().active, key=lambda r: r.number)
    assert identity.issuer_fingerprint == newest.fingerprint
    assert created.roots_pem.encode() == (server.admin_dir / "ca.pem").read_bytes()
    verified = openssl_verify(tmp_path / "v", created.roots_pem, created.certificate_pem)
    assert verified.returncode == 0, verified.stderr
    # Recorded with every other certificate, and audited.
    record = server.hierarchy.store.certificate(identity.serial)
    assert record is not None and record.role == "operator"
    assert ("identity.create", identity.serial, "alice@example.org") in _audit(server)


@pytest.mark.parametrize(
    ("name", "role", "csr_cn", "code", "words"),
    [
        ("", "operator", "x", grpc.StatusCode.INVALID_ARGUMENT, "identity's name is"),
        ("bad name", "operator", "bad name", grpc.StatusCode.INVALID_ARGUMENT, "name is"),
        ("a" * 129, "operator", "a", grpc.StatusCode.INVALID_ARGUMENT, "name is"),
        ("bob", "", "bob", grpc.StatusCode.INVALID_ARGUMENT, "admin, operator, auditor"),
        ("bob", "agent", "bob", grpc.StatusCode.INVALID_ARGUMENT, "admin, operator, auditor"),
        ("bob", "operator", "mallory", grpc.StatusCode.INVALID_ARGUMENT, "common name must be"),
        ("admin@pki.test", "admin", "admin@pki.test", grpc.StatusCode.ALREADY_EXISTS, "revoke"),
    ],
)
def test_bad_requests_are_refused_precisely_and_nothing_changes(
    server: RunningServer,
    admin: KeyplaneClient,
    name: str,
    role: str,
    csr_cn: str,
    code: grpc.StatusCode,
    words: str,
) -> None:
    before = snapshot_state(server)
    csr = make_csr(p256(), cn=csr_cn)
    error = _refused(code, admin.create_identity, name, role, csr)
    assert words in error.message
    assert snapshot_state(server) == before


def test_an_unknown_role_number_and_bad_csrs_are_refused(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    before = snapshot_state(server)
    from keyplane.v1 import identity_service_pb2_grpc

    stub = identity_service_pb2_grpc.IdentityServiceStub(admin._channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateIdentity(
            pb.CreateIdentityRequest(name="bob", role=99, csr=make_csr(p256(), cn="bob")),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown identity role 99" in caught.value.details()
    for csr, words in (
        (b"", "empty"),
        (b"not a csr", "does not parse"),
        (make_csr(ec.generate_private_key(ec.SECP521R1()), cn="bob"), "not accepted"),
    ):
        error = _refused(
            grpc.StatusCode.INVALID_ARGUMENT, admin.create_identity, "bob", "auditor", csr
        )
        assert words in error.message
    assert snapshot_state(server) == before


def test_a_key_is_certified_once_and_a_name_is_free_again_once_revoked(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    key = p256()
    first = admin.create_identity("carol", "auditor", make_csr(key, cn="carol"))
    error = _refused(
        grpc.StatusCode.ALREADY_EXISTS,
        admin.create_identity,
        "carol",
        "auditor",
        make_csr(p256(), cn="carol"),
    )
    assert "live identity is named 'carol'" in error.message
    admin.revoke_identity("carol", "rotated", True)
    # The same key never again, under any name.
    error = _refused(
        grpc.StatusCode.ALREADY_EXISTS,
        admin.create_identity,
        "carol",
        "auditor",
        make_csr(key, cn="carol"),
    )
    assert "revoked" in error.message
    again = admin.create_identity("carol", "admin", make_csr(p256(), cn="carol"))
    assert again.identity.serial != first.identity.serial
    live = admin.list_identities()
    assert [(i.name, i.role) for i in live] == [
        ("admin@pki.test", pb.IDENTITY_ROLE_ADMIN),
        ("carol", pb.IDENTITY_ROLE_ADMIN),
    ]
    every = admin.list_identities(include_revoked=True)
    carols = [(i.serial, i.state, i.revoke_reason) for i in every if i.name == "carol"]
    assert carols == [
        (again.identity.serial, pb.IDENTITY_STATE_LIVE, ""),
        (first.identity.serial, pb.IDENTITY_STATE_REVOKED, "rotated"),
    ]


def test_a_revoked_identity_is_refused_at_once_and_published(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    dave = new_identity(admin, "dave", "operator")
    serial = next(i.serial for i in admin.list_identities() if i.name == "dave")
    with dave.client(server) as client:
        assert client.list_identities()
        version = server.hierarchy.trust.latest_version()
        error = _refused(
            grpc.StatusCode.FAILED_PRECONDITION, admin.revoke_identity, "dave", "x", False
        )
        assert error.reason == "CONFIRMATION_REQUIRED"
        revoked = admin.revoke_identity("dave", "left the team", True)
        assert [(i.serial, i.state) for i in revoked] == [(serial, pb.IDENTITY_STATE_REVOKED)]
        # Published in the same step, and refused on the very next call.
        assert server.hierarchy.trust.latest_version() == version + 1
        latest = load(admin.get_trust_state(0)[-1].SerializeToString())
        assert serial in latest.body.revoked_serials
        error = _refused(grpc.StatusCode.PERMISSION_DENIED, client.list_identities)
        assert "revoked (left the team)" in error.message
    assert ("identity.revoke", serial, "dave") in _audit(server)
    _refused(grpc.StatusCode.NOT_FOUND, admin.revoke_identity, "dave", "again", True)
    _refused(grpc.StatusCode.INVALID_ARGUMENT, admin.revoke_identity, "erin", "", True)


def test_revoking_ones_own_identity_needs_force(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    boss = new_identity(admin, "boss", "admin")
    with boss.client(server) as client:
        before = snapshot_state(server)
        error = _refused(
            grpc.StatusCode.FAILED_PRECONDITION, client.revoke_identity, "boss", "x", True
        )
        assert error.reason == "REVOKES_CALLER"
        assert snapshot_state(server) == before
        assert client.revoke_identity("boss", "leaving", True, True)[0].state == (
            pb.IDENTITY_STATE_REVOKED
        )
        _refused(grpc.StatusCode.PERMISSION_DENIED, client.list_identities)


def test_a_revocation_that_cannot_be_published_is_not_made(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    new_identity(admin, "frank", "auditor")
    before = snapshot_state(server)
    server.hierarchy.faults.fail_at = "trust.sign"
    try:
        error = _refused(grpc.StatusCode.UNAVAILABLE, admin.revoke_identity, "frank", "x", True)
        assert "not revoked" in error.message and "nothing changed" in error.message
        assert snapshot_state(server) == before
    finally:
        server.hierarchy.faults.fail_at = ""
    assert admin.revoke_identity("frank", "x", True)[0].state == pb.IDENTITY_STATE_REVOKED


# -- the CLI -------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data")
    yield process
    assert process.stop() == 0


def _cli(data: Path, *args: str) -> object:
    result = run_cli(*args, "--json", data_dir=data)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_identities_create_list_revoke_through_the_cli(
    served: ServerProcess, tmp_path: Path
) -> None:
    data = served.data_dir
    out = tmp_path / "olivia"
    created = _cli(
        data, "identities", "create", "olivia@example.org", "--role", "operator", "--out", str(out)
    )
    assert isinstance(created, dict)
    assert created["name"] == "olivia@example.org" and created["role"] == "operator"
    assert created["state"] == "live" and created["credentials_dir"] == str(out)
    assert stat.S_IMODE((out / "admin.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in (out / "admin.pem").read_bytes()
    assert (out / "ca.pem").read_bytes() == (data / "admin" / "ca.pem").read_bytes()
    # The credential works as --credentials DIR, with the operator's rights and no more.
    as_operator = run_cli("tokens", "create", "--json", "--credentials", str(out), data_dir=data)
    assert as_operator.returncode == 0, as_operator.stderr
    refused = run_cli("roots", "create", "--credentials", str(out), data_dir=data)
    assert refused.returncode == 1
    assert refused.stderr.startswith("keyplane: PERMISSION_DENIED: ")
    refused = run_cli(
        "identities", "create", "eve", "--role", "admin", "--out", str(tmp_path / "eve"),
        "--credentials", str(out), data_dir=data,
    )  # fmt: skip
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    # Never over an existing credential; a taken name is refused.
    again = run_cli(
        "identities", "create", "other", "--role", "auditor", "--out", str(out), data_dir=data
    )
    assert again.returncode == 1 and "never overwritten" in again.stderr
    taken = run_cli(
        "identities", "create", "olivia@example.org", "--role", "auditor",
        "--out", str(tmp_path / "twice"), data_dir=data,
    )  # fmt: skip
    assert taken.returncode == 1 and "ALREADY_EXISTS" in taken.stderr
    assert not (tmp_path / "twice").exists()
    listed = _cli(data, "identities", "list")
    assert isinstance(listed, list)
    assert [(i["name"], i["role"]) for i in listed] == [
        ("admin@pki.test", "admin"),
        ("olivia@example.org", "operator"),
    ]
    table = run_cli("identities", "list", data_dir=data)
    assert table.stdout.splitlines()[0].split() == [
        "NAME",
        "ROLE",
        "STATE",
        "SERIAL",
        "NOT",
        "AFTER",
    ]
    unconfirmed = run_cli(
        "identities", "revoke", "olivia@example.org", "--reason", "left", data_dir=data
    )
    assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
    revoked = _cli(data, "identities", "revoke", "olivia@example.org", "--reason", "left", "--yes")
    assert isinstance(revoked, list) and revoked[0]["state"] == "revoked"
    assert revoked[0]["revoke_reason"] == "left"
    after = run_cli("certs", "list", "--credentials", str(out), data_dir=data)
    assert after.returncode == 1 and "revoked" in after.stderr
    every = _cli(data, "identities", "list", "--all")
    assert isinstance(every, list)
    assert [(i["name"], i["state"]) for i in every] == [
        ("admin@pki.test", "live"),
        ("olivia@example.org", "revoked"),
    ]


def test_revoking_the_calling_identity_through_the_cli_needs_force(
    served: ServerProcess, tmp_path: Path
) -> None:
    data = served.data_dir
    out = tmp_path / "boss"
    _cli(data, "identities", "create", "boss", "--role", "admin", "--out", str(out))
    own = (
        "identities",
        "revoke",
        "boss",
        "--reason",
        "leaving",
        "--yes",
        "--credentials",
        str(out),
    )
    refused = run_cli(*own, data_dir=data)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert run_cli(*own, "--force", data_dir=data).returncode == 0


def test_identities_help_says_what_and_shows_an_example() -> None:
    for verb in ("create", "list", "revoke"):
        result = run_cli("identities", verb, "--help", data_dir=Path("unused"))
        assert result.returncode == 0
        assert f"keyplane identities {verb}" in result.stdout.split("example:")[1]
