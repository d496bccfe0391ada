"""CertificateService: issued certificates and enrollment tokens; thin over the
enrollment and tokens domain."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.clock import Clock
from keyplane.server.domain.enrollment import Enrollment
from keyplane.server.services import convert
from keyplane.server.services.context import Context, actor, caller
from keyplane.server.store import TokenRecord
from keyplane.v1 import certificate_service_pb2, certificate_service_pb2_grpc


def enrollment_token(record: TokenRecord, clock: Clock) -> certificate_service_pb2.EnrollmentToken:
    """A token as listed: its id, never its secret or its hash."""
    return certificate_service_pb2.EnrollmentToken(
        token_id=record.token_id,
        role=record.role,
        uses=record.uses,
        uses_left=record.uses_left,
        expire_time=convert.timestamp(record.expires_at),
        create_time=convert.timestamp(record.created_at),
        created_by=record.created_by,
        state=record.state(clock.now()),
        revoke_time=convert.timestamp(record.revoked_at),
        revoked_by=record.revoked_by or "",
    )


class CertificateServicer(certificate_service_pb2_grpc.CertificateServiceServicer):
    """Issued certificates and enrollment tokens."""

    def __init__(self, enrollment: Enrollment) -> None:
        self._enrollment = enrollment

    async def ListCertificates(
        self, request: certificate_service_pb2.ListCertificatesRequest, context: Context
    ) -> certificate_service_pb2.ListCertificatesResponse:
        records = await asyncio.to_thread(
            self._enrollment.certificates, request.component, request.page_size, request.search
        )
        return certificate_service_pb2.ListCertificatesResponse(
            certificates=[convert.certificate(r) for r in records]
        )

    async def RevokeCertificate(
        self, request: certificate_service_pb2.RevokeCertificateRequest, context: Context
    ) -> certificate_service_pb2.RevokeCertificateResponse:
        who = caller()
        record = await asyncio.to_thread(
            self._enrollment.revoke_certificate,
            who.actor,
            request.serial,
            request.reason,
            request.confirm,
            request.force,
            who,
        )
        return certificate_service_pb2.RevokeCertificateResponse(
            certificate=convert.certificate(record)
        )

    async def CreateEnrollmentToken(
        self, request: certificate_service_pb2.CreateEnrollmentTokenRequest, context: Context
    ) -> certificate_service_pb2.CreateEnrollmentTokenResponse:
        token = await asyncio.to_thread(
            self._enrollment.tokens.create,
            actor(),
            request.uses,
            request.ttl_seconds,
            request.role,
        )
        return certificate_service_pb2.CreateEnrollmentTokenResponse(
            token=token.token,
            token_id=token.token_id,
            expire_time=convert.timestamp(token.expires_at),
            uses=token.uses,
            role=token.role,
        )

    async def ListEnrollmentTokens(
        self, request: certificate_service_pb2.ListEnrollmentTokensRequest, context: Context
    ) -> certificate_service_pb2.ListEnrollmentTokensResponse:
        tokens = self._enrollment.tokens
        records = await asyncio.to_thread(tokens.list, request.include_unusable, request.page_size)
        return certificate_service_pb2.ListEnrollmentTokensResponse(
            tokens=[enrollment_token(r, tokens.clock) for r in records]
        )

    async def RevokeEnrollmentToken(
        self, request: certificate_service_pb2.RevokeEnrollmentTokenRequest, context: Context
    ) -> certificate_service_pb2.RevokeEnrollmentTokenResponse:
        tokens = self._enrollment.tokens
        record = await asyncio.to_thread(tokens.revoke, actor(), request.token_id)
        return certificate_service_pb2.RevokeEnrollmentTokenResponse(
            token=enrollment_token(record, tokens.clock)
        )
