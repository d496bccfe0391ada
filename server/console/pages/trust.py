"""Trust between servers (active/active): a banner on every page while a peer's request
waits; the requests under way with both servers' root fingerprints and the comparison
code side by side, Approve and Reject; the trusted peers with Revoke; asking a peer for
trust; and the history of it all."""

from __future__ import annotations

from aiohttp import web

from keyplane.server.console.app import CONSOLE, CallFailed
from keyplane.v1 import trust_service_pb2 as pb

LIST = "/keyplane.v1.TrustService/ListTrust"
REQUEST = "/keyplane.v1.TrustService/RequestTrust"
APPROVE = "/keyplane.v1.TrustService/ApproveTrust"
REJECT = "/keyplane.v1.TrustService/RejectTrust"
REVOKE = "/keyplane.v1.TrustService/RevokeTrust"
HISTORY = 200
MAX_FIELD = 300


def waiting_for_approval(listed: pb.ListTrustResponse) -> list[pb.TrustRequest]:
    """Requests from peers that this server's admin can decide now."""
    return [r for r in listed.requests if r.direction == "incoming" and r.state == "pending"]


async def pending_banner(request: web.Request) -> str:
    """What every page says while a peer's request waits here ("" when none does)."""
    console = request.app[CONSOLE]
    if not console.may(request, LIST):
        return ""
    try:
        listed: pb.ListTrustResponse = await console.call(request, LIST, pb.ListTrustRequest())
    except CallFailed:
        return ""  # the page itself still shows; the Trust page says what is wrong
    waiting = waiting_for_approval(listed)
    if not waiting:
        return ""
    names = ", ".join(sorted({r.peer_fqdn for r in waiting}))
    return f"A trust request from {names} is waiting for an admin's decision on the Trust page."


async def trust_page(
    request: web.Request,
    status: int = 200,
    error: str = "",
    typed: dict[str, str] | None = None,
) -> web.Response:
    console = request.app[CONSOLE]
    listed: pb.ListTrustResponse = await console.call(
        request, LIST, pb.ListTrustRequest(history_size=HISTORY)
    )
    return await console.page(
        request,
        "trust.html",
        status=status,
        error=error,
        requests=list(listed.requests),
        decidable={r.id for r in waiting_for_approval(listed)},
        peers=list(listed.peers),
        history=list(reversed(listed.history)),
        typed=typed or {},
        REQUEST=REQUEST,
        APPROVE=APPROVE,
        REJECT=REJECT,
        REVOKE=REVOKE,
    )


async def show(request: web.Request) -> web.StreamResponse:
    return await trust_page(request)


async def _field(request: web.Request, name: str) -> str:
    form = await request.post()
    return str(form.get(name, "")).strip()[:MAX_FIELD]


async def ask(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    peer, fingerprint = await _field(request, "peer"), await _field(request, "fingerprint")
    try:
        made: pb.RequestTrustResponse = await console.call(
            request, REQUEST, pb.RequestTrustRequest(peer=peer, peer_fingerprint=fingerprint)
        )
    except CallFailed as exc:
        return await trust_page(
            request, exc.http_status, exc.message, {"peer": peer, "fingerprint": fingerprint}
        )
    console.notice(
        request,
        f"Asked {made.request.peer_fqdn} for trust. Read the comparison code "
        f"{made.request.comparison_code} to its admin: trust begins once they approve.",
    )
    raise web.HTTPSeeOther("/trust")


async def approve(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    request_id = await _field(request, "id")
    try:
        peer: pb.ApproveTrustResponse = await console.call(
            request, APPROVE, pb.ApproveTrustRequest(id=request_id)
        )
    except CallFailed as exc:
        return await trust_page(request, exc.http_status, exc.message)
    console.notice(
        request,
        f"Approved: {peer.peer.fqdn} is trusted, its roots are in this server's bundle and "
        "trust state.",
    )
    raise web.HTTPSeeOther("/trust")


async def reject(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    request_id, reason = await _field(request, "id"), await _field(request, "reason")
    try:
        done: pb.RejectTrustResponse = await console.call(
            request, REJECT, pb.RejectTrustRequest(id=request_id, reason=reason)
        )
    except CallFailed as exc:
        return await trust_page(request, exc.http_status, exc.message)
    told = "" if done.peer_told else " (the peer is told when it answers)"
    console.notice(request, f"Rejected request {request_id}{told}.")
    raise web.HTTPSeeOther("/trust")


async def revoke(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    peer, reason = await _field(request, "peer"), await _field(request, "reason")
    try:
        console.require(request, REVOKE)
    except CallFailed as exc:
        return await trust_page(request, exc.http_status, exc.message)
    if await _field(request, "confirm") != peer:
        return await trust_page(
            request, 400, "to end the trust, type the peer's name exactly; nothing changed"
        )
    try:
        done: pb.RevokeTrustResponse = await console.call(
            request, REVOKE, pb.RevokeTrustRequest(peer=peer, reason=reason)
        )
    except CallFailed as exc:
        return await trust_page(request, exc.http_status, exc.message)
    told = "" if done.peer_told else "; the peer is told as soon as it answers"
    console.notice(request, f"Ended the trust with {peer}: its roots are no longer trusted{told}.")
    raise web.HTTPSeeOther("/trust")


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/trust", show)
    router.add_post("/trust/request", ask)
    router.add_post("/trust/approve", approve)
    router.add_post("/trust/reject", reject)
    router.add_post("/trust/revoke", revoke)
