"""The audit log: filter by time, actor and action, newest first, a page at a time (the
API's own paging: a page token bound to the filters)."""

from __future__ import annotations

import datetime
import json
import urllib.parse

from aiohttp import web
from google.protobuf import timestamp_pb2

from keyplane.server.console.app import CONSOLE, CallFailed
from keyplane.v1 import audit_service_pb2 as pb

LIST = "/keyplane.v1.AuditService/ListAuditEvents"
PAGE_SIZE = 50
MAX_FILTER = 200


def _time(text: str) -> timestamp_pb2.Timestamp | None:
    """A datetime-local input's value (read as UTC); None if empty. ValueError if bad."""
    if not text:
        return None
    value = datetime.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(datetime.UTC))
    return stamp


def _details(raw: str) -> str:
    try:
        found = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(found, dict):
        return raw
    return ", ".join(f"{k}: {v}" for k, v in found.items())


async def show(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    query = request.query
    filters = {
        name: query.get(name, "").strip()[:MAX_FILTER]
        for name in ("since", "until", "actor", "action")
    }
    page_token = query.get("page", "")[:MAX_FILTER]
    message = pb.ListAuditEventsRequest(
        actor=filters["actor"], action=filters["action"], page_size=PAGE_SIZE, page_token=page_token
    )
    error, status = "", 200
    try:
        for name in ("since", "until"):
            stamp = _time(filters[name])
            if stamp is not None:
                getattr(message, name).CopyFrom(stamp)
    except ValueError:
        error, status = "since and until are dates and times, e.g. 2026-11-29T05:30", 400
    events: list[pb.AuditEvent] = []
    next_page = ""
    if not error:
        try:
            found: pb.ListAuditEventsResponse = await console.call(request, LIST, message)
            events, next_page = list(found.events), found.next_page_token
        except CallFailed as exc:
            error, status = exc.message, exc.http_status
    kept = {k: v for k, v in filters.items() if v}
    return await console.page(
        request,
        "audit.html",
        status=status,
        error=error,
        filters=filters,
        events=events,
        first_page=bool(page_token),
        first_url="/audit?" + urllib.parse.urlencode(kept),
        next_url=("/audit?" + urllib.parse.urlencode({**kept, "page": next_page}))
        if next_page
        else "",
        details=_details,
        LIST=LIST,
    )


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/audit", show)
