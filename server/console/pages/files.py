"""Infrastructure configuration files: the init bundle new components start from, and
the legacy public key file, offered only while EnableLegacyProtocol is on."""

from __future__ import annotations

from aiohttp import web

from keyplane.server.console.app import CONSOLE, CallFailed
from keyplane.v1 import bundle_service_pb2 as pb
from keyplane.v1 import settings_service_pb2

BUNDLE = "/keyplane.v1.BundleService/GetInitBundle"
LEGACY = "/keyplane.v1.BundleService/GetLegacyPublicKey"
GET_SETTING = "/keyplane.v1.SettingsService/GetSetting"
LEGACY_SETTING = "EnableLegacyProtocol"


async def files_page(request: web.Request, status: int = 200, error: str = "") -> web.Response:
    console = request.app[CONSOLE]
    setting: settings_service_pb2.GetSettingResponse = await console.call(
        request, GET_SETTING, settings_service_pb2.GetSettingRequest(name=LEGACY_SETTING)
    )
    return await console.page(
        request,
        "files.html",
        status=status,
        error=error,
        legacy_on=setting.setting.value == "true",
        LEGACY_SETTING=LEGACY_SETTING,
        BUNDLE=BUNDLE,
        LEGACY=LEGACY,
    )


async def show(request: web.Request) -> web.StreamResponse:
    return await files_page(request)


def _download(body: bytes, filename: str, content_type: str) -> web.Response:
    return web.Response(
        body=body,
        content_type=content_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


async def init_bundle(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    try:
        found: pb.GetInitBundleResponse = await console.call(
            request, BUNDLE, pb.GetInitBundleRequest()
        )
    except CallFailed as exc:
        return await files_page(request, exc.http_status, exc.message)
    # The same bytes as 'keyplane bundle download' writes.
    return _download(
        found.bundle.SerializeToString(), "keyplane-init.dat", "application/octet-stream"
    )


async def legacy_public_key(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    try:
        found: pb.GetLegacyPublicKeyResponse = await console.call(
            request, LEGACY, pb.GetLegacyPublicKeyRequest()
        )
    except CallFailed as exc:
        return await files_page(request, exc.http_status, exc.message)
    return _download(found.public_key_pem.encode(), "keyplane.pub", "application/x-pem-file")


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/files", show)
    router.add_get("/files/keyplane-init.dat", init_bundle)
    router.add_get("/files/keyplane.pub", legacy_public_key)
