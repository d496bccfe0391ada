"""What every console response carries and what every unsafe request must show.

Responses: a strict Content-Security-Policy (the console's own files only, no inline
script or style, no framing), no caching (pages show secrets: a new token, a revealed
value), no referrer, no sniffing. Requests that change anything (any method but GET
and HEAD): from the console's own origin only (Origin, Sec-Fetch-Site), with a form
token derived from the session (checked where the session is, in app.py), and a body
of bounded size.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it, a browser sends "Origin: null" on its POSTs, and the
    # origin check could not tell the console's own forms from anyone's.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
# Forms are small; a backup archive to verify is streamed with its own bound.
MAX_FORM_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 1024 * 1024 * 1024
UPLOAD_PATHS = frozenset({"/backups/verify"})
# Uploads stored in the data dir at once: one per session, and this many in all, so that
# uploads never hold more than a few archives' worth of the state DB's file system.
MAX_UPLOADS = 2
SAFE_METHODS = frozenset({"GET", "HEAD"})


def _with_headers(response: web.StreamResponse, static: bool) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if not static:
        response.headers["Cache-Control"] = "no-store"
    else:
        response.headers.setdefault("Cache-Control", "private, max-age=300")


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    static = request.path.startswith("/static/")
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _with_headers(exc, static)
        raise
    if not response.prepared:
        _with_headers(response, static)
    return response


def cross_site_reason(request: web.Request) -> str | None:
    """Why a request that would change something did not come from the console's own
    pages, or None if it did. A browser says where a request comes from (Origin on
    every POST, Sec-Fetch-Site on every request); a request that says neither is not a
    browser following a page of this console."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site != "same-origin":
        return f"it came from another site (Sec-Fetch-Site: {fetch_site[:20]})"
    origin = request.headers.get("Origin")
    if origin is None:
        if fetch_site == "same-origin":
            return None
        return "it says nothing of where it came from (no Origin header)"
    if origin != f"https://{request.host}":
        return f"it came from another origin ({origin[:80]})"
    return None


def refusal(status: type[web.HTTPException], text: str) -> web.HTTPException:
    return status(text=f"refused: {text}\n", content_type="text/plain")


@web.middleware
async def same_origin_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in SAFE_METHODS:
        return await handler(request)
    why = cross_site_reason(request)
    if why is not None:
        raise refusal(web.HTTPForbidden, f"a cross-site request: {why}")
    limit = MAX_UPLOAD_BYTES if request.path in UPLOAD_PATHS else MAX_FORM_BYTES
    length = request.content_length
    if length is None and request.body_exists:
        raise refusal(web.HTTPLengthRequired, "say the body's length (Content-Length)")
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit,
            actual_size=length,
            text=f"refused: the body is over {limit} bytes\n",
            content_type="text/plain",
        )
    return await handler(request)


class UploadSlots:
    """Who is uploading now: at most one upload per session, MAX_UPLOADS in all. Taken
    before anything is stored, given back when the upload's files are gone."""

    def __init__(self, limit: int = MAX_UPLOADS) -> None:
        self._limit = limit
        self._sessions: set[str] = set()

    def take(self, session_id: str) -> str | None:
        """Why no upload may start now, or None (the slot is then the session's)."""
        if session_id in self._sessions:
            return (
                "an upload of this session is under way: wait for its result (or cancel "
                "it) before you upload another"
            )
        if len(self._sessions) >= self._limit:
            return (
                f"{len(self._sessions)} uploads are under way on this console, the most it "
                "takes at once: try again once one has finished"
            )
        self._sessions.add(session_id)
        return None

    def give_back(self, session_id: str) -> None:
        self._sessions.discard(session_id)
