"""RootKeyService: create, list, show and revoke root keys; read the legacy root."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.errors import FailedPrecondition
from keyplane.server.kinds import KeyKind
from keyplane.server.services import convert, rotation
from keyplane.server.services.context import Context, actor
from keyplane.v1 import root_key_service_pb2 as pb
from keyplane.v1 import root_key_service_pb2_grpc


class RootKeyServicer(root_key_service_pb2_grpc.RootKeyServiceServicer):
    """Thin: each method converts, calls the hierarchy off the event loop, converts back."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self._hierarchy = hierarchy

    async def CreateRootKey(
        self, request: pb.CreateRootKeyRequest, context: Context
    ) -> pb.CreateRootKeyResponse:
        algorithm = convert.algorithm_from_proto(request.algorithm)
        record = await asyncio.to_thread(self._hierarchy.roots.create, actor(), algorithm)
        return pb.CreateRootKeyResponse(root_key=convert.root_key(record))

    async def ListRootKeys(
        self, request: pb.ListRootKeysRequest, context: Context
    ) -> pb.ListRootKeysResponse:
        def read() -> pb.ListRootKeysResponse:
            legacy = self._hierarchy.legacy_root()
            return pb.ListRootKeysResponse(
                active=[convert.root_key(r) for r in self._hierarchy.active_roots()],
                revoked=[convert.root_key(r) for r in self._hierarchy.revoked_roots()],
                legacy=convert.legacy_root_key(legacy, self._hierarchy.public_key_of(legacy)),
                peers=[
                    pb.PeerRoots(
                        server_fqdn=view.fqdn,
                        roots=view.server().roots,
                        trust_state_version=view.record.peer_version,
                    )
                    for view in self._hierarchy.admission.peers.views()
                ],
            )

        return await asyncio.to_thread(read)

    async def GetRootKey(
        self, request: pb.GetRootKeyRequest, context: Context
    ) -> pb.GetRootKeyResponse:
        record = await asyncio.to_thread(self._hierarchy.root, request.fingerprint)
        if record.kind == KeyKind.LEGACY_ROOT:
            raise FailedPrecondition(
                "that is the legacy root, which has no certificate; use GetLegacyRootKey"
            )
        return pb.GetRootKeyResponse(root_key=convert.root_key(record))

    async def RevokeRootKey(
        self, request: pb.RevokeRootKeyRequest, context: Context
    ) -> pb.RevokeRootKeyResponse:
        record, plan = await asyncio.to_thread(
            self._hierarchy.roots.revoke,
            actor(),
            request.fingerprint,
            request.reason,
            request.confirm,
            request.dry_run,
            request.force,
        )
        return pb.RevokeRootKeyResponse(root_key=convert.root_key(record), plan=rotation.plan(plan))

    async def GetRootCoverage(
        self, request: pb.GetRootCoverageRequest, context: Context
    ) -> pb.GetRootCoverageResponse:
        found = await asyncio.to_thread(self._hierarchy.roots.coverage, request.straggler_limit)
        return rotation.coverage(found)

    async def GetLegacyRootKey(
        self, request: pb.GetLegacyRootKeyRequest, context: Context
    ) -> pb.GetLegacyRootKeyResponse:
        def read() -> pb.GetLegacyRootKeyResponse:
            legacy = self._hierarchy.legacy_root()
            return pb.GetLegacyRootKeyResponse(
                legacy=convert.legacy_root_key(legacy, self._hierarchy.public_key_of(legacy))
            )

        return await asyncio.to_thread(read)
