"""The fleet: zone servers (last seen, intermediate expiry, revoke), issued
certificates (search by name or serial, revoke), and enrollment tokens (create shows
the secret once; list; revoke)."""

from __future__ import annotations

import urllib.parse
from typing import Any

from aiohttp import web

from keyplane.server.console.app import CONSOLE, CallFailed
from keyplane.v1 import certificate_service_pb2 as certs_pb
from keyplane.v1 import zone_service_pb2 as zones_pb

LIST_ZONES = "/keyplane.v1.ZoneService/ListZoneServers"
REVOKE_ZONE = "/keyplane.v1.ZoneService/RevokeZoneServer"
LIST_CERTS = "/keyplane.v1.CertificateService/ListCertificates"
REVOKE_CERT = "/keyplane.v1.CertificateService/RevokeCertificate"
CREATE_TOKEN = "/keyplane.v1.CertificateService/CreateEnrollmentToken"  # noqa: S105 - a path
LIST_TOKENS = "/keyplane.v1.CertificateService/ListEnrollmentTokens"
REVOKE_TOKEN = "/keyplane.v1.CertificateService/RevokeEnrollmentToken"  # noqa: S105 - a path
CERTIFICATES_SHOWN = 50
TOKENS_SHOWN = 100
MAX_SEARCH = 128


def _number(text: object, default: int) -> int:
    try:
        return int(str(text).strip()) if str(text).strip() else default
    except ValueError:
        return -1  # the API says what it takes


async def fleet_page(
    request: web.Request,
    status: int = 200,
    error: str = "",
    new_token: certs_pb.CreateEnrollmentTokenResponse | None = None,
    **values: Any,
) -> web.Response:
    console = request.app[CONSOLE]
    search = request.query.get("q", "").strip()[:MAX_SEARCH]
    show_revoked = request.query.get("revoked") == "1"
    zones: zones_pb.ListZoneServersResponse = await console.call(
        request, LIST_ZONES, zones_pb.ListZoneServersRequest(include_revoked=show_revoked)
    )
    found: certs_pb.ListCertificatesResponse = await console.call(
        request,
        LIST_CERTS,
        certs_pb.ListCertificatesRequest(page_size=CERTIFICATES_SHOWN, search=search),
    )
    tokens: certs_pb.ListEnrollmentTokensResponse = await console.call(
        request,
        LIST_TOKENS,
        certs_pb.ListEnrollmentTokensRequest(include_unusable=True, page_size=TOKENS_SHOWN),
    )
    return await console.page(
        request,
        "fleet.html",
        status=status,
        error=error,
        zones=list(zones.zone_servers),
        show_revoked=show_revoked,
        certificates=list(found.certificates),
        search=search,
        shown=CERTIFICATES_SHOWN,
        tokens=list(tokens.tokens),
        new_token=new_token,
        REVOKE_ZONE=REVOKE_ZONE,
        REVOKE_CERT=REVOKE_CERT,
        CREATE_TOKEN=CREATE_TOKEN,
        REVOKE_TOKEN=REVOKE_TOKEN,
        **values,
    )


async def show(request: web.Request) -> web.StreamResponse:
    return await fleet_page(request)


async def revoke_zone(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    name = str(form.get("name", "")).strip()
    try:
        console.require(request, REVOKE_ZONE)
    except CallFailed as exc:
        return await fleet_page(request, exc.http_status, exc.message)
    if str(form.get("confirm", "")).strip() != name:
        return await fleet_page(
            request, 400, "to revoke a zone server, type its name exactly; nothing was revoked"
        )
    try:
        await console.call(
            request,
            REVOKE_ZONE,
            zones_pb.RevokeZoneServerRequest(
                name=name, reason=str(form.get("reason", "")), confirm=True
            ),
        )
    except CallFailed as exc:
        return await fleet_page(request, exc.http_status, exc.message)
    console.notice(
        request,
        f"Revoked zone server {name}: its intermediate, everything it issued and its own "
        "certificates, published in the trust state.",
    )
    raise web.HTTPSeeOther("/fleet")


async def revoke_certificate(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    serial = str(form.get("serial", "")).strip()
    try:
        done: certs_pb.RevokeCertificateResponse = await console.call(
            request,
            REVOKE_CERT,
            certs_pb.RevokeCertificateRequest(
                serial=serial,
                reason=str(form.get("reason", "")),
                confirm=form.get("confirm") == "1",
            ),
        )
    except CallFailed as exc:
        return await fleet_page(request, exc.http_status, exc.message)
    cert = done.certificate
    console.notice(
        request, f"Revoked certificate {cert.serial} ({cert.subject}): {cert.revoke_reason}."
    )
    raise web.HTTPSeeOther("/fleet?" + urllib.parse.urlencode({"q": serial}) + "#certificates")


async def create_token(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    hours = _number(form.get("ttl_hours"), 24)
    message = certs_pb.CreateEnrollmentTokenRequest(
        uses=max(_number(form.get("uses"), 1), 0),
        ttl_seconds=max(hours, 0) * 3600,
        role=str(form.get("role", "agent")),
    )
    try:
        made: certs_pb.CreateEnrollmentTokenResponse = await console.call(
            request, CREATE_TOKEN, message
        )
    except CallFailed as exc:
        return await fleet_page(request, exc.http_status, exc.message)
    # Shown on this response only: it is stored hashed, and the page is never cached.
    return await fleet_page(request, new_token=made)


async def revoke_token(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    token_id = str(form.get("token_id", "")).strip()
    try:
        await console.call(
            request, REVOKE_TOKEN, certs_pb.RevokeEnrollmentTokenRequest(token_id=token_id)
        )
    except CallFailed as exc:
        return await fleet_page(request, exc.http_status, exc.message)
    console.notice(request, f"Revoked enrollment token {token_id}: no enrollment can spend it.")
    raise web.HTTPSeeOther("/fleet#tokens")


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/fleet", show)
    router.add_post("/fleet/zones/revoke", revoke_zone)
    router.add_post("/fleet/certificates/revoke", revoke_certificate)
    router.add_post("/fleet/tokens/create", create_token)
    router.add_post("/fleet/tokens/revoke", revoke_token)
