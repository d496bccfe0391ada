"""Enrollment tokens listed and revoked over real gRPC: ids and states, never a secret;
a revoke stops Enroll, EnrollBatch and a zone's RedeemEnrollmentToken at once, and is
audited; who may list and who may revoke."""

from __future__ import annotations

import datetime
import hashlib

import grpc

from keyplane.clients.client import KeyplaneClient
from keyplane.server.domain import certs
from keyplane.server.domain.clock import ManualClock
from keyplane.server.domain.tokens import Tokens
from keyplane.server.kinds import Role
from keyplane.v1 import audit_service_pb2 as audit_pb
from tests.serverkit import RunningServer
from tests.test_audit_service import client_with, key_fingerprint_of
from tests.test_enrollment import expect, make_csr, p256
from tests.test_server_access import issue_client
from tests.zonekit import enroll_fake_zone


def test_tokens_are_listed_by_id_and_state_never_by_secret(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient, clock: ManualClock
) -> None:
    spent = admin.create_enrollment_token(uses=1)
    anonymous.enroll(make_csr(p256()), spent.token)
    short = admin.create_enrollment_token(ttl_seconds=60)
    revoked = admin.create_enrollment_token(uses=5)
    admin.revoke_enrollment_token(revoked.token_id)
    active = admin.create_enrollment_token(uses=3, role="zone-server")
    clock.advance(datetime.timedelta(minutes=2))
    usable = admin.list_enrollment_tokens()
    assert [t.token_id for t in usable] == [active.token_id]
    (listed,) = usable
    assert (listed.role, listed.uses, listed.uses_left, listed.state) == (
        "zone-server",
        3,
        3,
        "active",
    )
    assert listed.created_by.startswith("admin@pki.test (serial ")
    assert listed.expire_time == active.expire_time
    every = {t.token_id: t for t in admin.list_enrollment_tokens(include_unusable=True)}
    assert {k: t.state for k, t in every.items()} == {
        spent.token_id: "spent",
        short.token_id: "expired",
        revoked.token_id: "revoked",
        active.token_id: "active",
    }
    assert every[revoked.token_id].revoked_by == listed.created_by
    assert every[revoked.token_id].HasField("revoke_time")
    wire = b"".join(t.SerializeToString() for t in every.values())
    for token in (spent, short, revoked, active):
        digest = hashlib.sha256(token.token.encode()).hexdigest()
        assert token.token.encode() not in wire
        assert digest.encode() not in wire and digest[16:].encode() not in wire
        assert digest[:16] == token.token_id


def test_a_revoked_token_stops_every_enrollment_at_once_and_the_revoke_is_audited(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    token = admin.create_enrollment_token(uses=100)
    anonymous.enroll(make_csr(p256()), token.token)
    issued_before = len(server.hierarchy.store.certificates(None, 10_000))
    after = admin.revoke_enrollment_token(token.token_id)
    assert (after.state, after.uses_left) == ("revoked", 99)
    error = expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll, make_csr(p256()), token.token)
    assert "revoked" in error.message
    batch = [make_csr(p256(), cn=f"b-{n}") for n in range(3)]
    expect(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll_batch, batch, token.token)
    assert len(server.hierarchy.store.certificates(None, 10_000)) == issued_before
    (event,) = [
        e for e in admin.audit_events(audit_pb.ListAuditEventsRequest(action="token.revoke"))
    ]
    admin_chain = (server.admin_dir / "admin.pem").read_bytes()
    assert event.target == token.token_id
    assert event.actor_fingerprint == key_fingerprint_of(admin_chain)
    assert token.token not in str(event)
    error = expect(
        grpc.StatusCode.FAILED_PRECONDITION, admin.revoke_enrollment_token, token.token_id
    )
    assert error.reason == "ALREADY_REVOKED"


def test_a_revoke_stops_an_enrollment_whose_token_was_checked_but_not_spent(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    """The use is spent where the certificate is recorded: a revoke in between wins."""
    hierarchy = server.hierarchy
    token = admin.create_enrollment_token(uses=2)
    digest = Tokens(hierarchy.store, hierarchy.settings, hierarchy.clock).check(
        token.token, Role.AGENT
    )
    admin.revoke_enrollment_token(token.token_id)
    with hierarchy.store.transaction(hierarchy.clock.now()) as tx:
        assert not tx.consume_token(digest, Role.AGENT)
    assert hierarchy.store.token_uses_left(digest) == 2


def test_a_revoked_token_cannot_be_redeemed_through_a_zone(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    roots = (server.admin_dir / "ca.pem").read_bytes()
    zone = enroll_fake_zone(
        server.bootstrap, roots, admin.create_enrollment_token(role="zone-server").token
    )
    token = admin.create_enrollment_token(uses=5)
    with KeyplaneClient(zone.channel(server.listen, roots)) as as_zone:
        cert, _ = zone.mint("agent-z1", ["agent"])
        as_zone.redeem_enrollment_token(token.token, "agent-z1", certs.to_der(cert))
        admin.revoke_enrollment_token(token.token_id)
        cert, _ = zone.mint("agent-z2", ["agent"])
        error = expect(
            grpc.StatusCode.UNAUTHENTICATED,
            as_zone.redeem_enrollment_token,
            token.token,
            "agent-z2",
            certs.to_der(cert),
        )
    assert "revoked" in error.message
    assert server.hierarchy.store.certificate(certs.serial_hex(cert)) is None


def test_operators_list_and_revoke_auditors_only_list(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    token = admin.create_enrollment_token()
    chain, key = issue_client(server, "auditor")
    with client_with(server, chain, key) as auditor:
        assert [t.token_id for t in auditor.list_enrollment_tokens()] == [token.token_id]
        error = expect(
            grpc.StatusCode.PERMISSION_DENIED, auditor.revoke_enrollment_token, token.token_id
        )
        assert "admin or operator" in error.message
    assert admin.list_enrollment_tokens()[0].state == "active"
    chain, key = issue_client(server, "operator")
    with client_with(server, chain, key) as operator:
        assert [t.token_id for t in operator.list_enrollment_tokens()] == [token.token_id]
        assert operator.revoke_enrollment_token(token.token_id.upper()).state == "revoked"
        expect(grpc.StatusCode.INVALID_ARGUMENT, operator.revoke_enrollment_token, token.token)
        expect(grpc.StatusCode.INVALID_ARGUMENT, operator.revoke_enrollment_token, "abc")
        expect(grpc.StatusCode.NOT_FOUND, operator.revoke_enrollment_token, "0" * 16)
