"""Trust with peer servers in the state DB: the requests (one row each, whichever side
made it, with the peer's last accepted trust state once trusted), their history, and
the peer-issued certificates this server renewed (each renews once here).

Reads and writes hang off Reads (`reads.peers`) and Transaction (`tx.peers`), so a
change and the trust-state version that publishes it commit together."""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from keyplane.server.store.records import dt, opt_dt, ts

# Requests under way, and trust: at most one of them per peer fqdn.
LIVE_PEER_STATES = ("awaiting-nonce", "pending", "trusted")
PEER_COLUMNS = (
    "id, direction, state, fqdn, listen, bootstrap_listen, peer_roots_pem, own_fingerprints, "
    "commitment, own_nonce, peer_nonce, offer, comparison_code, peer_state, peer_version, "
    "peer_updated_at, created_at, updated_at, trusted_at, end_unsent, end_reason"
)
# What update_peer may change (the rest is fixed when the request is recorded).
_UPDATABLE = frozenset(
    {
        "state",
        "listen",
        "bootstrap_listen",
        "peer_roots_pem",
        "peer_nonce",
        "comparison_code",
        "peer_state",
        "peer_version",
        "peer_updated_at",
        "trusted_at",
        "end_unsent",
        "end_reason",
    }
)


@dataclass(frozen=True)
class PeerRecord:
    """A request for trust between this server and a peer, and the trust it set up."""

    id: str
    direction: str
    state: str
    fqdn: str
    listen: str
    bootstrap_listen: str
    peer_roots_pem: str
    own_fingerprints: tuple[str, ...]
    commitment: bytes | None
    own_nonce: bytes | None
    peer_nonce: bytes | None
    offer: bytes | None
    comparison_code: str | None
    peer_state: bytes | None
    peer_version: int
    peer_updated_at: datetime.datetime | None
    created_at: datetime.datetime
    updated_at: datetime.datetime
    trusted_at: datetime.datetime | None
    end_unsent: bool = False
    end_reason: str | None = None


@dataclass(frozen=True)
class TrustEventRecord:
    """One step of the trust history."""

    id: int
    at: datetime.datetime
    request_id: str
    fqdn: str
    event: str
    actor: str
    fingerprints: tuple[str, ...]
    detail: str


def _blob(value: object) -> bytes | None:
    return bytes(value) if value is not None else None  # type: ignore[call-overload]


def peer_record(row: tuple[object, ...]) -> PeerRecord:
    return PeerRecord(
        id=str(row[0]),
        direction=str(row[1]),
        state=str(row[2]),
        fqdn=str(row[3]),
        listen=str(row[4]),
        bootstrap_listen=str(row[5]),
        peer_roots_pem=str(row[6]),
        own_fingerprints=tuple(f for f in str(row[7]).split(",") if f),
        commitment=_blob(row[8]),
        own_nonce=_blob(row[9]),
        peer_nonce=_blob(row[10]),
        offer=_blob(row[11]),
        comparison_code=str(row[12]) if row[12] is not None else None,
        peer_state=_blob(row[13]),
        peer_version=int(str(row[14])),
        peer_updated_at=opt_dt(row[15]),
        created_at=dt(row[16]),
        updated_at=dt(row[17]),
        trusted_at=opt_dt(row[18]),
        end_unsent=bool(row[19]),
        end_reason=str(row[20]) if row[20] is not None else None,
    )


class PeerReads:
    """The reads of trust with peers, over a Reads' connections."""

    def __init__(
        self, connect: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]
    ) -> None:
        self._connect = connect

    def _rows(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._connect() as db:
            return list(db.execute(sql, args).fetchall())

    def trust_peers(self, states: tuple[str, ...] | None = None) -> list[PeerRecord]:
        """Rows in `states` (every row if None), oldest first."""
        args: tuple[str, ...] = ()
        if states is None:
            where = ""
        else:
            where, args = f"WHERE state IN ({', '.join('?' * len(states))})", states
        rows = self._rows(
            f"SELECT {PEER_COLUMNS} FROM trust_peers {where} ORDER BY created_at, id",  # noqa: S608
            args,
        )
        return [peer_record(r) for r in rows]

    def trust_peer(self, request_id: str) -> PeerRecord | None:
        rows = self._rows(
            f"SELECT {PEER_COLUMNS} FROM trust_peers WHERE id = ?",  # noqa: S608
            (request_id,),
        )
        return peer_record(rows[0]) if rows else None

    def trust_history(self, limit: int = 100) -> list[TrustEventRecord]:
        """The newest `limit` steps, oldest first."""
        rows = self._rows(
            "SELECT id, at, request_id, fqdn, event, actor, fingerprints, detail "
            "FROM trust_history ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            TrustEventRecord(
                int(str(i)),
                dt(at),
                str(r),
                str(f),
                str(e),
                str(a),
                tuple(x for x in str(fps).split(",") if x),
                str(d),
            )
            for i, at, r, f, e, a, fps, d in reversed(rows)
        ]

    def peer_renewal(self, serial: str) -> tuple[str, str] | None:
        """(successor serial, peer fqdn) if this server renewed the peer certificate `serial`."""
        rows = self._rows("SELECT successor, fqdn FROM peer_renewals WHERE serial = ?", (serial,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None


class _Transaction(Protocol):
    now: datetime.datetime
    changes_hierarchy: bool


class PeerWrites:
    """The writes of trust with peers, inside a transaction."""

    def __init__(self, db: sqlite3.Connection, tx: _Transaction) -> None:
        self._db = db
        self._tx = tx

    def insert_peer(self, record: PeerRecord) -> None:
        self._tx.changes_hierarchy = True
        self._db.execute(
            f"INSERT INTO trust_peers ({PEER_COLUMNS}) VALUES ({', '.join('?' * 21)})",  # noqa: S608
            (
                record.id,
                record.direction,
                record.state,
                record.fqdn,
                record.listen,
                record.bootstrap_listen,
                record.peer_roots_pem,
                ",".join(record.own_fingerprints),
                record.commitment,
                record.own_nonce,
                record.peer_nonce,
                record.offer,
                record.comparison_code,
                record.peer_state,
                record.peer_version,
                ts(record.peer_updated_at),
                ts(record.created_at),
                ts(record.updated_at),
                ts(record.trusted_at),
                int(record.end_unsent),
                record.end_reason,
            ),
        )

    def update_peer(self, request_id: str, **fields: object) -> None:
        """Change the named columns of one request (and its updated_at)."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"trust_peers has no updatable column {sorted(unknown)}")
        self._tx.changes_hierarchy = True
        values = [
            ts(v) if isinstance(v, datetime.datetime) else (int(v) if isinstance(v, bool) else v)
            for v in fields.values()
        ]
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(
            f"UPDATE trust_peers SET {assignments}, updated_at = ? WHERE id = ?",  # noqa: S608
            (*values, ts(self._tx.now), request_id),
        )

    def delete_peer(self, request_id: str) -> None:
        """Remove one request (an incoming one its sender replaced before any decision)."""
        self._tx.changes_hierarchy = True
        self._db.execute("DELETE FROM trust_peers WHERE id = ?", (request_id,))

    def add_history(
        self,
        request_id: str,
        fqdn: str,
        event: str,
        actor: str,
        fingerprints: tuple[str, ...] | list[str],
        detail: str = "",
    ) -> None:
        self._db.execute(
            "INSERT INTO trust_history (at, request_id, fqdn, event, actor, fingerprints, "
            "detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ts(self._tx.now), request_id, fqdn, event, actor, ",".join(fingerprints), detail),
        )

    def recent_details(self, request_id: str, event: str, since: datetime.datetime) -> list[str]:
        """The details of a request's `event` steps since `since`."""
        rows = self._db.execute(
            "SELECT detail FROM trust_history WHERE request_id = ? AND event = ? AND at >= ?",
            (request_id, event, ts(since)),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def mark_peer_renewed(self, serial: str, successor: str, fqdn: str) -> bool:
        """Record that the peer certificate `serial` was renewed here to `successor`;
        False if it had been already (a certificate renews once per server)."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO peer_renewals (serial, successor, fqdn, renewed_at) "
            "VALUES (?, ?, ?, ?)",
            (serial, successor, fqdn, ts(self._tx.now)),
        )
        return cursor.rowcount == 1
