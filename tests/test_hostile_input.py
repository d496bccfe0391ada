"""Hostile input, one table: every RPC that takes input (found by walking the served
descriptors, so a new RPC without a row fails here) gets garbage protobuf, missing and
oversized fields, bad enums, damaged PEM and DER, CSRs that lie or carry weak keys,
replayed and duplicate requests, unknown ids and fingerprints. Each row asserts the
exact status and that nothing was stored or changed: every table of keyplane.db and
pki.db (counts, highest ids and a digest of the rows) and the audit log but for the
refusals it records. Damaged files at start (truncated or corrupt keyplane.db and
pki.db, a wrong password) and a locked server's Unlock are at the end."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from google.protobuf import message_factory, symbol_database

from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.clients.renewal import renewal_proof
from keyplane.server.app import SERVICE_NAMES
from keyplane.server.auth import ACCESS, PUBLIC
from keyplane.server.kinds import Role
from keyplane.v1 import enrollment_service_pb2 as enroll_pb
from tests.hostile_kit import server_state
from tests.hostile_rows import HEALTH, ROWS, Row, World
from tests.invariants import check_invariants
from tests.serverkit import FQDN, KEYPLANE, ServerProcess, running_server
from tests.test_enrollment import make_csr, p256
from tests.zonekit import enroll_fake_zone, key_pem, mtls_channel


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_server(tmp_path_factory.mktemp("hostile") / "data") as server:
        roots = (server.admin_dir / "ca.pem").read_bytes()
        with server.admin_client() as admin:
            token = admin.create_enrollment_token(uses=50).token
            zone_token = admin.create_enrollment_token(uses=5, role="zone-server").token
            root = admin.list_root_keys().active[0].fingerprint
            person_key = p256()
            person = admin.create_identity(
                "pat@example.org", "auditor", make_csr(person_key, cn="pat@example.org")
            )
        nobody = bootstrap_channel_for(server.bootstrap, roots)
        with KeyplaneClient(bootstrap_channel_for(server.bootstrap, roots)) as anonymous:
            agent_key = p256()
            enrolled_csr = make_csr(agent_key, cn="agent-h")
            agent = anonymous.enroll(enrolled_csr, token)
            victim = anonymous.enroll(make_csr(p256(), cn="victim"), token)
            mover_key = p256()
            mover = anonymous.enroll(make_csr(mover_key, cn="mover"), token)
            csr = make_csr(p256(), cn="mover")
            leaf = x509.load_pem_x509_certificate(mover.certificate_chain_pem.encode())
            proof, made = renewal_proof(mover_key, leaf, csr, FQDN)
            renewed = enroll_pb.RenewWithProofRequest(
                csr=csr,
                certificate_chain_pem=mover.certificate_chain_pem,
                proof=proof,
                proof_time=made,
            )
            anonymous.renew_with_proof(csr, mover.certificate_chain_pem, proof, made)
        with server.admin_client() as admin:
            admin.revoke_certificate(victim.serial, "stolen")
        zone = enroll_fake_zone(server.bootstrap, roots, zone_token, name="zone-h")
        channels = {
            "nobody": nobody,
            "admin": mtls_channel(
                server.listen,
                *_admin_pem(server.admin_dir),
                roots,
            ),
            "agent": mtls_channel(
                server.listen, agent.certificate_chain_pem.encode(), key_pem(agent_key), roots
            ),
            "zone": zone.channel(server.listen, roots),
            "auditor": mtls_channel(
                server.listen, person.certificate_pem.encode(), key_pem(person_key), roots
            ),
        }
        for channel in channels.values():
            grpc.channel_ready_future(channel).result(timeout=10)
        yield World(
            server,
            channels,
            token,
            zone_token,
            agent_key,
            agent.certificate_chain_pem,
            agent.serial,
            enrolled_csr,
            victim.serial,
            renewed,
            mover_key,
            mover.certificate_chain_pem,
            zone,
            root,
            person.identity.serial,
        )
        for channel in channels.values():
            channel.close()


def _admin_pem(admin_dir: Path) -> tuple[bytes, bytes]:
    text = (admin_dir / "admin.pem").read_bytes()
    cut = text.index(b"-----BEGIN PRIVATE KEY-----")
    return text[:cut], text[cut:]


# -- calling a method with whatever bytes ---------------------------------------------------


def _methods() -> dict[str, tuple[Any, bool]]:
    """Every served method: path -> (request class, server-streaming)."""
    from grpc_health.v1 import health_pb2  # noqa: F401 - registers its types

    pool = symbol_database.Default().pool
    found = {}
    for service_name in (*SERVICE_NAMES, HEALTH):
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            found[f"/{service.full_name}/{method.name}"] = (
                message_factory.GetMessageClass(method.input_type),
                method.server_streaming,
            )
    return found


METHODS = _methods()


def call(channel: grpc.Channel, path: str, request: object) -> tuple[str, str]:
    """(status name, details) of one call; `request` is a message or raw bytes."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()  # type: ignore[attr-defined]
    try:
        if METHODS[path][1]:
            stream = channel.unary_stream(path)(raw, timeout=2)
            for _ in stream:
                stream.cancel()
                break
        else:
            channel.unary_unary(path)(raw, timeout=30)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return "OK", ""
        return exc.code().name, exc.details() or ""
    return "OK", ""


def caller_for(path: str) -> str:
    """A caller the access table lets in, so that the input is what gets judged."""
    access = ACCESS[path]
    if access is PUBLIC:
        return "nobody"
    if Role.ADMIN in access:  # type: ignore[operator]
        return "admin"
    return "agent" if Role.AGENT in access else "zone"  # type: ignore[operator]


# -- the table ----------------------------------------------------------------------------

# Garbage protobuf, for every served method: a field 1 whose length runs past the end.
GARBAGE = {
    "a truncated field": b"\x0a\xff\xff\xff\x0f\x01",
    "a bad wire type": b"\x0f\x01\x02",
    "random bytes": bytes(range(7, 250, 3)),
}
GARBAGE_ROWS = [
    Row(
        path.lstrip("/").removeprefix("keyplane.v1."),
        f"garbage protobuf: {what}",
        lambda w, b=raw: b,
        "INVALID_ARGUMENT",
    )
    for path in METHODS
    for what, raw in GARBAGE.items()
]


def test_every_rpc_that_takes_input_has_rows() -> None:
    """A method whose request has fields needs rows of its own (garbage is not enough);
    a new RPC without any fails here."""
    covered = {r.path for r in ROWS}
    missing = [
        path
        for path, (request, _) in METHODS.items()
        if request.DESCRIPTOR.fields
        and path not in covered
        # Health's Watch and List take what Check takes.
        and not (path.startswith(f"/{HEALTH}/") and path != f"/{HEALTH}/Check")
    ]
    assert not missing, f"these take input but have no row in tests/hostile_rows.py: {missing}"
    assert {r.path for r in GARBAGE_ROWS} == set(METHODS)


@pytest.mark.parametrize("row", [*ROWS, *GARBAGE_ROWS], ids=str)
def test_hostile_input_is_refused_with_its_status_and_changes_nothing(
    world: World, row: Row
) -> None:
    channel = world.channels[row.caller or caller_for(row.path)]
    request = row.build(world)
    before = server_state(world.data)
    code, details = call(channel, row.path, request)
    assert code == row.code, (row.path, row.what, code, details)
    assert row.says.lower() in details.lower(), (row.what, details)
    assert "Traceback" not in details and "internal error" not in details
    assert server_state(world.data) == before, f"{row}: something changed"


def test_the_server_holds_every_invariant_after_the_matrix(world: World) -> None:
    check_invariants(world.data)


def test_the_state_snapshot_sees_a_change(world: World) -> None:
    """The matrix's 'nothing changed' is not vacuous: one enrollment shows in it."""
    before = server_state(world.data)
    with KeyplaneClient(world.channels["nobody"]) as client:
        client.enroll(make_csr(p256(), cn="changes-something"), world.token)
    assert server_state(world.data) != before


# -- damaged files, wrong passwords ---------------------------------------------------------


def _files(data: Path) -> dict[str, str]:
    """The data dir's own files by content (SQLite's -wal and -shm are rebuilt)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data.iterdir())
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


def _overwrite(path: Path, offset: int, size: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = b"\xde\xad" * (size // 2)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _reseal_one_byte(data: Path) -> None:
    with closing(sqlite3.connect(data / "pki.db")) as db:
        key_id, sealed = db.execute("SELECT id, sealed FROM keys LIMIT 1").fetchone()
        db.execute("UPDATE keys SET sealed = ? WHERE id = ?", (sealed[:-1] + b"\x00", key_id))
        db.commit()


DAMAGE: dict[str, tuple[Callable[[Path], None], int, str]] = {
    "keyplane.db truncated": (lambda d: _truncate(d / "keyplane.db"), 2, "keyplane.db in"),
    "keyplane.db pages overwritten": (
        lambda d: _overwrite(d / "keyplane.db", 8192, 8192),
        2,
        "is damaged",
    ),
    "keyplane.db header overwritten": (
        lambda d: _overwrite(d / "keyplane.db", 0, 100),
        2,
        "file is not a database",
    ),
    "pki.db truncated": (lambda d: _truncate(d / "pki.db"), 1, "cannot open the PKI database"),
    "pki.db header overwritten": (
        lambda d: _overwrite(d / "pki.db", 0, 100),
        1,
        "cannot open the PKI database",
    ),
    "a sealed key changed in pki.db": (_reseal_one_byte, 1, "does not unseal"),
    "a wrong key file": (
        lambda d: (d / "pki.db.key").write_bytes(bytes(32)),
        1,
        "key file is wrong",
    ),
}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir after one clean start and stop, copied by each test."""
    data = tmp_path_factory.mktemp("stopped") / "data"
    assert ServerProcess(data).stop() == 0
    return data


def _serve(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            KEYPLANE,
            "serve",
            "--data-dir",
            str(data),
            "--fqdn",
            FQDN,
            "--listen",
            "127.0.0.1:0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # At the default log level (make test-secrets sets DEBUG): one line is the claim.
        env={k: v for k, v in os.environ.items() if k != "KEYPLANE_LOG_LEVEL"},
    )


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_data_dir_is_refused_in_one_line_and_left_as_it_was(
    damage: str, stopped: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(stopped, data)
    spoil, status, says = DAMAGE[damage]
    spoil(data)
    before = _files(data)
    result = _serve(data)
    assert result.returncode == status, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert says in line, line
    assert _files(data) == before


def test_a_wrong_database_password_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text("the right password, long\n")
    wrong.write_text("not the right password\n")
    data = tmp_path / "data"
    assert ServerProcess(data, "--password-file", str(right)).stop() == 0
    before = _files(data)
    result = _serve(data, "--password-file", str(wrong))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "not the right password" not in result.stderr
    assert "password" in result.stderr
    assert _files(data) == before
    check_invariants(data)


def test_a_locked_servers_unlock_refuses_hostile_input(tmp_path: Path) -> None:
    """Unlock, on a locked server's 0600 socket: garbage, an empty, a long and a wrong
    password are refused with their status; the server stays locked and its data
    dir as it was; the right password still opens it."""
    from keyplane.v1 import unlock_service_pb2
    from tests.test_locked_start import LockedServer

    password = tmp_path / "password"
    password.write_text("the locked start password\n")
    data = tmp_path / "data"
    assert ServerProcess(data, "--password-file", str(password)).stop() == 0
    before = _files(data)
    server = LockedServer(data, "--listen", "127.0.0.1:0")
    try:
        server.wait_for(server.socket)
        path = "/keyplane.v1.UnlockService/Unlock"
        rows = [
            (b"\x0a\xff\xff\xff\x0f", "INVALID_ARGUMENT"),
            (unlock_service_pb2.UnlockRequest(), "INVALID_ARGUMENT"),
            # Only the server's own user reaches the socket: a long password is one more
            # wrong one (scrypt takes any length), answered later each time.
            (unlock_service_pb2.UnlockRequest(password="p" * (64 * 1024 + 1)), "UNAUTHENTICATED"),
            (unlock_service_pb2.UnlockRequest(password="wrong password"), "UNAUTHENTICATED"),
        ]
        with grpc.insecure_channel(f"unix:{server.socket}") as channel:
            for request, code in rows:
                raw = request if isinstance(request, bytes) else request.SerializeToString()
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary(path)(raw, timeout=60)
                assert caught.value.code().name == code, (request, caught.value.details())
                assert "Traceback" not in (caught.value.details() or "")
        assert server.proc.poll() is None and not server.endpoint.exists()
        assert _files(data) == before
        result, _ = server.unlock("the locked start password")
        assert result.returncode == 0, result.stderr
        server.wait_for(server.endpoint)
    finally:
        assert server.stop() == 0
