"""Root key management: a tile per active root, "Create key" (disabled with the reason
at the limit), "Revoke" with a reason and the fingerprint's first characters typed,
the revoked roots, and the legacy root."""

from __future__ import annotations

from aiohttp import web

from keyplane.server.console.app import CONSOLE, CallFailed, who
from keyplane.server.domain.roots import MAX_ACTIVE_ROOTS
from keyplane.v1 import common_pb2
from keyplane.v1 import root_key_service_pb2 as pb

LIST = "/keyplane.v1.RootKeyService/ListRootKeys"
CREATE = "/keyplane.v1.RootKeyService/CreateRootKey"
REVOKE = "/keyplane.v1.RootKeyService/RevokeRootKey"
# How much of the fingerprint a revocation asks to be typed, to confirm which root.
CONFIRM_CHARS = 8
ALGORITHMS: dict[int, str] = {
    common_pb2.KEY_ALGORITHM_EC_P256: "EC P-256",
    common_pb2.KEY_ALGORITHM_EC_P384: "EC P-384",
    common_pb2.KEY_ALGORITHM_RSA_2048: "RSA 2048",
    common_pb2.KEY_ALGORITHM_RSA_3072: "RSA 3072",
    common_pb2.KEY_ALGORITHM_RSA_4096: "RSA 4096",
}


def algorithm_name(value: int) -> str:
    return ALGORITHMS.get(value, "unknown")


def create_blocked(active: list[pb.RootKey]) -> str:
    """Why no root can be created now ("" if one can): the domain's limit."""
    if len(active) < MAX_ACTIVE_ROOTS:
        return ""
    names = " and ".join(r.name for r in active)
    return (
        f"{len(active)} root keys are active ({names}), the most there may be: revoke "
        "one before creating another"
    )


async def roots_page(
    request: web.Request, status: int = 200, error: str = "", typed: dict[str, str] | None = None
) -> web.Response:
    console = request.app[CONSOLE]
    listed: pb.ListRootKeysResponse = await console.call(request, LIST, pb.ListRootKeysRequest())
    active = list(listed.active)
    return await console.page(
        request,
        "roots.html",
        status=status,
        error=error,
        active=active,
        revoked=sorted(listed.revoked, key=lambda r: r.revoke_time.seconds, reverse=True),
        legacy=listed.legacy if listed.HasField("legacy") else None,
        peers=list(listed.peers),
        blocked=create_blocked(active),
        signed_in_by=who(request).issuer_fingerprint,
        algorithm=algorithm_name,
        confirm_chars=CONFIRM_CHARS,
        typed=typed or {},
        CREATE=CREATE,
        REVOKE=REVOKE,
    )


async def show(request: web.Request) -> web.StreamResponse:
    return await roots_page(request)


async def create(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    try:
        made: pb.CreateRootKeyResponse = await console.call(
            request, CREATE, pb.CreateRootKeyRequest()
        )
    except CallFailed as exc:
        return await roots_page(request, exc.http_status, exc.message)
    root = made.root_key
    console.notice(
        request,
        f"Created {root.name} ({root.fingerprint[:16]}…); every subordinate was re-issued "
        "under it and published in the trust state.",
    )
    raise web.HTTPSeeOther("/roots")


async def revoke(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    fingerprint = str(form.get("fingerprint", "")).strip().lower()
    reason = str(form.get("reason", "")).strip()
    typed = str(form.get("confirm", "")).strip().lower()
    kept = {"fingerprint": fingerprint, "reason": reason}
    try:
        console.require(request, REVOKE)
    except CallFailed as exc:
        return await roots_page(request, exc.http_status, exc.message)
    if len(typed) < CONFIRM_CHARS or not fingerprint.startswith(typed):
        return await roots_page(
            request,
            400,
            f"to revoke the root, type the first {CONFIRM_CHARS} characters of its "
            "fingerprint exactly; nothing was revoked",
            kept,
        )
    try:
        done: pb.RevokeRootKeyResponse = await console.call(
            request,
            REVOKE,
            pb.RevokeRootKeyRequest(fingerprint=fingerprint, reason=reason, confirm=True),
        )
    except CallFailed as exc:
        return await roots_page(request, exc.http_status, exc.message, kept)
    console.notice(
        request,
        f"Revoked {done.root_key.name}: its key is destroyed and everything it issued is "
        "revoked, published in the trust state.",
    )
    raise web.HTTPSeeOther("/roots")


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/roots", show)
    router.add_post("/roots/create", create)
    router.add_post("/roots/revoke", revoke)
