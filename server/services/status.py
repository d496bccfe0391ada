"""StatusService: the server at a glance."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.status import ServerStatus, Status
from keyplane.server.services.context import Context
from keyplane.server.services.convert import timestamp
from keyplane.v1 import status_service_pb2 as pb
from keyplane.v1 import status_service_pb2_grpc


def _status(found: ServerStatus) -> pb.GetServerStatusResponse:
    last = found.last_backup
    return pb.GetServerStatusResponse(
        serving=found.serving,
        problems=found.problems,
        backends=[
            pb.BackendHealth(backend=name, up=why is None, problem=why or "")
            for name, why in sorted(found.backends.items())
        ],
        server=found.server,
        version=found.version,
        trust_state_version=found.trust_state_version,
        roots=[
            pb.StatusRoot(
                fingerprint=r.fingerprint,
                name=r.name,
                backend=r.backend,
                create_time=timestamp(r.created_at),
            )
            for r in found.roots
        ],
        next_expiries=[
            pb.StatusExpiry(
                kind=str(k.kind),
                fingerprint=k.fingerprint,
                name=k.name,
                not_after=timestamp(k.not_after),
                state=str(k.state),
            )
            for k in found.next_expiries
        ],
        zones=[
            pb.StatusZone(
                name=z.zone.name,
                last_seen=timestamp(z.zone.last_seen),
                intermediate_not_after=timestamp(z.intermediate_not_after),
            )
            for z in found.zones
        ],
        last_backup=pb.LastBackup(
            create_time=timestamp(last.at),
            actor=last.actor,
            size_bytes=last.size,
            keys=last.keys,
            trust_state_version=last.trust_state_version,
        )
        if last is not None
        else None,
        now=timestamp(found.now),
    )


class StatusServicer(status_service_pb2_grpc.StatusServiceServicer):
    """Thin: reads the status off the event loop and converts it."""

    def __init__(self, status: Status) -> None:
        self._status = status

    async def GetServerStatus(
        self, request: pb.GetServerStatusRequest, context: Context
    ) -> pb.GetServerStatusResponse:
        found = await asyncio.to_thread(self._status.current, request.expiries)
        return _status(found)
