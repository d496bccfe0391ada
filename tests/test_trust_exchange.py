"""Trust between two servers (active/active), in process: how both admins set it up and
see the same comparison code, what it changes (bundles, trust states, root lists,
admission, renewal), how it ends, and every fault and bad input: a peer that does not
answer, a wrong fingerprint, forged, replayed and stale messages, a nonce that does not
match its commitment, decisions on unknown or decided requests, callers without the
admin role, and bad updates over the peer link. Each refusal asserts its status and that
nothing was recorded as trusted."""

from __future__ import annotations

import datetime
import sqlite3
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient
from keyplane.clients.trust import TRUST_STATE_CONTEXT as CLIENT_CONTEXT
from keyplane.plugins.keys import KeyAlgorithm
from keyplane.server.domain import certs
from keyplane.server.domain.peer_messages import (
    Signer,
    commitment,
    new_nonce,
    new_request_id,
    sign_message,
    trusted_certificate,
)
from keyplane.server.domain.trust import TRUST_STATE_CONTEXT as SERVER_CONTEXT
from keyplane.server.domain.trust import sign_with
from keyplane.server.store import StateStore
from keyplane.v1 import trust_service_pb2 as pb
from keyplane.v1 import trust_state_pb2
from tests.peerkit import (
    PeerServer,
    establish,
    refused,
    request,
    rpc_refused,
    two_servers,
    wait_until,
)
from tests.test_enrollment import make_csr, p256
from tests.test_roles import new_identity
from tests.zonekit import enroll_fake_zone, key_pem, mtls_channel

# -- helpers -------------------------------------------------------------------------------


def signers(server: PeerServer) -> list[Signer]:
    h = server.hierarchy
    return [
        Signer(r.fingerprint, h.backends.private_key(r.key_uri), KeyAlgorithm(r.algorithm))
        for r in h.active_roots()
    ]


def offer_as(
    sender: PeerServer,
    recipient: PeerServer,
    *,
    sent: datetime.datetime | None = None,
    signed_by: list[Signer] | None = None,
    recipient_fingerprint: str | None = None,
    nonce: bytes | None = None,
) -> tuple[pb.SignedPeerMessage, str, bytes]:
    """An offer as `sender` would make it (or as an attacker varies it)."""
    nonce = nonce or new_nonce()
    roots = sender.hierarchy.active_roots()
    body = pb.PeerMessageBody(
        kind=pb.PEER_MESSAGE_KIND_OFFER,
        request_id=new_request_id(),
        sender_fqdn=sender.fqdn,
        recipient_fqdn=recipient.fqdn,
        listen=sender.listen,
        bootstrap_listen=sender.bootstrap,
        commitment=commitment(nonce, [r.fingerprint for r in roots]),
        recipient_root_fingerprint=recipient_fingerprint or recipient.root_fingerprint(),
    )
    body.send_time.FromDatetime(sent or datetime.datetime.now(datetime.UTC))
    body.roots.extend(trusted_certificate(certs.load_pem(r.certificate_pem), r.name) for r in roots)
    return sign_message(body, signed_by or signers(sender)), body.request_id, nonce


def nothing_trusted(*servers: PeerServer) -> None:
    """No server lists a peer anywhere: trust state, bundle, roots list, TLS client CAs."""
    for server in servers:
        assert server.trust_state_peers() == []
        assert server.hierarchy.admission.peers.views() == []
        with server.admin() as admin:
            body = load_bundle(admin.get_init_bundle().SerializeToString()).body
            assert list(body.peer_roots) == [] and not any(s.peer for s in body.servers)
            assert list(admin.list_root_keys().peers) == []
            assert list(admin.list_trust().peers) == []


def agent_of(server: PeerServer, name: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """An agent enrolled at `server`: its chain and key."""
    key = p256()
    with server.admin() as admin:
        token = admin.create_enrollment_token().token
        issued = admin.enroll(make_csr(key, cn=name), token)
    return issued.certificate_chain_pem.encode(), key


def client_as(
    chain: bytes, key: ec.EllipticCurvePrivateKey, at: PeerServer, roots: bytes | None = None
) -> KeyplaneClient:
    return KeyplaneClient(mtls_channel(at.listen, chain, key_pem(key), roots or at.roots_pem()))


# -- setting trust up ----------------------------------------------------------------------


def test_trust_needs_both_admins_and_both_see_the_same_code(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        made = request(a, b)
        assert made.direction == "outgoing" and made.state == "pending"
        with a.admin() as admin_a, b.admin() as admin_b:
            seen_a = admin_a.list_trust().requests
            seen_b = admin_b.list_trust().requests
            assert [r.id for r in seen_a] == [r.id for r in seen_b] == [made.id]
            (mine,), (theirs,) = seen_a, seen_b
            assert theirs.direction == "incoming" and theirs.state == "pending"
            # The same six digits on both sides, and every fingerprint in full.
            assert mine.comparison_code == theirs.comparison_code
            assert len(mine.comparison_code.replace(" ", "")) == 6
            assert list(theirs.peer_root_fingerprints) == [a.root_fingerprint()]
            assert list(mine.peer_root_fingerprints) == [b.root_fingerprint()]
            assert list(theirs.own_root_fingerprints) == [b.root_fingerprint()]
            # Until B's admin approves, neither side trusts the other anywhere.
            nothing_trusted(a, b)
            approved = admin_b.approve_trust(made.id)
            assert approved.fqdn == a.fqdn
            assert [p.fqdn for p in admin_a.list_trust().peers] == [b.fqdn]
            assert [p.fqdn for p in admin_b.list_trust().peers] == [a.fqdn]
            for server, admin, peer in ((a, admin_a, b), (b, admin_b, a)):
                # Its bundle and trust state carry the peer's roots and listeners...
                body = load_bundle(admin.get_init_bundle().SerializeToString()).body
                assert [r.fingerprint for r in body.peer_roots] == [peer.root_fingerprint()]
                assert [(s.name, s.listen) for s in body.servers if s.peer] == [
                    (peer.fqdn, peer.listen)
                ]
                wait_until(
                    "the peer's section",
                    lambda s=server, p=peer: [x.fqdn for x in s.trust_state_peers()] == [p.fqdn],
                )
                (section,) = server.trust_state_peers()
                assert [r.fingerprint for r in section.roots] == [peer.root_fingerprint()]
                assert section.bootstrap_listen == peer.bootstrap
                # ...and roots list shows them in their own section.
                (peer_roots,) = admin.list_root_keys().peers
                assert peer_roots.server_fqdn == peer.fqdn
                assert [r.fingerprint for r in peer_roots.roots] == [peer.root_fingerprint()]
                events = [(e.event, e.peer_fqdn) for e in admin.list_trust().history]
                assert ("approved", peer.fqdn) in events
            actions = [r.action for r in b.hierarchy.store.audit_log(10_000)]
            assert "trust.received" in actions and "trust.approved" in actions
            assert "trust.requested" in [r.action for r in a.hierarchy.store.audit_log(10_000)]


def test_agents_of_either_server_are_admitted_by_both_and_renew_once_at_the_peer(
    tmp_path: Path,
) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        chain, key = agent_of(a, "meter-a")
        both_roots = a.roots_pem() + b.roots_pem()
        new_key = p256()
        with client_as(chain, key, b, both_roots) as at_b:
            # Mutual TLS both ways: B accepts A's agent and A's agent accepts B.
            renewed = at_b.renew(make_csr(new_key, cn="meter-a"))
            again = at_b.renew(make_csr(new_key, cn="meter-a"))  # a lost answer, asked again
            assert again.serial == renewed.serial
            message = refused(
                grpc.StatusCode.PERMISSION_DENIED, at_b.renew, make_csr(p256(), cn="meter-a")
            )
            assert "renews once per server" in message
        leaf = x509.load_pem_x509_certificates(renewed.certificate_chain_pem.encode())[0]
        b_intermediate = b.hierarchy.active_key("intermediate_tls")
        assert certs.issued_by(leaf, b_intermediate.certificate_pem)
        assert renewed.serial in {c.serial for c in b.hierarchy.store.certificates("agent")}
        # The renewed certificate (B's) is admitted at A in turn.
        with client_as(renewed.certificate_chain_pem.encode(), new_key, a, both_roots) as at_a:
            assert at_a.get_trust_state()
        # A's admin credential carries no role at B: its root's direct certificates are A's.
        admin_chain = (a.data_dir / "admin" / "admin.pem").read_bytes()
        split = admin_chain.index(b"-----BEGIN PRIVATE KEY-----")
        stranger = KeyplaneClient(
            mtls_channel(b.listen, admin_chain[:split], admin_chain[split:], both_roots)
        )
        with stranger:
            message = refused(grpc.StatusCode.PERMISSION_DENIED, stranger.list_root_keys)
            assert "no record of issuing it" in message


def test_the_same_request_retried_is_idempotent(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        first = request(a, b)
        second = request(a, b)
        assert second.id == first.id and second.comparison_code == first.comparison_code
        assert [(r.id, r.state) for r in b.peer_rows()] == [(first.id, "pending")]
        assert len(a.peer_rows()) == 1
        fingerprint = b.root_fingerprint()
        b.stop()  # the same answer while the peer is down: nothing is sent again
        with a.admin() as admin:
            assert admin.request_trust(b.bootstrap, fingerprint).id == first.id


def test_a_request_while_the_peer_is_down_records_nothing(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        b.stop()
        with a.admin() as admin:
            refused(grpc.StatusCode.UNAVAILABLE, admin.request_trust, b.bootstrap, "ab" * 32)
            assert not admin.list_trust().requests and not admin.list_trust().history
        assert a.peer_rows() == []
        b.start()
        nothing_trusted(a, b)


def test_an_approval_while_the_requester_is_down_changes_nothing_and_can_be_retried(
    tmp_path: Path,
) -> None:
    with two_servers(tmp_path) as (a, b):
        made = request(a, b)
        a.stop()
        with b.admin() as admin:
            message = refused(grpc.StatusCode.UNAVAILABLE, admin.approve_trust, made.id)
            assert "does not answer" in message
            assert [r.state for r in admin.list_trust().requests] == ["pending"]
        assert [r.state for r in b.peer_rows()] == ["pending"]
        assert b.trust_state_peers() == [] and b.hierarchy.admission.peers.views() == []
        a.start()
        with b.admin() as admin:
            assert admin.approve_trust(made.id).fqdn == a.fqdn
        with a.admin() as admin:
            assert [p.fqdn for p in admin.list_trust().peers] == [b.fqdn]


def test_a_fingerprint_that_is_not_the_peer_s_records_nothing(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        with a.admin() as admin:
            message = refused(
                grpc.StatusCode.PERMISSION_DENIED, admin.request_trust, b.bootstrap, "cd" * 32
            )
            assert "fingerprint mismatch" in message
            # A's own root is not B's either.
            refused(
                grpc.StatusCode.PERMISSION_DENIED,
                admin.request_trust,
                b.bootstrap,
                a.root_fingerprint(),
            )
        assert a.peer_rows() == [] and b.peer_rows() == []
        nothing_trusted(a, b)


def test_forged_and_misdirected_offers_are_refused(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        stub = b.bootstrap_stub()
        # Signed by a key that is not the root it lists.
        forger = p256()
        fake = Signer(a.root_fingerprint(), forger, KeyAlgorithm.EC_P256)  # type: ignore[arg-type]
        offer, _, _ = offer_as(a, b, signed_by=[fake])
        message = rpc_refused(
            grpc.StatusCode.PERMISSION_DENIED, stub.OfferTrust, pb.OfferTrustRequest(message=offer)
        )
        assert "not signed by every root it lists" in message
        # A body changed after signing.
        offer, _, _ = offer_as(a, b)
        body = pb.PeerMessageBody.FromString(offer.body)
        body.sender_fqdn = "pki-evil.test"
        tampered = pb.SignedPeerMessage(body=body.SerializeToString(), signatures=offer.signatures)
        rpc_refused(
            grpc.StatusCode.PERMISSION_DENIED,
            stub.OfferTrust,
            pb.OfferTrustRequest(message=tampered),
        )
        # Pinned to a fingerprint that is none of B's roots.
        offer, _, _ = offer_as(a, b, recipient_fingerprint="ef" * 32)
        rpc_refused(
            grpc.StatusCode.PERMISSION_DENIED, stub.OfferTrust, pb.OfferTrustRequest(message=offer)
        )
        # Meant for another server.
        offer, _, _ = offer_as(a, a)
        rpc_refused(
            grpc.StatusCode.PERMISSION_DENIED, stub.OfferTrust, pb.OfferTrustRequest(message=offer)
        )
        # Garbage.
        rpc_refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.OfferTrust,
            pb.OfferTrustRequest(message=pb.SignedPeerMessage(body=b"\xff\x00junk")),
        )
        assert b.peer_rows() == []
        nothing_trusted(a, b)


def test_replayed_and_stale_messages_are_refused(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        stub = b.bootstrap_stub()
        old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        offer, _, _ = offer_as(a, b, sent=old)
        message = rpc_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.OfferTrust,
            pb.OfferTrustRequest(message=offer),
        )
        assert "replay" in message
        assert b.peer_rows() == []
        request_id = establish(a, b)
        # A's offer, recorded on the wire and sent again once decided.
        (row,) = a.peer_rows()
        recorded = pb.SignedPeerMessage.FromString(row.offer)
        message = rpc_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.OfferTrust,
            pb.OfferTrustRequest(message=recorded),
        )
        assert "replayed request is refused" in message
        # A fresh offer from a server that is trusted already.
        offer, _, _ = offer_as(a, b)
        rpc_refused(
            grpc.StatusCode.ALREADY_EXISTS, stub.OfferTrust, pb.OfferTrustRequest(message=offer)
        )
        assert [(r.id, r.state) for r in b.peer_rows()] == [(request_id, "trusted")]


def stranger_offer(recipient: PeerServer, fqdn: str) -> pb.SignedPeerMessage:
    """An offer from a server nobody knows, signed by its own (new) root."""
    key = p256()
    root = certs.build_root_certificate(key, f"{fqdn} Root 0", datetime.datetime.now(datetime.UTC))  # type: ignore[arg-type]
    fingerprint = certs.key_fingerprint(root)
    body = pb.PeerMessageBody(
        kind=pb.PEER_MESSAGE_KIND_OFFER,
        request_id=new_request_id(),
        sender_fqdn=fqdn,
        recipient_fqdn=recipient.fqdn,
        listen="10.0.0.9:7443",
        bootstrap_listen="10.0.0.9:7444",
        commitment=commitment(new_nonce(), [fingerprint]),
        recipient_root_fingerprint=recipient.root_fingerprint(),
    )
    body.send_time.FromDatetime(datetime.datetime.now(datetime.UTC))
    body.roots.append(trusted_certificate(root, f"{fqdn} Root 0"))
    return sign_message(body, [Signer(fingerprint, key, KeyAlgorithm.EC_P256)])  # type: ignore[arg-type]


def test_offers_are_bounded_and_nobody_replaces_another_server_s_request(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        made = request(a, b)
        stub = b.bootstrap_stub()
        # Someone else claiming A's name cannot push A's request aside...
        message = rpc_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.OfferTrust,
            pb.OfferTrustRequest(message=stranger_offer(b, a.fqdn)),
        )
        assert "with other roots is under way" in message
        assert [(r.id, r.state) for r in b.peer_rows()] == [(made.id, "pending")]
        # ...and strangers cannot flood B with requests.
        for i in range(19):
            stub.OfferTrust(
                pb.OfferTrustRequest(message=stranger_offer(b, f"x{i}.test")), timeout=30
            )
        rpc_refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            stub.OfferTrust,
            pb.OfferTrustRequest(message=stranger_offer(b, "x-last.test")),
        )
        assert len(b.peer_rows()) == 20
        nothing_trusted(b)


def test_a_nonce_that_does_not_match_its_commitment_is_refused(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        stub = b.bootstrap_stub()
        offer, request_id, _ = offer_as(a, b)
        receipt = stub.OfferTrust(pb.OfferTrustRequest(message=offer), timeout=30).message
        assert pb.PeerMessageBody.FromString(receipt.body).nonce
        reveal = pb.PeerMessageBody(
            kind=pb.PEER_MESSAGE_KIND_REVEAL,
            request_id=request_id,
            sender_fqdn=a.fqdn,
            recipient_fqdn=b.fqdn,
            nonce=new_nonce(),  # chosen after seeing B's: not the committed one
        )
        reveal.send_time.FromDatetime(datetime.datetime.now(datetime.UTC))
        message = rpc_refused(
            grpc.StatusCode.PERMISSION_DENIED,
            stub.RevealTrustNonce,
            pb.RevealTrustNonceRequest(message=sign_message(reveal, signers(a))),
        )
        assert "commitment" in message
        (row,) = b.peer_rows()
        assert row.state == "awaiting-nonce" and row.comparison_code is None
        with b.admin() as admin:
            message = refused(grpc.StatusCode.FAILED_PRECONDITION, admin.approve_trust, row.id)
            assert "no comparison code yet" in message
        nothing_trusted(b)


def test_a_request_signed_by_a_revoked_root_is_refused(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        with a.admin() as admin:
            root0 = a.root_fingerprint()
            admin.create_root_key()
            # Signed while root 0 still had its key: a recording, or a stolen root.
            offer, _, _ = offer_as(a, b)
            wait_until("B to see A's second root", lambda: len(b.trust_state_peers()[0].roots) == 2)
            admin.revoke_root_key(root0, "rotation", True)
        wait_until(
            "B to see root 0 revoked",
            lambda: root0 in b.trust_state_peers()[0].revoked_root_fingerprints,
        )
        with b.admin() as admin:
            admin.revoke_trust(a.fqdn, "starting over")
        message = rpc_refused(
            grpc.StatusCode.PERMISSION_DENIED,
            b.bootstrap_stub().OfferTrust,
            pb.OfferTrustRequest(message=offer),
        )
        assert "was revoked by its server" in message
        assert [r.state for r in b.peer_rows()] == ["revoked"]


def test_deciding_unknown_decided_or_own_requests_is_refused(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        made = request(a, b)
        with a.admin() as admin_a, b.admin() as admin_b:
            refused(grpc.StatusCode.NOT_FOUND, admin_b.approve_trust, "0" * 32)
            refused(grpc.StatusCode.NOT_FOUND, admin_b.reject_trust, "0" * 32)
            message = refused(grpc.StatusCode.FAILED_PRECONDITION, admin_a.approve_trust, made.id)
            assert "this server made request" in message
            admin_b.approve_trust(made.id)
            for call in (admin_b.approve_trust, admin_b.reject_trust):
                message = refused(grpc.StatusCode.FAILED_PRECONDITION, call, made.id)
                assert "trusted already" in message
            refused(grpc.StatusCode.NOT_FOUND, admin_b.revoke_trust, "pki-nobody.test")


def test_a_rejection_ends_the_request_on_both_sides(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        made = request(a, b)
        with b.admin() as admin:
            rejected = admin.reject_trust(made.id, "not a server we know")
            assert rejected.request.state == "rejected" and rejected.peer_told
        assert [r.state for r in a.peer_rows()] == ["rejected"]
        with a.admin() as admin:
            assert not admin.list_trust().requests
            events = [(e.event, e.actor) for e in admin.list_trust().history]
            assert ("rejected", f"peer server {b.fqdn}") in events
        nothing_trusted(a, b)
        # The requester may withdraw a request too.
        again = request(a, b)
        with a.admin() as admin:
            assert admin.reject_trust(again.id).peer_told
        assert [r.state for r in b.peer_rows()] == ["rejected", "rejected"]


def test_only_admins_request_approve_reject_or_revoke_trust(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        made = request(a, b)
        with b.admin() as admin:
            people = [new_identity(admin, f"{r}@b", r) for r in ("operator", "auditor")]
        for person in people:
            with person.client(b.server) as client:
                for call, args in (
                    (client.request_trust, (a.bootstrap, a.root_fingerprint())),
                    (client.approve_trust, (made.id,)),
                    (client.reject_trust, (made.id,)),
                    (client.revoke_trust, (a.fqdn,)),
                ):
                    message = refused(grpc.StatusCode.PERMISSION_DENIED, call, *args)
                    assert "needs the admin role" in message
                assert [r.id for r in client.list_trust().requests] == [made.id]
        assert [r.state for r in b.peer_rows()] == ["pending"]
        nothing_trusted(b)


# -- the peer link -------------------------------------------------------------------------


def test_roots_and_revocations_reach_the_peer(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        chain, key = agent_of(a, "meter-a")
        serial = f"{x509.load_pem_x509_certificate(chain).serial_number:032x}"
        with client_as(chain, key, b, a.roots_pem() + b.roots_pem()) as at_b:
            assert at_b.get_trust_state()
        with a.admin() as admin:
            root1 = admin.create_root_key()
            wait_until(
                "B to publish A's new root",
                lambda: (
                    root1.fingerprint in [r.fingerprint for r in b.trust_state_peers()[0].roots]
                ),
                30,
            )
            admin.revoke_certificate(serial, "stolen")
        wait_until(
            "B to learn of the revocation",
            lambda: serial in b.trust_state_peers()[0].revoked_serials,
            30,
        )
        with client_as(chain, key, b, a.roots_pem() + b.roots_pem()) as at_b:
            message = refused(
                grpc.StatusCode.PERMISSION_DENIED, at_b.renew, make_csr(p256(), cn="meter-a")
            )
            assert "revoked by its server" in message


def test_a_zone_revoked_on_one_side_is_refused_on_the_other(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        with a.admin() as admin:
            token = admin.create_enrollment_token(role="zone-server").token
        zone = enroll_fake_zone(a.bootstrap, a.roots_pem(), token, name="zone-a")
        cert, key = zone.mint("meter-z", ["agent"], dns=["agent.invalid"])
        chain = zone.chain(cert)
        wait_until(
            "B to list A's zone intermediate",
            lambda: (
                certs.key_fingerprint(zone.intermediate)
                in [i.fingerprint for i in b.trust_state_peers()[0].intermediates]
            ),
            30,
        )
        # A zone's agent is an agent at the peer too (and may renew there)...
        with client_as(chain, key, b, a.roots_pem() + b.roots_pem()) as at_b:
            assert at_b.renew(make_csr(p256(), cn="meter-z")).serial
        with a.admin() as admin:
            admin.revoke_zone_server("zone-a", "decommissioned", True)
        wait_until(
            "B to learn the zone is revoked",
            lambda: (
                certs.key_fingerprint(zone.intermediate)
                in b.trust_state_peers()[0].revoked_key_fingerprints
            ),
            30,
        )
        # ...until its server revokes the zone: then the peer refuses what the zone issued.
        cert2, key2 = zone.mint("meter-z2", ["agent"], dns=["agent.invalid"])
        with client_as(zone.chain(cert2), key2, b, a.roots_pem() + b.roots_pem()) as at_b:
            message = refused(
                grpc.StatusCode.PERMISSION_DENIED, at_b.renew, make_csr(p256(), cn="meter-z2")
            )
        assert "no record of issuing it" in message


def test_a_revocation_the_peer_did_not_hear_is_delivered_when_it_answers(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        b.stop()
        with a.admin() as admin:
            revoked = admin.revoke_trust(b.fqdn, "moving out")
            assert not revoked.peer_told
        nothing_trusted(a)
        b.start()
        wait_until("B to be told", lambda: [r.state for r in b.peer_rows()] == ["revoked"], 30)
        nothing_trusted(b)
        assert not a.peer_rows()[0].end_unsent


def _push(b: PeerServer, a: PeerServer, versions: list[trust_state_pb2.SignedTrustState]) -> int:
    response = b.bootstrap_stub().PushTrustState(
        pb.PushTrustStateRequest(sender_fqdn=a.fqdn, versions=versions), timeout=30
    )
    return int(response.held_version)


def _signed_by(
    body: trust_state_pb2.TrustStateBody, keys: list[tuple[str, object]]
) -> trust_state_pb2.SignedTrustState:
    data = body.SerializeToString(deterministic=True)
    signed = trust_state_pb2.SignedTrustState(body=data)
    for fingerprint, key in keys:
        signed.signatures.add(
            root_fingerprint=fingerprint,
            signature=sign_with(key, KeyAlgorithm.EC_P256, SERVER_CONTEXT + data),  # type: ignore[arg-type]
        )
    return signed


def test_bad_peer_updates_are_refused_kept_in_the_history_and_the_last_good_state_stays(
    tmp_path: Path,
) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        root0 = a.hierarchy.active_roots()[0]
        root0_key = a.hierarchy.backends.private_key(root0.key_uri)
        held = _push(b, a, [])
        assert held == a.hierarchy.trust.latest_version()
        latest = trust_state_pb2.SignedTrustState.FromString(
            a.hierarchy.store.latest_trust_state().signed
        )
        body = trust_state_pb2.TrustStateBody.FromString(latest.body)
        # A version that drops every approved root, though a held root signed it.
        takeover = trust_state_pb2.TrustStateBody.FromString(latest.body)
        takeover.version = held + 1
        stranger = p256()
        stranger_cert = certs.build_root_certificate(
            stranger, "pki-a.test Root 9", datetime.datetime.now(datetime.UTC)
        )
        del takeover.roots[:]
        takeover.roots.append(trusted_certificate(stranger_cert, "pki-a.test Root 9"))
        fp9 = certs.key_fingerprint(stranger_cert)
        message = rpc_refused(
            grpc.StatusCode.PERMISSION_DENIED,
            b.bootstrap_stub().PushTrustState,
            pb.PushTrustStateRequest(
                sender_fqdn=a.fqdn,
                versions=[_signed_by(takeover, [(root0.fingerprint, root0_key), (fp9, stranger)])],
            ),
        )
        assert "drops every root" in message
        # An older version: a rollback.
        first = trust_state_pb2.SignedTrustState.FromString(a.hierarchy.store.trust_state(1).signed)
        message = rpc_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            b.bootstrap_stub().PushTrustState,
            pb.PushTrustStateRequest(sender_fqdn=a.fqdn, versions=[first]),
        )
        assert "not newer" in message
        # Signed by a root A no longer has: made while it had it, sent after.
        with a.admin() as admin:
            admin.create_root_key()
            wait_until(
                "B to follow A's second root", lambda: len(b.trust_state_peers()[0].roots) == 2
            )
            late = trust_state_pb2.TrustStateBody.FromString(latest.body)
            late.version = 10_000
            forged = _signed_by(late, [(root0.fingerprint, root0_key)])
            admin.revoke_root_key(root0.fingerprint, "rotation", True)
        wait_until(
            "B to follow A's revocation",
            lambda: (
                [r.fingerprint for r in b.trust_state_peers()[0].roots]
                == [r.fingerprint for r in a.hierarchy.active_roots()]
            ),
        )
        good = b.trust_state_peers()[0]
        message = rpc_refused(
            grpc.StatusCode.PERMISSION_DENIED,
            b.bootstrap_stub().PushTrustState,
            pb.PushTrustStateRequest(sender_fqdn=a.fqdn, versions=[forged]),
        )
        assert "not signed by a root this server holds" in message
        # The last good state stays, and each refusal is in the history.
        assert b.trust_state_peers()[0] == good
        assert body.server_fqdn == a.fqdn
        with b.admin() as admin:
            refusals = [e for e in admin.list_trust().history if e.event == "update-refused"]
        assert len(refusals) == 3
        assert any(fp9 in e.fingerprints for e in refusals)
        assert "trust.update_refused" in [r.action for r in b.hierarchy.store.audit_log(10_000)]
        # Nobody may push for a server B does not trust.
        rpc_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            b.bootstrap_stub().PushTrustState,
            pb.PushTrustStateRequest(sender_fqdn="pki-nobody.test", versions=[latest]),
        )


# -- ending trust --------------------------------------------------------------------------


def test_revoking_trust_removes_the_peer_at_once_and_tells_it(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        chain, key = agent_of(b, "meter-b")
        with client_as(chain, key, a, a.roots_pem() + b.roots_pem()) as at_a:
            assert at_a.get_trust_state()  # connected: mutual TLS with B's agent
            with a.admin() as admin:
                revoked = admin.revoke_trust(b.fqdn, "decommissioned")
                assert revoked.peer_told and revoked.request.state == "revoked"
            nothing_trusted(a)
            # At once, on the connection it holds: A's admission no longer knows it...
            message = refused(
                grpc.StatusCode.PERMISSION_DENIED, at_a.renew, make_csr(p256(), cn="meter-b")
            )
            assert "no record of issuing it" in message
        # ...and a new connection does not get past A's TLS any more.
        with client_as(chain, key, a, a.roots_pem() + b.roots_pem()) as at_a:
            refused(grpc.StatusCode.UNAVAILABLE, at_a.renew, make_csr(p256(), cn="meter-b"))
        # B was told: A leaves its trust too.
        assert [r.state for r in b.peer_rows()] == ["revoked"]
        nothing_trusted(b)
        with a.admin() as admin:
            events = [e.event for e in admin.list_trust().history]
        assert events == ["requested", "approved", "revoked"]


def test_the_only_root_under_a_trust_cannot_be_revoked(tmp_path: Path) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        with a.admin() as admin:
            message = refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                admin.revoke_root_key,
                a.root_fingerprint(),
                "x",
                True,
            )
        assert "revoke the trust first" in message and "create a second root" in message
        assert a.hierarchy.active_roots()[0].state == "active"


# -- what both sides must agree on ---------------------------------------------------------


def test_the_server_verifies_peer_trust_states_in_the_clients_context() -> None:
    assert SERVER_CONTEXT == CLIENT_CONTEXT


def test_a_version_4_state_db_gains_the_trust_tables(tmp_path: Path) -> None:
    path = tmp_path / "keyplane.db"
    StateStore(path).close()
    db = sqlite3.connect(path)
    for table in (
        "trust_peers",
        "trust_history",
        "peer_renewals",
        "crls",
        "console_links",
        "console_sessions",
    ):
        db.execute(f"DROP TABLE {table}")
    db.execute("DROP INDEX certificates_revoked_by_issuer")
    for table in ("keys", "certificates"):  # and what later versions added
        db.execute(f"ALTER TABLE {table} DROP COLUMN revoke_reason_code")
    for column in ("signatures", "last_used_at"):
        db.execute(f"ALTER TABLE keys DROP COLUMN {column}")
    db.execute("UPDATE meta SET value = '4' WHERE name = 'schema_version'")
    db.commit()
    db.close()
    store = StateStore(path)
    try:
        assert store.reads.peers.trust_peers() == []
        assert store.reads.peers.trust_history() == []
    finally:
        store.close()
