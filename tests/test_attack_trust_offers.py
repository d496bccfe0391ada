"""OfferTrust is public (the bootstrap listener, no client certificate): anyone who can
reach it may make a root of its own and ask for trust. MAX_INCOMING bounds how many
requests from peers are under way, but an offer from a sender whose request is under
way replaces it: the old row is kept as `superseded`, a new one is added, and both
steps go to the trust history and to the append-only audit log. So one made-up server,
sending the same offer again and again under one name, grows keyplane.db (trust_peers,
trust_history, audit) without bound, from the network alone, and fills the audit log
with rows nobody can remove. What should happen: what an unauthenticated sender makes
the server store is bounded: a replacement within REOFFER_AFTER of the request it
replaces is refused (RESOURCE_EXHAUSTED, saying when to retry, nothing stored), and a
later one takes the replaced request's place (one row per sender in trust_peers, one
"received" in the history and the audit log)."""

from __future__ import annotations

import datetime
import secrets
import sqlite3
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyplane.server.domain import certs
from keyplane.server.domain.clock import ManualClock
from keyplane.server.domain.exchange import MAX_INCOMING, REOFFER_AFTER
from keyplane.server.domain.peer_messages import PEER_MESSAGE_CONTEXT
from keyplane.v1 import trust_service_pb2 as pb
from keyplane.v1 import trust_service_pb2_grpc as pb_grpc
from keyplane.v1 import trust_state_pb2
from tests.serverkit import FQDN, running_server

OFFERS = 120


def made_up_root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil.test Root 0")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def offer(
    key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    pinned: str,
    sent: datetime.datetime | None = None,
) -> pb.SignedPeerMessage:
    """A well-formed offer from `evil.test`, signed by its made-up root."""
    fingerprint = certs.key_fingerprint(root)
    body = pb.PeerMessageBody(
        kind=pb.PEER_MESSAGE_KIND_OFFER,
        request_id=secrets.token_hex(16),
        sender_fqdn="evil.test",
        recipient_fqdn=FQDN,
    )
    body.send_time.FromDatetime(sent or datetime.datetime.now(datetime.UTC))
    body.roots.append(
        trust_state_pb2.TrustedCertificate(
            fingerprint=fingerprint,
            certificate_der=certs.to_der(root),
            name="evil.test Root 0",
            state="active",
            kind="root",
        )
    )
    body.listen, body.bootstrap_listen = "127.0.0.1:9", "127.0.0.1:10"
    body.commitment = secrets.token_bytes(32)
    body.recipient_root_fingerprint = pinned
    data = body.SerializeToString(deterministic=True)
    signed = pb.SignedPeerMessage(body=data)
    signed.signatures.add(
        root_fingerprint=fingerprint,
        signature=key.sign(PEER_MESSAGE_CONTEXT + data, ec.ECDSA(hashes.SHA256())),
    )
    return signed


def row_counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {
            table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
            for table in ("trust_peers", "trust_history", "audit")
        }


def incoming(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT id, state FROM trust_peers WHERE direction = 'incoming' ORDER BY created_at"
        ).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def test_one_unauthenticated_sender_cannot_grow_the_state_db_without_bound(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    with running_server(tmp_path / "b", clock) as server:
        pinned = server.hierarchy.active_roots()[0].fingerprint
        db = server.config.data_dir / "keyplane.db"
        before = row_counts(db)
        key, root = made_up_root()
        stub = pb_grpc.TrustServiceStub(server.bootstrap_channel())  # no client certificate
        accepted = 0
        refusals: list[grpc.RpcError] = []
        for _ in range(OFFERS):
            try:
                stub.OfferTrust(
                    pb.OfferTrustRequest(message=offer(key, root, pinned, clock.now())),
                    timeout=10,
                )
                accepted += 1
            except grpc.RpcError as exc:
                refusals.append(exc)
        after = row_counts(db)
        grown = {table: after[table] - before[table] for table in after}
        bound = 2 * MAX_INCOMING
        assert all(n <= bound for n in grown.values()), (
            f"{accepted} offers from one network-only sender, one made-up root, one name "
            f"added {grown} rows (audit rows cannot ever be removed); at most {bound} expected"
        )
        # The first offer is recorded (and audited); the others are refused, stored nowhere.
        assert accepted == 1 and grown == {"trust_peers": 1, "trust_history": 1, "audit": 1}
        assert {exc.code() for exc in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "retry then" in (refusals[0].details() or "")
        [(first, state)] = incoming(db)
        assert state == "awaiting-nonce"

        # Once the request is REOFFER_AFTER old, the same sender may replace it: the new
        # request takes its place, and its one "received" says which it replaced.
        clock.advance(REOFFER_AFTER)
        stub.OfferTrust(
            pb.OfferTrustRequest(message=offer(key, root, pinned, clock.now())), timeout=10
        )
        [(second, state)] = incoming(db)
        assert second != first and state == "awaiting-nonce"
        last = row_counts(db)
        assert {table: last[table] - after[table] for table in last} == {
            "trust_peers": 0,
            "trust_history": 1,
            "audit": 1,
        }
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            event, detail = conn.execute(
                "SELECT event, detail FROM trust_history WHERE request_id = ?", (second,)
            ).fetchone()
        assert (event, detail) == ("received", f"replaces request {first}")
