"""The console's web application: who is signed in on each request, the form token,
the page frame every page shares, and the one way a page calls the server (the RPC it
mirrors, through calls.py)."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message

from keyplane.server.console import render
from keyplane.server.console.calls import ConsoleCalls
from keyplane.server.console.security import (
    MAX_FORM_BYTES,
    SAFE_METHODS,
    UPLOAD_PATHS,
    Handler,
    UploadSlots,
    refusal,
    same_origin_writes,
    security_headers,
)
from keyplane.server.domain.console_sessions import (
    SESSION_LIFETIME,
    ConsoleSignIn,
    Session,
    SignInRefused,
    csrf_matches,
)
from keyplane.server.domain.identity import Identity
from keyplane.server.interceptor import status_for

log = logging.getLogger(__name__)

# `__Host-`: the browser keeps it only if Secure, for this host alone, for every path.
COOKIE = "__Host-keyplane-session"
PUBLIC_PATHS = frozenset({"/signin", "/favicon.ico"})
MAX_NOTICES = 10
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}


@dataclass(frozen=True)
class Status:
    """The strip on every page."""

    serving: bool
    stopped_part: str | None
    hsm: str  # "reachable", "unreachable" or "not used"
    sealing: str  # how pki.db is sealed: "a password" or "a key file"
    trust_version: int


class CallFailed(Exception):
    """An RPC the console made was refused; `message` is the API's own."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


CONSOLE: web.AppKey[Console] = web.AppKey("console")
SESSION_KEY: web.RequestKey[Session] = web.RequestKey("keyplane.session", Session)


def session_of(request: web.Request) -> Session:
    return request[SESSION_KEY]


def who(request: web.Request) -> Identity:
    return session_of(request).identity


class Console:
    """What every page handler reaches through `request.app[CONSOLE]`."""

    def __init__(
        self,
        calls: ConsoleCalls,
        sign_in: ConsoleSignIn,
        status: Callable[[], Status],
        fqdn: str,
        workdir_root: Path,
        sections: tuple[render.Section, ...] = render.SECTIONS,
    ) -> None:
        self.calls = calls
        self.workdir_root = workdir_root
        self.uploads = UploadSlots()
        self.sign_in = sign_in
        self._status = status
        self.fqdn = fqdn
        self.sections = sections
        self.env = render.environment()
        # What every page says at its top when there is something to say ("" if not).
        self.banners: list[Callable[[web.Request], Awaitable[str]]] = []
        # Notices for the page after a redirect, per session; this process serves the
        # console alone (worker 0), and a notice lost to a restart costs nothing.
        self._notices: dict[str, list[tuple[str, str]]] = {}

    # -- calling the server ----------------------------------------------------------------

    async def call(self, request: web.Request, method: str, message: Message) -> Any:
        """The RPC `method` as the signed-in identity; CallFailed with the API's message."""
        try:
            return await self.calls.call(method, message, who(request))
        except Exception as exc:
            code, text, reason = status_for(exc)
            raise CallFailed(code, text, reason) from None

    def require(self, request: web.Request, method: str) -> None:
        """CallFailed (the refusal audited) unless the signed-in identity may call
        `method`: asked before a page checks a form of its own."""
        try:
            self.calls.check(method, who(request))
        except Exception as exc:
            code, text, reason = status_for(exc)
            raise CallFailed(code, text, reason) from None

    async def stream(
        self, request: web.Request, method: str, message: Message
    ) -> AsyncIterator[Any]:
        try:
            async for response in self.calls.stream(method, message, who(request)):
                yield response
        except Exception as exc:
            code, text, reason = status_for(exc)
            raise CallFailed(code, text, reason) from None

    def may(self, request: web.Request, method: str) -> bool:
        return self.calls.may(method, who(request))

    def new_workdir(self) -> Path:
        """A private dir beside the databases (an uploaded archive holds sealed keys)."""
        return Path(tempfile.mkdtemp(prefix=".console-upload-", dir=self.workdir_root))

    # -- pages -----------------------------------------------------------------------------

    def notice(self, request: web.Request, text: str, kind: str = "ok") -> None:
        notices = self._notices.setdefault(session_of(request).id, [])
        notices.append((kind, text))
        del notices[:-MAX_NOTICES]
        if len(self._notices) > 10_000:  # sessions that never came back for theirs
            self._notices.clear()

    async def page(
        self,
        request: web.Request,
        template: str,
        status: int = 200,
        error: str = "",
        **values: Any,
    ) -> web.Response:
        session = session_of(request)
        identity = session.identity
        strip = await asyncio.to_thread(self._status)
        notices = self._notices.pop(session.id, [])
        if error:
            notices.append(("error", error))
        banners = [text for banner in self.banners if (text := await banner(request))]

        def may(method: str) -> bool:
            return self.calls.may(method, identity)

        def needs(method: str) -> str:
            """Why a control is disabled for this identity ("" if it is not)."""
            if may(method):
                return ""
            return "your role may not do this (" + method.rsplit("/", 1)[1] + ")"

        frame = {
            "who": identity,
            "roles": ", ".join(sorted(identity.roles)),
            "csrf": session.csrf_token,
            "sections": self.sections,
            "current": "/" + request.path.strip("/").split("/", 1)[0],
            "status": strip,
            "notices": notices,
            "banners": banners,
            "fqdn": self.fqdn,
            "may": may,
            "needs": needs,
        }
        return render.html(self.env, template, {**frame, **values}, status)

    def signed_out_page(self, message: str, status: int) -> web.Response:
        return render.html(self.env, "signin.html", {"message": message, "fqdn": self.fqdn}, status)


def _forget_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")


@web.middleware
async def signed_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every page but sign-in and the static files needs a live session, checked (and
    its identity admitted) on every request; every change needs the session's form
    token too."""
    if request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
        return await handler(request)
    console = request.app[CONSOLE]
    cookie = request.cookies.get(COOKIE, "")
    try:
        session = await asyncio.to_thread(console.sign_in.session, cookie)
    except SignInRefused as exc:
        response = console.signed_out_page(str(exc), 401)
        if cookie:
            _forget_cookie(response)
        return response
    request[SESSION_KEY] = session
    if request.method not in SAFE_METHODS and request.path not in UPLOAD_PATHS:
        form = await request.post()
        given = form.get("csrf")
        if not isinstance(given, str) or not csrf_matches(session.cookie, given):
            raise refusal(
                web.HTTPForbidden,
                "the form token is missing or wrong; reload the page and try again",
            )
    return await handler(request)


def set_session_cookie(response: web.StreamResponse, session: Session) -> None:
    response.set_cookie(
        COOKIE,
        session.cookie,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        path="/",
        secure=True,
        httponly=True,
        samesite="Strict",
    )


def forget_session_cookie(response: web.StreamResponse) -> None:
    _forget_cookie(response)


def make_app(console: Console) -> web.Application:
    # Imported here: each page module imports this one for CONSOLE and its helpers.
    from keyplane.server.console.pages import register, trust

    app = web.Application(
        middlewares=[security_headers, same_origin_writes, signed_in],
        client_max_size=MAX_FORM_BYTES,
        client_max_fields=100,
    )
    app[CONSOLE] = console
    console.banners.append(trust.pending_banner)
    register(app)
    return app
