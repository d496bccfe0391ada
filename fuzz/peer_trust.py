"""Peer trust (server/domain/peer_states.py, peer_messages.py): what another server may
send this one. Any bytes as a PushTrustStateRequest are followed from the approved roots
and from a version held (as accept_update does), and as a SignedPeerMessage go through
the steps the exchange takes (parse_message for each kind, check_addressed, roots_of,
verify_signed); each gives its result or a KeyplaneError (INVALID_ARGUMENT,
PERMISSION_DENIED, FAILED_PRECONDITION), never another exception. Garbage protobuf is
INVALID_ARGUMENT at the interceptor."""

from __future__ import annotations

import datetime

import atheris
from google.protobuf.message import DecodeError

with atheris.instrument_imports(include=["keyplane"]):
    from keyplane.server.domain import peer_trust
    from keyplane.server.domain.peer_messages import (
        KIND_NAMES,
        check_addressed,
        parse_message,
        roots_of,
        verify_signed,
    )
    from keyplane.server.domain.peer_states import follow_peer, load_state
    from keyplane.server.errors import KeyplaneError
    from keyplane.v1 import trust_service_pb2

from fuzz.harness import fixture, run

PEER = "pki.test"  # the fqdn the fixtures' trust states name
HELD = load_state(fixture("trust-first.bin"))
APPROVED = HELD.roots
NOW = datetime.datetime.now(datetime.UTC)


def _updates(data: bytes) -> None:
    try:
        request = trust_service_pb2.PushTrustStateRequest.FromString(data)
    except DecodeError:
        return
    versions = list(request.versions)
    for held in (None, HELD):
        followed = follow_peer(request.sender_fqdn or PEER, held, APPROVED, versions)
        if followed.state is not None:
            followed.state.roots  # noqa: B018 - what accept_update stores and audits
    for version in versions:
        peer_trust._newer(version, HELD)
        peer_trust._root_fingerprints(version)


def _messages(data: bytes) -> None:
    try:
        signed = trust_service_pb2.SignedPeerMessage.FromString(data)
    except DecodeError:
        return
    for kind in KIND_NAMES:
        try:
            body = parse_message(signed, kind)
        except KeyplaneError:
            continue
        try:
            sent = body.send_time.ToDatetime(tzinfo=datetime.UTC)
        except (ValueError, OverflowError, OSError):
            sent = NOW
        for now in (sent, NOW):
            try:
                check_addressed(body, body.recipient_fqdn, now)
            except KeyplaneError:
                pass
        try:
            verify_signed(signed, roots_of(body), require_all=True)
        except KeyplaneError:
            pass
        try:
            verify_signed(signed, APPROVED)
        except KeyplaneError:
            pass


def test_one_input(data: bytes) -> None:
    _updates(data)
    _messages(data)


if __name__ == "__main__":
    run(test_one_input)
