"""Signing in with a one-time link, and signing out."""

from __future__ import annotations

import asyncio

from aiohttp import web

from keyplane.server.console.app import (
    CONSOLE,
    forget_session_cookie,
    session_of,
    set_session_cookie,
)
from keyplane.server.domain.console_sessions import SignInRefused

SIGNED_OUT = "You are signed out."


async def sign_in(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    link = request.query.get("link")
    if link is None:
        message = SIGNED_OUT if request.query.get("out") == "1" else ""
        return console.signed_out_page(message, 200)
    # A link opened from another site's page is someone else's link in your browser
    # (signing you in as them): open yours from the address bar or a terminal.
    fetch_site = request.headers.get("Sec-Fetch-Site", "none")
    if fetch_site not in ("none", "same-origin"):
        return console.signed_out_page(
            "this sign-in link was opened from another site's page, which could sign you "
            "in as someone else; paste the link into the address bar instead",
            403,
        )
    try:
        session = await asyncio.to_thread(console.sign_in.redeem, link)
    except SignInRefused as exc:
        return console.signed_out_page(str(exc), 401)
    response = web.HTTPSeeOther("/roots")
    set_session_cookie(response, session)
    raise response


async def sign_out(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    await asyncio.to_thread(console.sign_in.sign_out, session_of(request))
    response = web.HTTPSeeOther("/signin?out=1")
    forget_session_cookie(response)
    raise response


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/signin", sign_in)
    router.add_post("/signout", sign_out)
