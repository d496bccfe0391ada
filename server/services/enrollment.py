"""EnrollmentService: a thin servicer, for the server's Enrollment and for a zone
server's issuer alike."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any, Protocol

from keyplane.server.domain.enrollment import Enrollment, Issued
from keyplane.server.domain.identity import Identity
from keyplane.server.errors import FailedPrecondition
from keyplane.server.services import convert
from keyplane.server.services.context import Context, caller
from keyplane.v1 import enrollment_service_pb2, enrollment_service_pb2_grpc

# Batches up to this size are signed on the event loop (~10 ms): threads would contend
# for the GIL and cost more than the wait. Larger ones go to a thread.
INLINE_BATCH = 32


def issued(value: Issued) -> enrollment_service_pb2.IssuedCertificate:
    return enrollment_service_pb2.IssuedCertificate(
        certificate_chain_pem=value.chain_pem,
        roots_pem=value.roots_pem,
        serial=value.serial,
        not_after=convert.timestamp(value.not_after),
        renew_after=convert.timestamp(value.renew_after),
    )


class ClientIssuer(Protocol):
    """What EnrollmentService needs: the server's Enrollment, or a zone server's issuer."""

    def enroll(self, csr_data: bytes, token: str) -> Issued: ...

    def renew_pending(
        self, identity: Identity, csr_data: bytes, repeat: bool = False
    ) -> tuple[Issued, Future[Any]]: ...

    def identity_from_chain(self, chain_pem: bytes) -> Identity: ...

    def check_proof(
        self, identity: Identity, csr: bytes, proof: bytes, proof_time: int
    ) -> None: ...


class EnrollmentServicer(enrollment_service_pb2_grpc.EnrollmentServiceServicer):
    """Enroll and EnrollBatch (a token), Renew (mutual TLS), RenewWithProof (a proof by
    the current key in the request)."""

    def __init__(self, enrollment: ClientIssuer) -> None:
        self._enrollment = enrollment

    async def Enroll(
        self, request: enrollment_service_pb2.EnrollRequest, context: Context
    ) -> enrollment_service_pb2.EnrollResponse:
        if isinstance(self._enrollment, Enrollment):
            # The crypto runs here; only the durable commit is waited for off the loop.
            value, pending = self._enrollment.enroll_pending(request.csr, request.token)
            await asyncio.wrap_future(pending)
        else:
            value = await asyncio.to_thread(self._enrollment.enroll, request.csr, request.token)
        return enrollment_service_pb2.EnrollResponse(certificate=issued(value))

    async def EnrollBatch(
        self, request: enrollment_service_pb2.EnrollBatchRequest, context: Context
    ) -> enrollment_service_pb2.EnrollBatchResponse:
        if not isinstance(self._enrollment, Enrollment):
            raise FailedPrecondition(
                "zone servers enroll one CSR per call; send EnrollBatch to the keyplane "
                "server's bootstrap listener"
            )
        csrs = list(request.csrs)
        if len(csrs) <= INLINE_BATCH:
            values, pending = self._enrollment.enroll_batch_pending(csrs, request.token)
        else:
            # A big batch is milliseconds of signing: off the loop, so other calls go on.
            values, pending = await asyncio.to_thread(
                self._enrollment.enroll_batch_pending, csrs, request.token
            )
        await asyncio.wrap_future(pending)
        return enrollment_service_pb2.EnrollBatchResponse(
            certificates=[issued(value) for value in values]
        )

    async def Renew(
        self, request: enrollment_service_pb2.RenewRequest, context: Context
    ) -> enrollment_service_pb2.RenewResponse:
        # Over mutual TLS only the key's holder asks: a renewal whose answer was lost is
        # answered again with the same certificate.
        value, pending = self._enrollment.renew_pending(caller(), request.csr, repeat=True)
        await asyncio.wrap_future(pending)
        return enrollment_service_pb2.RenewResponse(certificate=issued(value))

    async def RenewWithProof(
        self, request: enrollment_service_pb2.RenewWithProofRequest, context: Context
    ) -> enrollment_service_pb2.RenewResponse:
        identity = self._enrollment.identity_from_chain(request.certificate_chain_pem.encode())
        self._enrollment.check_proof(identity, request.csr, request.proof, request.proof_time)
        # Signed here, on the loop; only the durable record is waited for.
        value, pending = self._enrollment.renew_pending(identity, request.csr)
        await asyncio.wrap_future(pending)
        return enrollment_service_pb2.RenewResponse(certificate=issued(value))
