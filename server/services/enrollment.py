"""EnrollmentService, ZoneService, CertificateService and BundleService: thin servicers
over the enrollment domain."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from keyplane.server.domain.enrollment import Enrollment, Issued, check_renewal_proof
from keyplane.server.domain.identity import Identity
from keyplane.server.errors import FailedPrecondition
from keyplane.server.services import convert
from keyplane.server.services.root_keys import Context, actor, caller
from keyplane.v1 import (
    bundle_service_pb2,
    bundle_service_pb2_grpc,
    certificate_service_pb2,
    certificate_service_pb2_grpc,
    enrollment_service_pb2,
    enrollment_service_pb2_grpc,
    zone_service_pb2,
    zone_service_pb2_grpc,
)

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

    def renew(self, identity: Identity, csr_data: bytes) -> Issued: ...

    def renew_pending(self, identity: Identity, csr_data: bytes) -> tuple[Issued, Future[Any]]: ...

    def identity_from_chain(self, chain_pem: bytes) -> Identity: ...


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
        value, pending = self._enrollment.renew_pending(caller(), request.csr)
        await asyncio.wrap_future(pending)
        return enrollment_service_pb2.RenewResponse(certificate=issued(value))

    async def RenewWithProof(
        self, request: enrollment_service_pb2.RenewWithProofRequest, context: Context
    ) -> enrollment_service_pb2.RenewResponse:
        identity = self._enrollment.identity_from_chain(request.certificate_chain_pem.encode())
        check_renewal_proof(identity.certificate, request.csr, request.proof)
        # Signed here, on the loop; only the durable record is waited for.
        value, pending = self._enrollment.renew_pending(identity, request.csr)
        await asyncio.wrap_future(pending)
        return enrollment_service_pb2.RenewResponse(certificate=issued(value))


class ZoneServicer(zone_service_pb2_grpc.ZoneServiceServicer):
    """Zone-server enrollment, renewal and issuance reports."""

    def __init__(self, enrollment: Enrollment) -> None:
        self._enrollment = enrollment

    async def EnrollZoneServer(
        self, request: zone_service_pb2.EnrollZoneServerRequest, context: Context
    ) -> zone_service_pb2.EnrollZoneServerResponse:
        chain, tls = await asyncio.to_thread(
            self._enrollment.enroll_zone_server,
            request.token,
            request.intermediate_csr,
            request.tls_csr,
            request.name,
            request.listen,
            request.bootstrap_listen,
        )
        return zone_service_pb2.EnrollZoneServerResponse(
            intermediate_chain_pem=chain, tls_certificate=issued(tls)
        )

    async def RenewZoneServer(
        self, request: zone_service_pb2.RenewZoneServerRequest, context: Context
    ) -> zone_service_pb2.RenewZoneServerResponse:
        chain, tls = await asyncio.to_thread(
            self._enrollment.renew_zone_server,
            caller(),
            request.intermediate_csr,
            request.tls_csr,
        )
        return zone_service_pb2.RenewZoneServerResponse(
            intermediate_chain_pem=chain, tls_certificate=issued(tls)
        )

    async def RedeemEnrollmentToken(
        self, request: zone_service_pb2.RedeemEnrollmentTokenRequest, context: Context
    ) -> zone_service_pb2.RedeemEnrollmentTokenResponse:
        # Concurrent redemptions share one commit; only that is waited for off the loop.
        pending = self._enrollment.redeem_token_pending(
            caller(), request.token, request.subject, request.certificate_der
        )
        await asyncio.wrap_future(pending)
        return zone_service_pb2.RedeemEnrollmentTokenResponse()

    async def ReportIssuedCertificates(
        self, request: zone_service_pb2.ReportIssuedCertificatesRequest, context: Context
    ) -> zone_service_pb2.ReportIssuedCertificatesResponse:
        reports = [(c.certificate_der, c.component) for c in request.certificates]
        recorded = await asyncio.to_thread(self._enrollment.record_reported, caller(), reports)
        return zone_service_pb2.ReportIssuedCertificatesResponse(recorded=recorded)


class CertificateServicer(certificate_service_pb2_grpc.CertificateServiceServicer):
    """Issued certificates and enrollment tokens."""

    def __init__(self, enrollment: Enrollment) -> None:
        self._enrollment = enrollment

    async def ListCertificates(
        self, request: certificate_service_pb2.ListCertificatesRequest, context: Context
    ) -> certificate_service_pb2.ListCertificatesResponse:
        records = await asyncio.to_thread(
            self._enrollment.certificates, request.component, request.page_size
        )
        return certificate_service_pb2.ListCertificatesResponse(
            certificates=[convert.certificate(r) for r in records]
        )

    async def RevokeCertificate(
        self, request: certificate_service_pb2.RevokeCertificateRequest, context: Context
    ) -> certificate_service_pb2.RevokeCertificateResponse:
        record = await asyncio.to_thread(
            self._enrollment.revoke_certificate, actor(), request.serial, request.reason
        )
        return certificate_service_pb2.RevokeCertificateResponse(
            certificate=convert.certificate(record)
        )

    async def CreateEnrollmentToken(
        self, request: certificate_service_pb2.CreateEnrollmentTokenRequest, context: Context
    ) -> certificate_service_pb2.CreateEnrollmentTokenResponse:
        token = await asyncio.to_thread(
            self._enrollment.create_token,
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


class BundleServicer(bundle_service_pb2_grpc.BundleServiceServicer):
    """Init bundles and the legacy public key file."""

    def __init__(self, enrollment: Enrollment, endpoints: Callable[[], tuple[str, str]]) -> None:
        self._enrollment = enrollment
        self._endpoints = endpoints

    async def GetInitBundle(
        self, request: bundle_service_pb2.GetInitBundleRequest, context: Context
    ) -> bundle_service_pb2.GetInitBundleResponse:
        listen, bootstrap = self._endpoints()
        bundle = await asyncio.to_thread(self._enrollment.init_bundle, listen, bootstrap)
        return bundle_service_pb2.GetInitBundleResponse(bundle=bundle)

    async def GetLegacyPublicKey(
        self, request: bundle_service_pb2.GetLegacyPublicKeyRequest, context: Context
    ) -> bundle_service_pb2.GetLegacyPublicKeyResponse:
        pem, fingerprint = await asyncio.to_thread(self._enrollment.legacy_public_key)
        return bundle_service_pb2.GetLegacyPublicKeyResponse(
            public_key_pem=pem, fingerprint=fingerprint
        )
