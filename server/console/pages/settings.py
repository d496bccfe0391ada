"""Settings, global and local: name, value, type, whom it affects, description; "New
setting" and "Edit" with the API's own validation messages; protected values masked,
and revealed (admins only, audited) on request."""

from __future__ import annotations

from aiohttp import web

from keyplane.server.console.app import CONSOLE, CallFailed, who
from keyplane.server.domain.settings import may_reveal
from keyplane.v1 import settings_service_pb2 as pb

LIST = "/keyplane.v1.SettingsService/ListSettings"
GET = "/keyplane.v1.SettingsService/GetSetting"
UPDATE = "/keyplane.v1.SettingsService/UpdateSetting"
MAX_NAME = 200


def type_name(value: int) -> str:
    return pb.SettingType.Name(value).removeprefix("SETTING_TYPE_").lower()


async def _settings(request: web.Request) -> list[pb.Setting]:
    listed: pb.ListSettingsResponse = await request.app[CONSOLE].call(
        request, LIST, pb.ListSettingsRequest()
    )
    return list(listed.settings)


async def settings_page(
    request: web.Request,
    status: int = 200,
    error: str = "",
    revealed: pb.Setting | None = None,
) -> web.Response:
    console = request.app[CONSOLE]
    found = await _settings(request)
    return await console.page(
        request,
        "settings.html",
        status=status,
        error=error,
        groups=[
            ("Global", "every server of the deployment", [s for s in found if s.scope == "global"]),
            ("Local", "this server only", [s for s in found if s.scope == "local"]),
        ],
        type_name=type_name,
        revealed=revealed,
        may_reveal=may_reveal(who(request)) and console.may(request, GET),
        UPDATE=UPDATE,
    )


async def show(request: web.Request) -> web.StreamResponse:
    return await settings_page(request)


async def form_page(
    request: web.Request,
    name: str,
    value: str = "",
    status: int = 200,
    error: str = "",
    new: bool = False,
) -> web.Response:
    console = request.app[CONSOLE]
    found = await _settings(request)
    setting = next((s for s in found if s.name == name), None)
    if setting is not None and not value and type_name(setting.type) != "protected":
        value = setting.value
    return await console.page(
        request,
        "setting_form.html",
        status=status,
        error=error,
        name=name,
        value=value,
        setting=setting,
        new=new or setting is None,
        at_default=[s.name for s in found if s.is_default],
        type_name=type_name,
        UPDATE=UPDATE,
    )


async def edit(request: web.Request) -> web.StreamResponse:
    name = request.query.get("name", "")[:MAX_NAME]
    return await form_page(request, name)


async def new(request: web.Request) -> web.StreamResponse:
    return await form_page(request, "", new=True)


async def update(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    name = str(form.get("name", "")).strip()[:MAX_NAME]
    value = str(form.get("value", ""))
    is_new = form.get("new") == "1"
    try:
        changed: pb.UpdateSettingResponse = await console.call(
            request, UPDATE, pb.UpdateSettingRequest(name=name, value=value)
        )
    except CallFailed as exc:
        # The API's own message, on the form as it was filled in (a protected value is
        # not sent back).
        setting_type = ""
        for s in await _settings(request):
            if s.name == name:
                setting_type = type_name(s.type)
        kept = "" if setting_type == "protected" else value
        return await form_page(request, name, kept, exc.http_status, exc.message, is_new)
    shown = changed.setting.value
    console.notice(request, f"{changed.setting.name} is now {shown}.")
    raise web.HTTPSeeOther("/settings")


async def reveal(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    name = str(form.get("name", ""))[:MAX_NAME]
    try:  # the domain refuses anyone but an admin, as it does over gRPC
        got: pb.GetSettingResponse = await console.call(
            request, GET, pb.GetSettingRequest(name=name, reveal=True)
        )
    except CallFailed as exc:
        return await settings_page(request, exc.http_status, exc.message)
    return await settings_page(request, revealed=got.setting)


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/settings", show)
    router.add_get("/settings/edit", edit)
    router.add_get("/settings/new", new)
    router.add_post("/settings/update", update)
    router.add_post("/settings/reveal", reveal)
