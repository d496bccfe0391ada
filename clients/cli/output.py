"""What the CLI prints: aligned tables, indented JSON, and timestamps as ISO 8601 UTC."""

from __future__ import annotations

import datetime
import json

from google.protobuf import timestamp_pb2


def timestamp(ts: timestamp_pb2.Timestamp, present: bool = True) -> str | None:
    """`ts` as "2026-11-29T05:30:24.512000Z"; None when the field is unset."""
    if not present:
        return None
    return ts.ToDatetime(tzinfo=datetime.UTC).isoformat().replace("+00:00", "Z")


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))
