"""Roles, played by every kind of caller: each RPC of each service as no identity, as an
admin, an operator and an auditor (identities made through the real API), an agent, a
zone server and a revoked operator; what an operator may and may not change; that an
auditor changes nothing; and that README.md's access table is the code's."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory, symbol_database

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.server.app import SERVICE_NAMES
from keyplane.server.auth import ACCESS, PUBLIC, READ, Access
from keyplane.server.kinds import Role
from tests.serverkit import RunningServer, running_server
from tests.test_enrollment import make_csr, p256
from tests.zonekit import enroll_fake_zone, key_pem, mtls_channel

README = Path(__file__).resolve().parent.parent / "README.md"


def _roots(server: RunningServer) -> bytes:
    return (server.admin_dir / "ca.pem").read_bytes()


@dataclass(frozen=True)
class Person:
    """A person's credential, as `keyplane identities create` would write it."""

    name: str
    chain_pem: bytes
    key_pem: bytes

    def client(self, server: RunningServer) -> KeyplaneClient:
        return KeyplaneClient(
            mtls_channel(server.listen, self.chain_pem, self.key_pem, _roots(server))
        )


def new_identity(admin: KeyplaneClient, name: str, role: str) -> Person:
    key = p256()
    created = admin.create_identity(name, role, make_csr(key, cn=name))
    return Person(name, created.certificate_pem.encode(), key_pem(key))


def _refused(code: grpc.StatusCode, call: Callable[..., object], *args: object) -> str:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args)
    assert caught.value.code == code, caught.value
    return caught.value.message


def snapshot_state(server: RunningServer) -> tuple[object, ...]:
    """What a refused change must leave as it was: the audit log (but the refusals, which
    are recorded, as they should be), every certificate and key (with its state), the
    settings, the zones and the trust-state version."""
    store = server.hierarchy.store
    return (
        len([e for e in store.audit_log(1_000_000) if e.outcome != "refused"]),
        [(c.serial, c.revoked_at) for c in store.certificates(None, 1_000_000)],
        [(k.fingerprint, k.state) for kind in ("root", "server_tls") for k in store.keys(kind)],
        store.settings(),
        [(z.name, z.revoked_at) for z in store.zones(include_revoked=True)],
        server.hierarchy.trust.latest_version(),
    )


# -- every RPC, every caller ---------------------------------------------------------------


UNLOCK = "/keyplane.v1.UnlockService/Unlock"
SIGN_IN = "/keyplane.v1.ConsoleService/CreateSignInLink"


def _methods() -> Iterator[tuple[str, object, bool]]:
    """Every method the server serves, from the registered descriptors: (path, request
    class, server-streaming)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2  # noqa: F401 - registers its types

    pool = symbol_database.Default().pool
    for service_name in (*SERVICE_NAMES, "grpc.health.v1.Health"):
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            request = message_factory.GetMessageClass(method.input_type)
            yield f"/{service.full_name}/{method.name}", request, method.server_streaming
    assert health_pb2


def _call(channel: grpc.Channel, path: str, request: object, streaming: bool) -> tuple[str, str]:
    """(status name, details) of calling `path` with an empty request."""
    serialize = lambda m: m.SerializeToString()  # noqa: E731
    try:
        if streaming:
            for _ in channel.unary_stream(path, request_serializer=serialize)(
                request(),  # type: ignore[operator]
                timeout=2,
            ):
                break
        else:
            channel.unary_unary(path, request_serializer=serialize)(request(), timeout=10)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


# What the access check says when it refuses (the domain may refuse for its own
# reasons too, e.g. an empty token, with other words).
NO_IDENTITY = "needs a client certificate from this server's hierarchy"
WRONG_ROLE = "role; the client certificate"
REVOKED = "the client certificate is refused: it was revoked"


def test_every_rpc_of_every_service_as_every_kind_of_caller(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        roots = _roots(server)
        with server.admin_client() as first_admin:
            people = {
                role: new_identity(first_admin, f"{role}@example.org", role)
                for role in ("admin", "operator", "auditor")
            }
            gone = new_identity(first_admin, "gone@example.org", "operator")
            first_admin.revoke_identity(gone.name, "left", True)
            token = first_admin.create_enrollment_token().token
            zone_token = first_admin.create_enrollment_token(role="zone-server").token
        key = p256()
        with KeyplaneClient(bootstrap_channel_for(server.bootstrap, roots)) as anonymous:
            agent = anonymous.enroll(make_csr(key, cn="walker"), token)
        zone = enroll_fake_zone(server.bootstrap, roots, zone_token)
        channels = {
            "nobody": bootstrap_channel_for(server.bootstrap, roots),
            **{
                role: mtls_channel(server.listen, p.chain_pem, p.key_pem, roots)
                for role, p in people.items()
            },
            "agent": mtls_channel(
                server.listen, agent.certificate_chain_pem.encode(), key_pem(key), roots
            ),
            "zone-server": zone.channel(server.listen, roots),
            "revoked": mtls_channel(server.listen, gone.chain_pem, gone.key_pem, roots),
        }
        for channel in channels.values():
            # Connected first: the walk's CreateRootKey re-issues the server's certificate
            # under a root these channels were not given.
            grpc.channel_ready_future(channel).result(timeout=10)
        served = list(_methods())
        assert len(served) > 30
        paths = {path for path, *_ in served}
        assert not paths - set(ACCESS), f"served but not in the access table: {paths - set(ACCESS)}"
        assert (
            not set(ACCESS)
            - paths
            - {
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                UNLOCK,
            }
        ), "in the access table but not served"
        # Unlock is served by a locked server alone, on its 0600 Unix socket
        # (tests/test_locked_start.py); a running server's listeners do not know it.
        from keyplane.v1 import unlock_service_pb2

        for who, channel in channels.items():
            code, _ = _call(channel, UNLOCK, unlock_service_pb2.UnlockRequest, False)
            assert code == "UNIMPLEMENTED", (who, code)
        for path, request, streaming in served:
            access = ACCESS[path]
            for who, channel in channels.items():
                code, details = _call(channel, path, request, streaming)
                refused_by_access = any(m in details for m in (NO_IDENTITY, WRONG_ROLE, REVOKED))
                if access is PUBLIC:
                    assert not refused_by_access, (path, who, code, details)
                elif who == "nobody":
                    assert code == "UNAUTHENTICATED" and NO_IDENTITY in details, (path, code)
                elif who == "revoked":
                    assert code == "PERMISSION_DENIED" and REVOKED in details, (path, details)
                elif who in access:
                    assert not refused_by_access, (path, who, code, details)
                else:
                    assert code == "PERMISSION_DENIED" and WRONG_ROLE in details, (path, who)
        for channel in channels.values():
            channel.close()


def test_an_auditor_may_call_only_reads() -> None:
    """Whatever the auditor may call only reads: its name says so (Get, List, Verify:
    a check that compares and changes nothing), and the domain of each writes nothing but
    the audit line of an admin's reveal."""
    auditor_may = [p for p, a in ACCESS.items() if a is not PUBLIC and Role.AUDITOR in a]
    assert auditor_may
    # Signing itself in to the console makes a link for its own identity only, which
    # changes nothing of the PKI (tests/test_console_security.py plays the auditor there).
    assert ACCESS[SIGN_IN] == READ
    auditor_may.remove(SIGN_IN)
    for path in auditor_may:
        assert path.rsplit("/", 1)[1].startswith(("Get", "List", "Verify")), path
        assert ACCESS[path] in (READ, frozenset({Role.ADMIN, Role.AUDITOR})), path


# -- operators -----------------------------------------------------------------------------


@pytest.fixture
def operator(server: RunningServer, admin: KeyplaneClient) -> Iterator[KeyplaneClient]:
    with new_identity(admin, "olivia@example.org", "operator").client(server) as client:
        yield client


@pytest.fixture
def auditor(server: RunningServer, admin: KeyplaneClient) -> Iterator[KeyplaneClient]:
    with new_identity(admin, "audrey@example.org", "auditor").client(server) as client:
        yield client


def test_an_operator_runs_tokens_certificates_and_zones(
    server: RunningServer, operator: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    token = operator.create_enrollment_token(uses=2).token
    issued = anonymous.enroll(make_csr(p256(), cn="meter-1"), token)
    assert issued.serial in {c.serial for c in operator.list_certificates()}
    revoked = operator.revoke_certificate(issued.serial, "lost")
    assert revoked.revoke_reason == "lost"
    zone_token = operator.create_enrollment_token(role="zone-server").token
    zone = enroll_fake_zone(server.bootstrap, _roots(server), zone_token)
    assert [z.name for z in operator.list_zone_servers()] == [zone.name]
    assert operator.revoke_zone_server(zone.name, "decommissioned", True).state == "revoked"
    assert operator.get_init_bundle().body
    assert operator.list_keys() and operator.list_settings() and operator.list_root_keys()
    assert [i.name for i in operator.list_identities()] == [
        "admin@pki.test",
        "olivia@example.org",
    ]


def test_an_operator_cannot_touch_roots_keys_settings_signing_or_identities(
    server: RunningServer, admin: KeyplaneClient, operator: KeyplaneClient
) -> None:
    root = admin.list_root_keys().active[0].fingerprint
    someone = new_identity(admin, "sam@example.org", "auditor")
    before = snapshot_state(server)
    refusals: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (operator.create_root_key, ()),
        (operator.revoke_root_key, (root, "take over", True)),
        (operator.rotate_key, ("message-signing",)),
        (operator.update_setting, ("OpenEnrollment", "true")),
        (operator.sign_message, (b"release",)),
        (operator.create_identity, ("mallory", "admin", make_csr(p256(), cn="mallory"))),
        (operator.revoke_identity, (someone.name, "gone", True)),
    ]
    for call, args in refusals:
        message = _refused(grpc.StatusCode.PERMISSION_DENIED, call, *args)
        assert "needs the admin role" in message, (call, message)
    # Nor through RevokeCertificate: a person's credential is an identity.
    serial = next(i.serial for i in admin.list_identities() if i.name == someone.name)
    message = _refused(
        grpc.StatusCode.PERMISSION_DENIED, operator.revoke_certificate, serial, "x", True, True
    )
    assert "needs the admin role" in message
    assert snapshot_state(server) == before
    with someone.client(server) as still:
        assert still.list_identities()


def test_an_operator_or_auditor_cannot_reveal_a_protected_setting(tmp_path: Path) -> None:
    password_file = tmp_path / "pki-password"
    password_file.write_text("first password 1\n")
    config = tmp_path / "keyplane.toml"
    config.write_text(f'[backends.software]\npassword_file = "{password_file}"\n')
    with running_server(tmp_path / "data", config_file=config) as server:
        with server.admin_client() as admin:
            admin.update_setting("PKIDatabasePassword", "a much better password")
            people = [new_identity(admin, f"{r}-1", r) for r in ("operator", "auditor")]
        before = snapshot_state(server)
        for person in people:
            with person.client(server) as client:
                for call, args in (
                    (client.get_setting, ("PKIDatabasePassword", True)),
                    (client.list_settings, (True,)),
                ):
                    message = _refused(grpc.StatusCode.PERMISSION_DENIED, call, *args)
                    assert "revealing a protected value needs the admin role" in message
                shown = client.get_setting("PKIDatabasePassword")
                assert shown.value == "********"
        assert snapshot_state(server) == before


# -- auditors ------------------------------------------------------------------------------


def test_an_auditor_changes_nothing(
    server: RunningServer,
    admin: KeyplaneClient,
    auditor: KeyplaneClient,
    anonymous: KeyplaneClient,
) -> None:
    root = admin.list_root_keys().active[0].fingerprint
    agent = anonymous.enroll(make_csr(p256(), cn="meter-2"), admin.create_enrollment_token().token)
    zone = enroll_fake_zone(
        server.bootstrap, _roots(server), admin.create_enrollment_token(role="zone-server").token
    )
    someone = new_identity(admin, "sam@example.org", "operator")
    before = snapshot_state(server)
    writes: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (auditor.create_root_key, ()),
        (auditor.revoke_root_key, (root, "x", True)),
        (auditor.rotate_key, ("server-tls",)),
        (auditor.update_setting, ("OpenEnrollment", "true")),
        (auditor.sign_message, (b"release",)),
        (auditor.sign_messages, ([b"a", b"b"],)),
        (auditor.create_enrollment_token, ()),
        (auditor.revoke_certificate, (agent.serial, "x", True, True)),
        (auditor.revoke_zone_server, (zone.name, "x", True)),
        (auditor.create_identity, ("eve", "admin", make_csr(p256(), cn="eve"))),
        (auditor.revoke_identity, (someone.name, "x", True, True)),
    ]
    for call, args in writes:
        message = _refused(grpc.StatusCode.PERMISSION_DENIED, call, *args)
        assert "the client certificate 'audrey@example.org' has auditor" in message
    assert snapshot_state(server) == before
    # It reads everything there is to read, and reading changes nothing either.
    assert auditor.list_root_keys().active and auditor.list_keys()
    assert auditor.list_settings() and auditor.list_certificates()
    assert auditor.list_zone_servers() and auditor.get_zone_server(zone.name)
    assert auditor.list_identities(include_revoked=True) and auditor.get_init_bundle().body
    assert auditor.get_root_key(root) and auditor.get_legacy_root_key()
    assert snapshot_state(server) == before


# -- the README's table is the code's ------------------------------------------------------

ROLE_ORDER = (Role.ADMIN, Role.OPERATOR, Role.AUDITOR, Role.AGENT, Role.ZONE_SERVER)


def _roles_text(access: Access) -> str:
    if access is PUBLIC:
        return "anyone (public)"
    return ", ".join(r.value for r in ROLE_ORDER if r in access)  # type: ignore[operator]


def access_table() -> str:
    """README.md's access table, rendered from server/auth.py's ACCESS."""
    lines = ["| RPC | who may call it |", "|---|---|"]
    for path, access in ACCESS.items():
        lines.append(
            f"| `{path.lstrip('/').removeprefix('keyplane.v1.')}` | {_roles_text(access)} |"
        )
    return "\n".join(lines) + "\n"


def test_the_readme_access_table_is_the_code_s() -> None:
    text = README.read_text()
    found = re.search(r"^\| RPC \| who may call it \|\n(?:\|.*\|\n)+", text, re.MULTILINE)
    assert found, "README.md has no access table (| RPC | who may call it |)"
    assert found.group(0) == access_table(), (
        "README.md's access table differs from server/auth.py; replace it with:\n" + access_table()
    )


if __name__ == "__main__":  # python -m tests.test_roles: print the table for README.md
    print(access_table(), end="")
