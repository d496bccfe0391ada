"""The audit log as admins and auditors see it: pages of events, newest first, and a
walk of the whole hash chain that names the first event edited, inserted or missing.
Also the recorder of refused calls, which the access check reports to without waiting.

The events are written by the changes themselves, in their own transactions
(store/transaction.py); the chain's encoding is in store/audit_chain.py.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from cryptography import x509

from keyplane.server.domain import certs
from keyplane.server.domain.clock import Clock
from keyplane.server.domain.roots import SERVER_ACTOR
from keyplane.server.errors import InvalidArgument
from keyplane.server.store import (
    Actor,
    AuditEntry,
    AuditOutcome,
    AuditRecord,
    ChainedEvent,
    StateStore,
    Transaction,
)
from keyplane.server.store.audit_chain import GENESIS, recomputed

log = logging.getLogger(__name__)

DEFAULT_PAGE = 100
MAX_PAGE = 1000
# Events read at a time while the chain is walked: memory stays flat however long it is.
CHAIN_CHUNK = 2000
# Refused calls held for the next group commit at most; beyond them only their number is
# kept, and recorded in one event, so a flood of refusals cannot grow memory.
MAX_PENDING_REFUSALS = 1000

REFUSED = "access.refused"
REFUSALS_UNRECORDED = "access.refused.unrecorded"


def actor_of(cert: x509.Certificate) -> Actor:
    """The audit name of a certificate's holder (as Identity.actor names an admitted
    one), with the fingerprint of its key: for callers refused before admission."""
    return Actor(
        f"{certs.common_name_of(cert)} (serial {certs.serial_hex(cert)})",
        certs.key_fingerprint(cert),
    )


@dataclass(frozen=True)
class AuditQuery:
    """What ListAuditEvents asks for: all filters are optional."""

    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    actor: str = ""
    action: str = ""

    def digest(self) -> str:
        """Binds a page token to the filters it was made for."""
        text = json.dumps(
            [
                self.since.isoformat() if self.since else "",
                self.until.isoformat() if self.until else "",
                self.actor,
                self.action,
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ChainProblem:
    """The first place the chain is broken. `kind` is "edited" (the event's fields are
    not the ones its hash was made over, or it was rewritten with a new hash), "inserted"
    (it was not written by keyplane where it stands) or "missing" (an event keyplane
    wrote is gone; `event_id` is the id it had)."""

    kind: str
    event_id: int
    detail: str


@dataclass(frozen=True)
class ChainReport:
    """What VerifyAuditLog found: how many events it checked, the head it found, and the
    first problem if there is one."""

    checked: int
    head_id: int
    head_hash: str
    problem: ChainProblem | None


def _page_token(before_id: int, query: AuditQuery) -> str:
    raw = f"{before_id}.{query.digest()}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _before_id(token: str, query: AuditQuery) -> int | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        before, _, digest = raw.partition(".")
        before_id = int(before)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument(
            "page_token is not one this server gave; pass the next_page_token of the "
            "previous page unchanged, or none for the first page"
        ) from None
    if digest != query.digest():
        raise InvalidArgument(
            "page_token belongs to a listing with other filters; keep the filters while "
            "paging, or start again without a page token"
        )
    return before_id


# No actor or action is longer: a longer filter matches nothing, at the cost of a scan.
MAX_FILTER_LENGTH = 1024


def _clean_actor(actor: str) -> str:
    actor = actor.strip()
    return actor.removeprefix("sha256:") if actor.lower().startswith("sha256:") else actor


class AuditLog:
    """Reads and verifies the audit log (admin and auditor)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def list(
        self, query: AuditQuery, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AuditRecord], str]:
        """One page of matching events, newest first, and the token of the next page
        ("" when this is the last). Paging is by event id, so events written while a
        client pages (newer, higher ids) never shift the pages it has not read yet."""
        size = page_size or DEFAULT_PAGE
        if not 1 <= size <= MAX_PAGE:
            raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE}")
        if query.since and query.until and query.until <= query.since:
            raise InvalidArgument("until must be later than since")
        for what, value in (("actor", query.actor), ("action", query.action)):
            if len(value) > MAX_FILTER_LENGTH:
                raise InvalidArgument(
                    f"the {what} filter is longer than {MAX_FILTER_LENGTH} characters"
                )
        query = AuditQuery(query.since, query.until, _clean_actor(query.actor), query.action)
        before_id = _before_id(page_token, query)
        found = self.store.reads.audit_events(
            size + 1, before_id, query.since, query.until, query.actor, query.action
        )
        page = found[:size]
        more = len(found) > size
        return page, _page_token(page[-1].id, query) if more else ""

    def verify(self) -> ChainReport:
        """Walk the whole chain, oldest first, in one consistent read."""
        with self.store.reads.snapshot() as reads:
            head_id, head_hash = reads.audit_head()

            def events() -> Iterator[ChainedEvent]:
                after = 0
                while chunk := reads.audit_chain(after, CHAIN_CHUNK):
                    yield from chunk
                    after = chunk[-1].id

            return walk(events(), head_id, head_hash)


def walk(events: Iterator[ChainedEvent], head_id: int, head_hash: str) -> ChainReport:
    """Check each event against its own hash and its predecessor's, and the last one
    against the head recorded in meta; name the first problem."""
    before: tuple[int, str] | None = None  # (id, hash) of the event before `prev`
    prev = (0, GENESIS)
    checked = 0
    current = next(events, None)
    while current is not None:
        following = next(events, None)
        checked += 1
        problem = _problem(current, prev, before, following, head_id)
        if problem is not None:
            return ChainReport(checked, head_id, head_hash, problem)
        before, prev = prev, (current.id, current.hash)
        current = following
    last_id, last_hash = prev
    problem = None
    if head_id > last_id:
        problem = ChainProblem(
            "missing",
            last_id + 1,
            f"the log ends at event {last_id}, but keyplane wrote up to event {head_id}",
        )
    elif head_id < last_id:
        problem = ChainProblem(
            "inserted",
            head_id + 1,
            f"keyplane wrote up to event {head_id}; the events after it were added since",
        )
    elif head_hash != last_hash:
        problem = ChainProblem(
            "edited", last_id, f"event {last_id} is not the one keyplane wrote last"
        )
    return ChainReport(checked, head_id, head_hash, problem)


def _problem(
    event: ChainedEvent,
    prev: tuple[int, str],
    before: tuple[int, str] | None,
    following: ChainedEvent | None,
    head_id: int,
) -> ChainProblem | None:
    """What is wrong at `event`, given the (id, hash) of the accepted event before it
    (and of the one before that), the event after it, and the newest id keyplane wrote."""
    intact = recomputed(event) == event.hash
    linked = event.prev_hash == prev[1]
    if intact and linked and event.id == prev[0] + 1:
        return None
    if event.id > head_id:
        return ChainProblem(
            "inserted",
            event.id,
            f"event {event.id} comes after the newest event keyplane wrote ({head_id})",
        )
    if event.id > prev[0] + 1:
        return ChainProblem(
            "missing",
            prev[0] + 1,
            f"event {prev[0] + 1} is gone: event {event.id} follows event {prev[0]}",
        )
    if before is not None and event.prev_hash == before[1]:
        return ChainProblem(
            "inserted",
            prev[0],
            f"event {event.id} chains to event {before[0]}: event {prev[0]} between "
            "them was not written by keyplane",
        )
    if following is not None and following.prev_hash == prev[1]:
        return ChainProblem(
            "inserted",
            event.id,
            f"event {following.id} chains to event {prev[0]}: event {event.id} between "
            "them was not written by keyplane",
        )
    if linked:
        return ChainProblem(
            "edited", event.id, f"event {event.id} does not match the hash it was written with"
        )
    if intact and prev[0] > 0:
        return ChainProblem(
            "edited",
            prev[0],
            f"event {event.id} chains to another version of event {prev[0]}: it was rewritten",
        )
    if following is None:
        return ChainProblem(
            "inserted",
            event.id,
            f"event {event.id} neither matches its hash nor chains to event {prev[0]}",
        )
    return ChainProblem(
        "edited", event.id, f"event {event.id} neither matches its hash nor its predecessor"
    )


class RefusalRecorder:
    """Records refused calls (PERMISSION_DENIED) as "access.refused" events, without
    making the refused call wait: they are handed to the group commit, at most one
    batch in flight, at most MAX_PENDING_REFUSALS held; past that, only a count is kept
    and recorded as one "access.refused.unrecorded" event."""

    def __init__(self, store: StateStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: list[tuple[datetime.datetime, AuditEntry]] = []
        self._unrecorded = 0
        self._scheduled = False

    def refused(self, method: str, peer: x509.Certificate, why: str) -> None:
        """Note one refused call; returns at once (called on the event loop)."""
        actor = actor_of(peer)
        entry = AuditEntry(
            actor,
            REFUSED,
            method,
            json.dumps({"why": why}),
            actor.fingerprint,
            outcome=AuditOutcome.REFUSED,
        )
        now = self.clock.now()
        with self._lock:
            if len(self._pending) < MAX_PENDING_REFUSALS:
                self._pending.append((now, entry))
            else:
                self._unrecorded += 1
            if self._scheduled:
                return
            self._scheduled = True
        future = self.store.group_commit_pending(now, self._write)
        future.add_done_callback(self._written)

    def _write(self, tx: Transaction) -> int:
        """Runs in the group commit: everything held so far, each at its own time."""
        with self._lock:
            entries, self._pending = self._pending, []
            unrecorded, self._unrecorded = self._unrecorded, 0
            self._scheduled = False
        if unrecorded:
            summary = AuditEntry(
                SERVER_ACTOR,
                REFUSALS_UNRECORDED,
                "*",
                json.dumps({"count": unrecorded}),
                outcome=AuditOutcome.REFUSED,
            )
            entries.append((entries[-1][0], summary))
        batch_time = tx.now
        for at, entry in entries:  # the chain's head is held by tx: no query per event
            tx.now = at
            tx.audit_many([entry])
        tx.now = batch_time
        return len(entries)

    def _written(self, future: Future[object]) -> None:
        error = future.exception() if not future.cancelled() else None
        if error is not None:
            with self._lock:  # it may never have run (the committer stopped)
                self._scheduled = False
            log.warning("could not record refused calls in the audit log: %s", error)
