"""The console's pages, one module per area; each adds its routes here."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from keyplane.server.console.pages import (
    audit,
    backups,
    files,
    fleet,
    keys,
    roots,
    settings,
    signin,
    trust,
)

STATIC = Path(__file__).resolve().parent.parent / "static"


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/roots")


async def favicon(request: web.Request) -> web.StreamResponse:
    """What a browser asks for on a page that names no icon (a plain-text refusal)."""
    return web.FileResponse(STATIC / "favicon.svg", headers={"Content-Type": "image/svg+xml"})


def register(app: web.Application) -> None:
    app.router.add_get("/", home)
    app.router.add_get("/favicon.ico", favicon)
    for area in (signin, roots, keys, files, trust, settings, fleet, audit, backups):
        area.register(app.router)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
