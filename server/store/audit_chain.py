"""The audit log's hash chain: how an event's hash is computed, in one place for the
writes, the schema-4 migration and `VerifyAuditLog`.

Each event's hash is SHA-256 over a canonical encoding of its own stored fields and the
previous event's hash (`prev_hash`; 64 zeros for the first event):

    sha256(utf8(json([1, id, at, actor, actor_fingerprint, action, target, details,
                      before_fingerprint, after_fingerprint, outcome, prev_hash])))

where json is a JSON array with no whitespace (separators "," and ":"), non-ASCII
characters written as themselves, `1` the version of this encoding, `id` an integer and
every other field the text exactly as stored (`details` is the stored JSON text, not
re-encoded). A JSON array of strings is unambiguous: no field can bleed into the next.
Ids are given by the writer (the head's id + 1), so they run without gaps, and the id is
inside the hash: renumbering an event breaks it. `meta.audit_head` holds "<id> <hash>"
of the newest event, so that events cut off the end are noticed too.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

ENCODING_VERSION = 1
GENESIS = "0" * 64
# meta row: "<id> <hash>" of the newest event ("0 <GENESIS>" while the log is empty).
HEAD = "audit_head"

AUDIT_COLUMNS = (
    "id, at, actor, actor_fingerprint, action, target, details, before_fingerprint, "
    "after_fingerprint, outcome, prev_hash, hash"
)


class ChainedEvent(NamedTuple):
    """An audit row as stored, in AUDIT_COLUMNS order."""

    id: int
    at: str
    actor: str
    actor_fingerprint: str
    action: str
    target: str
    details: str
    before_fingerprint: str
    after_fingerprint: str
    outcome: str
    prev_hash: str
    hash: str


def event_hash(
    id: int,
    at: str,
    actor: str,
    actor_fingerprint: str,
    action: str,
    target: str,
    details: str,
    before_fingerprint: str,
    after_fingerprint: str,
    outcome: str,
    prev_hash: str,
) -> str:
    """The hash of one event (see the module docstring for the encoding)."""
    encoded = json.dumps(
        [
            ENCODING_VERSION,
            id,
            at,
            actor,
            actor_fingerprint,
            action,
            target,
            details,
            before_fingerprint,
            after_fingerprint,
            outcome,
            prev_hash,
        ],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def recomputed(event: ChainedEvent) -> str:
    """What `event.hash` should be, from its other fields."""
    return event_hash(*event[:-1])


def format_head(event_id: int, digest: str) -> str:
    return f"{event_id} {digest}"


def parse_head(value: str | None) -> tuple[int, str]:
    """(id, hash) of a meta.audit_head value; the empty log's for None."""
    if not value:
        return 0, GENESIS
    event_id, _, digest = value.partition(" ")
    return int(event_id), digest
