"""Subordinate keys: each key's kind, fingerprint, issuer, validity, state, backend and
next rotation (its not-after less the kind's renewal window), and "Rotate now"."""

from __future__ import annotations

import datetime

from aiohttp import web

from keyplane.server.console.app import CONSOLE, CallFailed
from keyplane.server.console.render import NONE
from keyplane.server.domain.rotation import SETTINGS_KIND, SUBORDINATE_NAMES
from keyplane.server.kinds import KeyKind
from keyplane.v1 import key_service_pb2 as pb
from keyplane.v1 import settings_service_pb2

LIST = "/keyplane.v1.KeyService/ListKeys"
ROTATE = "/keyplane.v1.KeyService/RotateKey"
SETTINGS = "/keyplane.v1.SettingsService/ListSettings"


def kind_of(value: int) -> KeyKind:
    return KeyKind(pb.KeyKind.Name(value).removeprefix("KEY_KIND_").lower())


def state_name(value: int) -> str:
    return pb.KeyState.Name(value).removeprefix("KEY_STATE_").lower()


def next_rotation(key: pb.Key, windows: dict[KeyKind, datetime.timedelta]) -> str:
    if key.state != pb.KEY_STATE_ACTIVE or not key.HasField("not_after"):
        return NONE
    at = key.not_after.ToDatetime(tzinfo=datetime.UTC) - windows[kind_of(key.kind)]
    return at.strftime("%Y-%m-%d %H:%M UTC")


async def keys_page(request: web.Request, status: int = 200, error: str = "") -> web.Response:
    console = request.app[CONSOLE]
    listed: pb.ListKeysResponse = await console.call(request, LIST, pb.ListKeysRequest())
    settings: settings_service_pb2.ListSettingsResponse = await console.call(
        request, SETTINGS, settings_service_pb2.ListSettingsRequest()
    )
    values = {s.name: s.value for s in settings.settings}
    windows = {
        kind: datetime.timedelta(hours=int(values[f"PKI{name}KeyRenewalWindowHours"]))
        for kind, name in SETTINGS_KIND.items()
    }
    return await console.page(
        request,
        "keys.html",
        status=status,
        error=error,
        keys=list(listed.keys),
        kinds=[(k, SUBORDINATE_NAMES[k], k.value.replace("_", "-")) for k in SETTINGS_KIND],
        kind_name=lambda v: SUBORDINATE_NAMES[kind_of(v)],
        state_name=state_name,
        next_rotation=lambda k: next_rotation(k, windows),
        ROTATE=ROTATE,
    )


async def show(request: web.Request) -> web.StreamResponse:
    return await keys_page(request)


ROTATABLE = {
    "server-tls": pb.KEY_KIND_SERVER_TLS,
    "intermediate-tls": pb.KEY_KIND_INTERMEDIATE_TLS,
    "message-signing": pb.KEY_KIND_MESSAGE_SIGNING,
}


async def rotate(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    kind = ROTATABLE.get(str(form.get("kind", "")), pb.KEY_KIND_UNSPECIFIED)
    try:
        done: pb.RotateKeyResponse = await console.call(
            request, ROTATE, pb.RotateKeyRequest(kind=kind)
        )
    except CallFailed as exc:
        return await keys_page(request, exc.http_status, exc.message)
    console.notice(
        request,
        f"Rotated the {SUBORDINATE_NAMES[kind_of(done.key.kind)]} key: {done.key.name} "
        f"({done.key.fingerprint[:16]}…) is active.",
    )
    raise web.HTTPSeeOther("/keys")


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/keys", show)
    router.add_post("/keys/rotate", rotate)
