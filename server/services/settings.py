"""SettingsService: list, read and change settings."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.services import convert
from keyplane.server.services.context import Context, actor, caller
from keyplane.v1 import settings_service_pb2 as pb
from keyplane.v1 import settings_service_pb2_grpc


class SettingsServicer(settings_service_pb2_grpc.SettingsServiceServicer):
    """Thin: converts, calls the settings domain, converts back."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self._hierarchy = hierarchy

    async def ListSettings(
        self, request: pb.ListSettingsRequest, context: Context
    ) -> pb.ListSettingsResponse:
        values = await asyncio.to_thread(self._hierarchy.settings.list, request.reveal, caller())
        return pb.ListSettingsResponse(settings=[convert.setting(s) for s in values])

    async def GetSetting(
        self, request: pb.GetSettingRequest, context: Context
    ) -> pb.GetSettingResponse:
        value = await asyncio.to_thread(
            self._hierarchy.settings.get, request.name, request.reveal, caller()
        )
        return pb.GetSettingResponse(setting=convert.setting(value))

    async def UpdateSetting(
        self, request: pb.UpdateSettingRequest, context: Context
    ) -> pb.UpdateSettingResponse:
        value = await asyncio.to_thread(
            self._hierarchy.update_setting, actor(), request.name, request.value
        )
        return pb.UpdateSettingResponse(setting=convert.setting(value))
