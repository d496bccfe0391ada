"""SettingsService: list, read and change settings."""

from __future__ import annotations

import asyncio

from keyplane.server.domain.forecast import Forecasts
from keyplane.server.domain.hierarchy import Hierarchy
from keyplane.server.services import convert, rotation
from keyplane.server.services.context import Context, actor, caller
from keyplane.v1 import settings_service_pb2 as pb
from keyplane.v1 import settings_service_pb2_grpc


class SettingsServicer(settings_service_pb2_grpc.SettingsServiceServicer):
    """Thin: converts, calls the settings domain, converts back."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self._hierarchy = hierarchy
        self._forecasts = Forecasts(hierarchy)

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
        if request.dry_run:
            value, before, after = await asyncio.to_thread(
                self._forecasts.try_setting, request.name, request.value
            )
            return pb.UpdateSettingResponse(
                setting=convert.setting(value),
                dry_run=True,
                forecast_before=rotation.summary(before) if before else None,
                forecast_after=rotation.summary(after) if after else None,
            )
        value = await asyncio.to_thread(
            self._hierarchy.update_setting, actor(), request.name, request.value
        )
        return pb.UpdateSettingResponse(setting=convert.setting(value))
