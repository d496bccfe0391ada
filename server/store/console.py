"""The admin console's sign-in links and sessions, as the state DB keeps them: each
secret only as its SHA-256, beside a public id it is looked up by. Not the audit log:
rows are ended in place and pruned once long expired."""

from __future__ import annotations

import datetime
import sqlite3
from dataclasses import dataclass

from keyplane.server.store.records import dt, opt_dt, opt_str, ts

LINK_COLUMNS = "id, secret_hash, serial, created_at, expires_at, used_at"
SESSION_COLUMNS = "id, secret_hash, serial, created_at, expires_at, seen_at, ended_at, end_reason"


@dataclass(frozen=True)
class ConsoleLinkRecord:
    """A one-time sign-in link, made for one identity's certificate."""

    id: str
    secret_hash: str
    serial: str
    created_at: datetime.datetime
    expires_at: datetime.datetime
    used_at: datetime.datetime | None


@dataclass(frozen=True)
class ConsoleSessionRecord:
    """A signed-in browser, bound to the identity's certificate."""

    id: str
    secret_hash: str
    serial: str
    created_at: datetime.datetime
    expires_at: datetime.datetime
    seen_at: datetime.datetime
    ended_at: datetime.datetime | None
    end_reason: str | None


def read_link(db: sqlite3.Connection, link_id: str) -> ConsoleLinkRecord | None:
    row = db.execute(
        f"SELECT {LINK_COLUMNS} FROM console_links WHERE id = ?",  # noqa: S608
        (link_id,),
    ).fetchone()
    if row is None:
        return None
    return ConsoleLinkRecord(
        str(row[0]), str(row[1]), str(row[2]), dt(row[3]), dt(row[4]), opt_dt(row[5])
    )


def read_session(db: sqlite3.Connection, session_id: str) -> ConsoleSessionRecord | None:
    row = db.execute(
        f"SELECT {SESSION_COLUMNS} FROM console_sessions WHERE id = ?",  # noqa: S608
        (session_id,),
    ).fetchone()
    if row is None:
        return None
    return ConsoleSessionRecord(
        str(row[0]),
        str(row[1]),
        str(row[2]),
        dt(row[3]),
        dt(row[4]),
        dt(row[5]),
        opt_dt(row[6]),
        opt_str(row[7]),
    )


def insert_link(db: sqlite3.Connection, record: ConsoleLinkRecord) -> None:
    db.execute(
        f"INSERT INTO console_links ({LINK_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL)",  # noqa: S608
        (
            record.id,
            record.secret_hash,
            record.serial,
            ts(record.created_at),
            ts(record.expires_at),
        ),
    )


def use_link(db: sqlite3.Connection, link_id: str, now: datetime.datetime) -> bool:
    """Spend the link if it is unused and unexpired; False (and nothing changed) if not,
    so that of two workers redeeming it at once only one gets a session."""
    return (
        db.execute(
            "UPDATE console_links SET used_at = ? "
            "WHERE id = ? AND used_at IS NULL AND expires_at > ?",
            (ts(now), link_id, ts(now)),
        ).rowcount
        == 1
    )


def insert_session(db: sqlite3.Connection, record: ConsoleSessionRecord) -> None:
    db.execute(
        f"INSERT INTO console_sessions ({SESSION_COLUMNS}) "  # noqa: S608
        "VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
        (
            record.id,
            record.secret_hash,
            record.serial,
            ts(record.created_at),
            ts(record.expires_at),
            ts(record.seen_at),
        ),
    )


def touch_session(db: sqlite3.Connection, session_id: str, now: datetime.datetime) -> None:
    db.execute(
        "UPDATE console_sessions SET seen_at = ? WHERE id = ? AND ended_at IS NULL",
        (ts(now), session_id),
    )


def end_session(
    db: sqlite3.Connection, session_id: str, now: datetime.datetime, reason: str
) -> bool:
    """End a live session for good; False if it had ended already."""
    return (
        db.execute(
            "UPDATE console_sessions SET ended_at = ?, end_reason = ? "
            "WHERE id = ? AND ended_at IS NULL",
            (ts(now), reason, session_id),
        ).rowcount
        == 1
    )


def prune(db: sqlite3.Connection, before: datetime.datetime) -> None:
    """Forget links and sessions that expired before `before`: they can never be used."""
    db.execute("DELETE FROM console_links WHERE expires_at < ?", (ts(before),))
    db.execute("DELETE FROM console_sessions WHERE expires_at < ?", (ts(before),))
