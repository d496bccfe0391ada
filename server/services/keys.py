"""KeyService: list and rotate subordinate keys, and forecast the renewals ahead."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.forecast import Forecasts
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.services import convert, rotation
from keyplane.server.services.context import Context, actor
from keyplane.v1 import key_service_pb2 as pb
from keyplane.v1 import key_service_pb2_grpc


class KeyServicer(key_service_pb2_grpc.KeyServiceServicer):
    """Thin: converts, calls the hierarchy off the event loop, converts back."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self._hierarchy = hierarchy
        self._forecasts = Forecasts(hierarchy)

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        kind = convert.kind_from_proto(request.kind, required=False)
        records = await asyncio.to_thread(self._hierarchy.subordinate_keys, kind)
        usage = await asyncio.to_thread(self._hierarchy.store.key_usage)
        return pb.ListKeysResponse(keys=[convert.key(r, usage.get(r.fingerprint)) for r in records])

    async def RotateKey(
        self, request: pb.RotateKeyRequest, context: Context
    ) -> pb.RotateKeyResponse:
        kind = convert.kind_from_proto(request.kind, required=True)
        assert kind is not None  # noqa: S101 - required=True
        record = await asyncio.to_thread(self._hierarchy.rotation.rotate_key, actor(), kind)
        return pb.RotateKeyResponse(key=convert.key(record))

    async def GetRotationForecast(
        self, request: pb.GetRotationForecastRequest, context: Context
    ) -> pb.GetRotationForecastResponse:
        found = await asyncio.to_thread(self._forecasts.forecast, request.hours)
        return pb.GetRotationForecastResponse(forecast=rotation.forecast(found))
