"""Renewal proofs (server/domain/renewal.py): any bytes as a RenewWithProofRequest
(garbage protobuf is INVALID_ARGUMENT at the interceptor); the certificate chain, the
proof and its time checked at the proof's own moment and at now give UNAUTHENTICATED or
INVALID_ARGUMENT (Unauthenticated, InvalidArgument), never another exception."""

from __future__ import annotations

import datetime

import atheris
from google.protobuf.message import DecodeError

with atheris.instrument_imports(include=["keyplane"]):
    from keyplane.server.domain.renewal import check_renewal_proof, presented_certificate
    from keyplane.server.errors import InvalidArgument, Unauthenticated
    from keyplane.v1 import enrollment_service_pb2

from fuzz.harness import run

AUDIENCE = "pki.test"
NOW = datetime.datetime.now(datetime.UTC)


def test_one_input(data: bytes) -> None:
    try:
        request = enrollment_service_pb2.RenewWithProofRequest.FromString(data)
    except DecodeError:
        return
    try:
        cert = presented_certificate(request.certificate_chain_pem.encode())
    except (InvalidArgument, Unauthenticated):
        return
    # At the proof's own time (as if just made), so the signature check is reached.
    try:
        at = datetime.datetime.fromtimestamp(request.proof_time, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        at = NOW
    for now in (at, NOW):
        try:
            check_renewal_proof(cert, request.csr, request.proof, AUDIENCE, request.proof_time, now)
        except (InvalidArgument, Unauthenticated):
            pass


if __name__ == "__main__":
    run(test_one_input)
