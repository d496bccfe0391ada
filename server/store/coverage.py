"""Aggregate reads of the live certificates (unrevoked, unexpired, not renewed to
another): what root coverage, a revocation plan and the renewal forecast count. Each is
one query over the certificates_live index, grouped by issuer, however many
certificates there are; only the few stragglers listed are read row by row."""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from keyplane.server.store.records import dt, opt_dt, ts

Connect = Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]

# Unrevoked and not renewed: the index's own condition, so that SQLite uses it.
_LIVE = "revoked_at IS NULL AND renewed_to IS NULL AND not_after > ?"
# Bound parameters per statement, well below SQLite's limit.
_CHUNK = 500


@dataclass(frozen=True)
class LiveCertificate:
    """A live certificate, as coverage lists a straggler."""

    serial: str
    subject: str
    role: str
    issuer_fingerprint: str
    issued_at: datetime.datetime
    not_after: datetime.datetime
    last_seen: datetime.datetime | None


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


class CoverageReads:
    """The reads of coverage and the forecast, over a Reads' connections."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    def live_by_issuer(self, role: str, now: datetime.datetime) -> dict[str, int]:
        """How many live certificates of `role` each issuer has."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT issuer_fingerprint, count(*) FROM certificates "  # noqa: S608
                f"WHERE role = ? AND {_LIVE} GROUP BY issuer_fingerprint",
                (role, ts(now)),
            ).fetchall()
        return {str(issuer): int(count) for issuer, count in rows}

    def oldest_live(
        self, role: str, issuers: Sequence[str], now: datetime.datetime, limit: int
    ) -> list[LiveCertificate]:
        """The live certificates of `role` that `issuers` issued, oldest first (in the
        order recorded, for the same time), with when their holders were last seen."""
        if not issuers or limit <= 0:
            return []
        with self._connect() as db:
            rows = db.execute(
                "SELECT c.serial, c.subject, c.role, c.issuer_fingerprint, c.issued_at, "  # noqa: S608
                "c.not_after, s.last_seen FROM certificates c "
                "LEFT JOIN certificate_sightings s ON s.serial = c.serial "
                f"WHERE c.role = ? AND c.issuer_fingerprint IN ({_marks(issuers)}) "
                "AND c.revoked_at IS NULL AND c.renewed_to IS NULL AND c.not_after > ? "
                "ORDER BY c.issued_at, c.rowid LIMIT ?",
                (role, *issuers, ts(now), limit),
            ).fetchall()
        return [
            LiveCertificate(str(s), str(subj), str(r), str(i), dt(at), dt(na), opt_dt(seen))
            for s, subj, r, i, at, na, seen in rows
        ]

    def live_expiry_minutes(self, role: str, now: datetime.datetime) -> list[tuple[str, int, int]]:
        """(issuer, minute of not_after since the epoch, how many) of the live
        certificates of `role`: what the renewal forecast spreads over its grid."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT issuer_fingerprint, "  # noqa: S608
                "CAST(strftime('%s', not_after) AS INTEGER) / 60 AS minute, count(*) "
                f"FROM certificates WHERE role = ? AND {_LIVE} GROUP BY 1, 2",
                (role, ts(now)),
            ).fetchall()
        return [(str(issuer), int(minute), int(count)) for issuer, minute, count in rows]

    def unrevoked_by_role(self, issuers: Sequence[str]) -> dict[str, int]:
        """How many unrevoked certificates (expired and renewed ones too) `issuers`
        issued, by role: what revoking them revokes."""
        if not issuers:
            return {}
        with self._connect() as db:
            rows = db.execute(
                "SELECT role, count(*) FROM certificates WHERE revoked_at IS NULL "  # noqa: S608
                f"AND issuer_fingerprint IN ({_marks(issuers)}) GROUP BY role ORDER BY role",
                tuple(issuers),
            ).fetchall()
        return {str(role): int(count) for role, count in rows}

    def unrevoked_of_roles(
        self, issuers: Sequence[str], roles: Iterable[str]
    ) -> list[tuple[str, str, str]]:
        """(serial, subject, role) of the unrevoked certificates of `roles` that
        `issuers` issued, oldest first."""
        wanted = list(roles)
        if not issuers or not wanted:
            return []
        with self._connect() as db:
            rows = db.execute(
                "SELECT serial, subject, role FROM certificates WHERE revoked_at IS NULL "  # noqa: S608
                f"AND issuer_fingerprint IN ({_marks(issuers)}) AND role IN ({_marks(wanted)}) "
                "ORDER BY issued_at, serial",
                (*issuers, *wanted),
            ).fetchall()
        return [(str(s), str(subject), str(role)) for s, subject, role in rows]

    def issuers_of(self, serials: Sequence[str]) -> dict[str, str]:
        """serial -> issuer fingerprint, for the recorded ones among `serials`."""
        found: dict[str, str] = {}
        with self._connect() as db:
            for chunk in _chunks(serials):
                rows = db.execute(
                    "SELECT serial, issuer_fingerprint FROM certificates "  # noqa: S608
                    f"WHERE serial IN ({_marks(chunk)})",
                    tuple(chunk),
                ).fetchall()
                found.update((str(s), str(i)) for s, i in rows)
        return found

    def last_seen(self, serials: Sequence[str]) -> dict[str, datetime.datetime]:
        """serial -> when its holder was last seen, for those ever seen."""
        found: dict[str, datetime.datetime] = {}
        with self._connect() as db:
            for chunk in _chunks(serials):
                rows = db.execute(
                    "SELECT serial, last_seen FROM certificate_sightings "  # noqa: S608
                    f"WHERE serial IN ({_marks(chunk)})",
                    tuple(chunk),
                ).fetchall()
                found.update((str(s), dt(at)) for s, at in rows)
        return found
