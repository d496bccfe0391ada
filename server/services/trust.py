"""TrustService: trust with peer servers (active/active); thin over the exchange."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from keyplane.server.domain import certs
from keyplane.server.domain.exchange import TrustExchange
from keyplane.server.domain.peer_messages import load_roots_pem
from keyplane.server.domain.peers import PeerView
from keyplane.server.services import convert
from keyplane.server.services.context import Context, actor
from keyplane.server.store import PeerRecord, TrustEventRecord
from keyplane.v1 import trust_service_pb2 as pb
from keyplane.v1 import trust_service_pb2_grpc, trust_state_pb2


def trust_request(record: PeerRecord) -> pb.TrustRequest:
    return pb.TrustRequest(
        id=record.id,
        direction=record.direction,
        state=record.state,
        peer_fqdn=record.fqdn,
        peer_listen=record.listen,
        peer_bootstrap_listen=record.bootstrap_listen,
        peer_root_fingerprints=list(load_roots_pem(record.peer_roots_pem)),
        own_root_fingerprints=list(record.own_fingerprints),
        comparison_code=record.comparison_code or "",
        create_time=convert.timestamp(record.created_at),
        update_time=convert.timestamp(record.updated_at),
    )


def trusted_peer(view: PeerView) -> pb.TrustedPeer:
    record = view.record
    return pb.TrustedPeer(
        fqdn=record.fqdn,
        request_id=record.id,
        listen=record.listen,
        bootstrap_listen=record.bootstrap_listen,
        roots=[
            trust_state_pb2.TrustedCertificate(
                fingerprint=fp,
                certificate_der=certs.to_der(cert),
                name=certs.common_name_of(cert),
                state="active",
                kind="root",
            )
            for fp, cert in view.roots.items()
        ],
        approved_root_fingerprints=view.approved_fingerprints,
        trust_state_version=record.peer_version,
        last_update_time=convert.timestamp(record.peer_updated_at),
        comparison_code=record.comparison_code or "",
        trusted_time=convert.timestamp(record.trusted_at),
    )


def trust_event(event: TrustEventRecord) -> pb.TrustEvent:
    return pb.TrustEvent(
        time=convert.timestamp(event.at),
        event=event.event,
        request_id=event.request_id,
        peer_fqdn=event.fqdn,
        actor=event.actor,
        fingerprints=list(event.fingerprints),
        detail=event.detail,
    )


class TrustServicer(trust_service_pb2_grpc.TrustServiceServicer):
    """The admin RPCs (mutual TLS) and what peers send (bootstrap listener)."""

    def __init__(self, exchange: TrustExchange, wake_link: Callable[[], None]) -> None:
        self._exchange = exchange
        self._wake_link = wake_link

    async def RequestTrust(
        self, request: pb.RequestTrustRequest, context: Context
    ) -> pb.RequestTrustResponse:
        record = await asyncio.to_thread(
            self._exchange.request, actor(), request.peer, request.peer_fingerprint
        )
        return pb.RequestTrustResponse(request=trust_request(record))

    async def ListTrust(
        self, request: pb.ListTrustRequest, context: Context
    ) -> pb.ListTrustResponse:
        listing = await asyncio.to_thread(self._exchange.listing, request.history_size)
        return pb.ListTrustResponse(
            requests=[trust_request(r) for r in listing.requests],
            peers=[trusted_peer(v) for v in listing.peers],
            history=[trust_event(e) for e in listing.history],
        )

    async def ApproveTrust(
        self, request: pb.ApproveTrustRequest, context: Context
    ) -> pb.ApproveTrustResponse:
        view = await asyncio.to_thread(self._exchange.approve, actor(), request.id)
        self._wake_link()
        return pb.ApproveTrustResponse(peer=trusted_peer(view))

    async def RejectTrust(
        self, request: pb.RejectTrustRequest, context: Context
    ) -> pb.RejectTrustResponse:
        record, told = await asyncio.to_thread(
            self._exchange.reject, actor(), request.id, request.reason
        )
        return pb.RejectTrustResponse(request=trust_request(record), peer_told=told)

    async def RevokeTrust(
        self, request: pb.RevokeTrustRequest, context: Context
    ) -> pb.RevokeTrustResponse:
        record, told = await asyncio.to_thread(
            self._exchange.revoke, actor(), request.peer, request.reason
        )
        return pb.RevokeTrustResponse(request=trust_request(record), peer_told=told)

    async def OfferTrust(
        self, request: pb.OfferTrustRequest, context: Context
    ) -> pb.OfferTrustResponse:
        receipt = await asyncio.to_thread(self._exchange.receive_offer, request.message)
        return pb.OfferTrustResponse(message=receipt)

    async def RevealTrustNonce(
        self, request: pb.RevealTrustNonceRequest, context: Context
    ) -> pb.RevealTrustNonceResponse:
        code = await asyncio.to_thread(self._exchange.receive_reveal, request.message)
        return pb.RevealTrustNonceResponse(comparison_code=code)

    async def DecideTrust(
        self, request: pb.DecideTrustRequest, context: Context
    ) -> pb.DecideTrustResponse:
        ack = await asyncio.to_thread(self._exchange.receive_decision, request.message)
        self._wake_link()
        return pb.DecideTrustResponse(message=ack) if ack else pb.DecideTrustResponse()

    async def EndTrust(self, request: pb.EndTrustRequest, context: Context) -> pb.EndTrustResponse:
        await asyncio.to_thread(self._exchange.receive_end, request.message)
        return pb.EndTrustResponse()

    async def PushTrustState(
        self, request: pb.PushTrustStateRequest, context: Context
    ) -> pb.PushTrustStateResponse:
        held = await asyncio.to_thread(
            self._exchange.accept_update, request.sender_fqdn, list(request.versions), "push"
        )
        return pb.PushTrustStateResponse(held_version=held)
