"""Signed-message envelopes (clients/verify.py): any bytes as a `.sig` file. Protobuf may
refuse them (DecodeError: `keyplane verify` says the file is not a signature); what
parses is verified against a real trust state and gives a VerifiedMessage or
MessageVerificationError, never another exception."""

from __future__ import annotations

import atheris
from google.protobuf.message import DecodeError

with atheris.instrument_imports(include=["keyplane"]):
    from keyplane.clients.trust import load
    from keyplane.clients.verify import MessageVerificationError, verify_message
    from keyplane.v1 import message_signing_service_pb2

from fuzz.harness import PAYLOAD, fixture, run

TRUST = load(fixture("trust.bin"))


def test_one_input(data: bytes) -> None:
    try:
        signed = message_signing_service_pb2.SignedMessage.FromString(data)
    except DecodeError:
        return
    for payload in (PAYLOAD, data):
        try:
            verify_message(payload, signed, TRUST)
        except MessageVerificationError:
            pass


if __name__ == "__main__":
    run(test_one_input)
