"""Message signing and trust-state verification, including the cases to reject."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.trust import TrustState, TrustStateError, accept, follow
from keyplane.clients.verify import MessageVerificationError, verify_message
from keyplane.server.domain.clock import ManualClock
from keyplane.v1 import message_signing_service_pb2, trust_state_pb2
from tests.serverkit import RunningServer, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data") as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[KeyplaneClient]:
    with server.admin_client() as c:
        yield c


def trust_of(server: RunningServer, client: KeyplaneClient) -> TrustState:
    return follow(None, client.get_trust_state(0), [server.hierarchy.issuing_root().fingerprint])


def test_sign_and_verify_a_payload(server: RunningServer, client: KeyplaneClient) -> None:
    payload = b"policy update 42\n" * 100
    signed = client.sign_message(payload)
    verified = verify_message(payload, signed, trust_of(server, client))
    assert verified.signer_fingerprint == server.hierarchy.active_key("message_signing").fingerprint
    assert verified.root_fingerprint == server.hierarchy.issuing_root().fingerprint
    assert signed.algorithm == "ecdsa-sha256"
    assert len(signed.certificate_chain) == 2


def test_a_tampered_payload_or_signature_is_rejected(
    server: RunningServer, client: KeyplaneClient
) -> None:
    payload = b"install agent 7.1"
    signed = client.sign_message(payload)
    trust = trust_of(server, client)
    with pytest.raises(MessageVerificationError, match="tampered"):
        verify_message(payload + b"!", signed, trust)
    forged = message_signing_service_pb2.SignedMessage()
    forged.CopyFrom(signed)
    content = message_signing_service_pb2.MessageSignatureContent.FromString(forged.content)
    content.signed_at.FromDatetime(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    forged.content = content.SerializeToString()
    with pytest.raises(MessageVerificationError, match="not valid for this content"):
        verify_message(payload, forged, trust)


def test_a_signature_by_a_revoked_key_is_rejected(
    server: RunningServer, client: KeyplaneClient
) -> None:
    payload = b"signed before the rotation"
    signed = client.sign_message(payload)
    before = trust_of(server, client)
    assert verify_message(payload, signed, before)
    root0 = server.hierarchy.issuing_root().fingerprint
    client.create_root_key()
    # Retired, not revoked: still valid after the new root is created.
    assert verify_message(payload, signed, trust_of(server, client))
    client.revoke_root_key(root0, "compromised", True)
    with server.admin_client() as fresh:
        after = follow(before, fresh.get_trust_state(before.version))
        with pytest.raises(MessageVerificationError, match="revoked"):
            verify_message(payload, signed, after)
        # New signatures come from the new root's key and verify.
        again = fresh.sign_message(payload)
        assert verify_message(payload, again, after).root_fingerprint != root0


def test_payload_limit_is_four_mebibytes(client: KeyplaneClient) -> None:
    assert client.sign_message(b"\0" * (4 * 1024 * 1024)).signature
    with pytest.raises(KeyplaneClientError) as caught:
        client.sign_message(b"\0" * (4 * 1024 * 1024 + 1))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 4194304 bytes" in caught.value.message


def test_trust_state_rollback_and_forgery_are_rejected(
    server: RunningServer, client: KeyplaneClient
) -> None:
    first = trust_of(server, client)
    client.rotate_key("message-signing")
    newer = follow(first, client.get_trust_state(first.version))
    assert newer.version > first.version
    # Rollback: an older (genuine) version after a newer one.
    with pytest.raises(TrustStateError, match="rollback"):
        follow(newer, [first.signed])
    # Replay of the same version.
    with pytest.raises(TrustStateError, match="not newer"):
        follow(newer, [newer.signed])
    # A body changed after signing.
    body = trust_state_pb2.TrustStateBody.FromString(newer.signed.body)
    body.version += 1
    body.revoked_serials.append("00" * 16)
    tampered = trust_state_pb2.SignedTrustState(
        body=body.SerializeToString(), signatures=newer.signed.signatures
    )
    with pytest.raises(TrustStateError, match="not signed by any root"):
        follow(newer, [tampered])
    # Signed by a key that is not a trusted root.
    stranger = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import hashes

    forged = trust_state_pb2.SignedTrustState(body=body.SerializeToString())
    forged.signatures.add(
        root_fingerprint=first.root_fingerprints[0],
        signature=stranger.sign(
            b"keyplane-trust-state-v1\0" + forged.body, ec.ECDSA(hashes.SHA256())
        ),
    )
    with pytest.raises(TrustStateError, match="not signed by any root"):
        follow(newer, [forged])
    # First contact with the wrong pinned fingerprint.
    with pytest.raises(TrustStateError, match="pinned"):
        accept(newer.signed, None, ["ab" * 32])


def test_trust_state_is_served_on_the_bootstrap_listener(server: RunningServer) -> None:
    with server.bootstrap_channel() as channel:
        versions = KeyplaneClient(channel).get_trust_state(0)
    state = follow(None, versions, [server.hierarchy.issuing_root().fingerprint])
    assert state.version == server.hierarchy.trust.latest_version()
    assert {c.fingerprint for c in state.body.message_signing} == {
        k.fingerprint for k in server.hierarchy.subordinate_keys("message_signing")
    }
    assert state.body.client_settings["PKIClientTLSKeyRenewalWindowHours"] == "4"


def test_trust_state_drops_expired_retired_keys(tmp_path: Path) -> None:
    clock = ManualClock(datetime.datetime.now(datetime.UTC))
    with running_server(tmp_path / "data", clock=clock) as server:
        hierarchy = server.hierarchy
        first = hierarchy.active_key("message_signing").fingerprint
        hierarchy.rotation.rotate_key("test", "message_signing")
        signed = trust_state_pb2.SignedTrustState.FromString(hierarchy.trust.versions_since(0)[0])
        body = trust_state_pb2.TrustStateBody.FromString(signed.body)
        assert first in {c.fingerprint for c in body.message_signing}
        clock.advance(datetime.timedelta(days=31))
        hierarchy.reconcile()
        signed = trust_state_pb2.SignedTrustState.FromString(hierarchy.trust.versions_since(0)[0])
        body = trust_state_pb2.TrustStateBody.FromString(signed.body)
        assert first not in {c.fingerprint for c in body.message_signing}
