"""ZoneService: zone-server enrollment, renewal, token redemption and reports, and the
administration of zone servers; thin over the zones domain."""

from __future__ import annotations

import asyncio
import datetime

from keyplane.server.domain.zone_crls import ZoneCrls
from keyplane.server.domain.zones import Zones, ZoneView
from keyplane.server.kinds import KeyState
from keyplane.server.services import convert
from keyplane.server.services.context import Context, actor, caller
from keyplane.server.services.enrollment import issued
from keyplane.v1 import zone_service_pb2, zone_service_pb2_grpc


def zone_server(view: ZoneView) -> zone_service_pb2.ZoneServer:
    zone, intermediate = view.zone, view.intermediate
    live = intermediate is not None and intermediate.state != KeyState.REVOKED
    return zone_service_pb2.ZoneServer(
        name=zone.name,
        listen=zone.listen,
        bootstrap_listen=zone.bootstrap_listen,
        registered_time=convert.timestamp(zone.registered_at),
        last_seen_time=convert.timestamp(zone.last_seen),
        intermediate_fingerprint=intermediate.fingerprint if intermediate else "",
        intermediate_not_after=(
            convert.timestamp(intermediate.not_after) if intermediate and live else None
        ),
        tls_serial=zone.tls_serial or "",
        certificates_issued=view.certificates,
        state="revoked" if zone.revoked_at is not None else "live",
        revoke_time=convert.timestamp(zone.revoked_at),
        revoked_by=zone.revoked_by or "",
        revoke_reason=zone.revoke_reason or "",
    )


class ZoneServicer(zone_service_pb2_grpc.ZoneServiceServicer):
    """Zone servers: what they call, and what admins call about them."""

    def __init__(self, zones: Zones) -> None:
        self._zones = zones
        self._crls = ZoneCrls(zones)

    async def EnrollZoneServer(
        self, request: zone_service_pb2.EnrollZoneServerRequest, context: Context
    ) -> zone_service_pb2.EnrollZoneServerResponse:
        chain, tls = await asyncio.to_thread(
            self._zones.enroll,
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
            self._zones.renew, caller(), request.intermediate_csr, request.tls_csr
        )
        return zone_service_pb2.RenewZoneServerResponse(
            intermediate_chain_pem=chain, tls_certificate=issued(tls)
        )

    async def RedeemEnrollmentToken(
        self, request: zone_service_pb2.RedeemEnrollmentTokenRequest, context: Context
    ) -> zone_service_pb2.RedeemEnrollmentTokenResponse:
        # Concurrent redemptions share one commit; only that is waited for off the loop.
        pending = self._zones.reports.redeem_token_pending(
            caller(), request.token, request.subject, request.certificate_der
        )
        await asyncio.wrap_future(pending)
        return zone_service_pb2.RedeemEnrollmentTokenResponse()

    async def ReportIssuedCertificates(
        self, request: zone_service_pb2.ReportIssuedCertificatesRequest, context: Context
    ) -> zone_service_pb2.ReportIssuedCertificatesResponse:
        reports = [(c.certificate_der, c.component, c.renews_serial) for c in request.certificates]
        sightings = [
            (s.serial, s.seen_time.ToDatetime(tzinfo=datetime.UTC)) for s in request.sightings
        ]
        recorded = await asyncio.to_thread(
            self._zones.reports.record_reported, caller(), reports, sightings
        )
        return zone_service_pb2.ReportIssuedCertificatesResponse(recorded=recorded)

    async def ListZoneRevocations(
        self, request: zone_service_pb2.ListZoneRevocationsRequest, context: Context
    ) -> zone_service_pb2.ListZoneRevocationsResponse:
        found = await asyncio.to_thread(self._crls.revocations, caller())
        return zone_service_pb2.ListZoneRevocationsResponse(
            revocations=[
                zone_service_pb2.ZoneRevocation(
                    serial=entry.serial,
                    revoke_time=convert.timestamp(entry.revoked_at),
                    reason_code=entry.reason_code,
                    issuer_fingerprint=issuer,
                )
                for issuer, entry in found
            ]
        )

    async def PublishZoneCrl(
        self, request: zone_service_pb2.PublishZoneCrlRequest, context: Context
    ) -> zone_service_pb2.PublishZoneCrlResponse:
        record = await asyncio.to_thread(self._crls.publish, caller(), request.crl_der)
        return zone_service_pb2.PublishZoneCrlResponse(
            crl_number=record.crl_number, issuer_fingerprint=record.issuer_fingerprint
        )

    async def ListZoneServers(
        self, request: zone_service_pb2.ListZoneServersRequest, context: Context
    ) -> zone_service_pb2.ListZoneServersResponse:
        views = await asyncio.to_thread(self._zones.list, request.include_revoked)
        return zone_service_pb2.ListZoneServersResponse(
            zone_servers=[zone_server(v) for v in views]
        )

    async def GetZoneServer(
        self, request: zone_service_pb2.GetZoneServerRequest, context: Context
    ) -> zone_service_pb2.GetZoneServerResponse:
        view = await asyncio.to_thread(self._zones.get, request.name)
        return zone_service_pb2.GetZoneServerResponse(zone_server=zone_server(view))

    async def RevokeZoneServer(
        self, request: zone_service_pb2.RevokeZoneServerRequest, context: Context
    ) -> zone_service_pb2.RevokeZoneServerResponse:
        view = await asyncio.to_thread(
            self._zones.revoke, actor(), request.name, request.reason, request.confirm
        )
        return zone_service_pb2.RevokeZoneServerResponse(zone_server=zone_server(view))
