"""Server-rendered pages: one jinja2 environment over templates/ (autoescaped), the
values every page has (who is signed in, the form token, the navigation, the status
strip, notices), and the filters the templates use."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from google.protobuf import timestamp_pb2

# What a table shows for a time that is not set.
NONE = "\N{EN DASH}"
TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class Section:
    """One entry of the navigation: a page of the console."""

    path: str
    title: str


# The pages, in the order the navigation shows them.
SECTIONS = (
    Section("/roots", "Root keys"),
    Section("/keys", "Subordinate keys"),
    Section("/files", "Configuration files"),
    Section("/trust", "Trust"),
    Section("/settings", "Settings"),
    Section("/fleet", "Fleet"),
    Section("/audit", "Audit log"),
    Section("/backups", "Backups"),
)


def when(value: timestamp_pb2.Timestamp | datetime.datetime | None, present: bool = True) -> str:
    """A time as "2026-11-29 05:30:24 UTC"; an unset Timestamp as an en dash."""
    if value is None or not present:
        return NONE
    if isinstance(value, timestamp_pb2.Timestamp):
        if value.seconds == 0 and value.nanos == 0:
            return NONE
        value = value.ToDatetime(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(value: timestamp_pb2.Timestamp) -> str:
    return value.ToDatetime(tzinfo=datetime.UTC).isoformat()


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["iso"] = iso
    return env


def html(
    env: jinja2.Environment, template: str, values: dict[str, Any], status: int = 200
) -> web.Response:
    body = env.get_template(template).render(**values)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
