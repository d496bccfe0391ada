"""IdentityService: create, list and revoke people's identities; thin over the
identities domain."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.identities import Identities, IdentityState, IdentityView
from keyplane.server.errors import InvalidArgument
from keyplane.server.kinds import Role
from keyplane.server.services import convert
from keyplane.server.services.context import Context, actor, caller
from keyplane.v1 import identity_service_pb2 as pb
from keyplane.v1 import identity_service_pb2_grpc

_ROLE_TO_PROTO = {
    Role.ADMIN: pb.IDENTITY_ROLE_ADMIN,
    Role.OPERATOR: pb.IDENTITY_ROLE_OPERATOR,
    Role.AUDITOR: pb.IDENTITY_ROLE_AUDITOR,
}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}
_STATE_TO_PROTO = {
    IdentityState.LIVE: pb.IDENTITY_STATE_LIVE,
    IdentityState.EXPIRED: pb.IDENTITY_STATE_EXPIRED,
    IdentityState.REVOKED: pb.IDENTITY_STATE_REVOKED,
}


def role_from_proto(value: pb.IdentityRole) -> str:
    """The role's name; "" for UNSPECIFIED (the domain says what to choose)."""
    if value == pb.IDENTITY_ROLE_UNSPECIFIED:
        return ""
    if value not in _ROLE_FROM_PROTO:
        raise InvalidArgument(
            f"unknown identity role {value}; see IdentityRole in identity_service.proto"
        )
    return _ROLE_FROM_PROTO[value].value


def identity(view: IdentityView) -> pb.Identity:
    record = view.record
    return pb.Identity(
        name=view.name,
        role=_ROLE_TO_PROTO[view.role],
        state=_STATE_TO_PROTO[view.state],
        serial=record.serial,
        fingerprint=record.fingerprint,
        issuer_fingerprint=record.issuer_fingerprint,
        issue_time=convert.timestamp(record.issued_at),
        not_after=convert.timestamp(record.not_after),
        revoke_time=convert.timestamp(record.revoked_at),
        revoke_reason=record.revoke_reason or "",
    )


class IdentityServicer(identity_service_pb2_grpc.IdentityServiceServicer):
    """People's identities (admin to change, any person's role to list)."""

    def __init__(self, identities: Identities) -> None:
        self._identities = identities

    async def CreateIdentity(
        self, request: pb.CreateIdentityRequest, context: Context
    ) -> pb.CreateIdentityResponse:
        role = role_from_proto(request.role)
        created = await asyncio.to_thread(
            self._identities.create, actor(), request.name, role, request.csr
        )
        return pb.CreateIdentityResponse(
            identity=identity(created.identity),
            certificate_pem=created.identity.record.certificate_pem,
            roots_pem=created.roots_pem,
        )

    async def ListIdentities(
        self, request: pb.ListIdentitiesRequest, context: Context
    ) -> pb.ListIdentitiesResponse:
        views = await asyncio.to_thread(self._identities.list_identities, request.include_revoked)
        return pb.ListIdentitiesResponse(identities=[identity(v) for v in views])

    async def RevokeIdentity(
        self, request: pb.RevokeIdentityRequest, context: Context
    ) -> pb.RevokeIdentityResponse:
        who = caller()
        views = await asyncio.to_thread(
            self._identities.revoke,
            who.actor,
            request.name,
            request.reason,
            request.confirm,
            request.force,
            who,
        )
        return pb.RevokeIdentityResponse(identities=[identity(v) for v in views])
