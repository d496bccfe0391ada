"""The audit log in the state DB, on real SQLite: every event chained to the one before,
no UPDATE or DELETE accepted, a group commit that chains without a query per event, and
VerifyAuditLog's walk naming the first event an attacker with the file edited, inserted
or removed (after dropping the triggers, as they would)."""

from __future__ import annotations

import datetime
import itertools
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyplane.server.domain.audit import AuditLog
from keyplane.server.store import Actor, AuditEntry, StateStore, Transaction
from keyplane.server.store.audit_chain import AUDIT_COLUMNS, GENESIS, event_hash, recomputed

T0 = datetime.datetime(2026, 12, 1, 8, 0, tzinfo=datetime.UTC)
EVENTS = 12


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    opened = StateStore(tmp_path / "keyplane.db")
    yield opened
    opened.close()


def write_events(store: StateStore, count: int = EVENTS) -> None:
    """`count` events over several transactions, some of them many to one."""
    for n in range(count):
        with store.transaction(T0 + datetime.timedelta(seconds=n)) as tx:
            tx.audit(Actor(f"admin-{n % 3} (serial 0{n})", f"{n % 3:064x}"), "x.do", f"t{n}", n=n)


def attacker(store: StateStore, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Edit keyplane.db as someone with the file: drop the triggers, then write."""
    with sqlite3.connect(store.path, isolation_level=None) as db:
        db.execute("DROP TRIGGER IF EXISTS audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for sql, args in statements:
            db.execute(sql, args)


def row(store: StateStore, event_id: int) -> tuple[object, ...]:
    with sqlite3.connect(store.path) as db:
        found = db.execute(
            f"SELECT {AUDIT_COLUMNS} FROM audit WHERE id = ?",  # noqa: S608
            (event_id,),
        ).fetchone()
    assert found is not None
    return tuple(found)


def forged(event_id: int, prev_hash: str, target: str = "nothing to see") -> tuple[object, ...]:
    """An event made by someone who knows the encoding, chained to `prev_hash`."""
    fields = (event_id, T0.isoformat(), "admin-0 (serial 00)", "", "x.do", target, "{}", "", "")
    digest = event_hash(*fields, "ok", prev_hash)
    return (*fields, "ok", prev_hash, digest)


INSERT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({', '.join('?' * 12)})"  # noqa: S608


def test_every_event_is_chained_to_the_one_before(store: StateStore) -> None:
    write_events(store)
    with store.transaction(T0) as tx:
        tx.audit_many([("server", "y.do", "a", "{}"), AuditEntry("server", "y.do", "b", "{}")])
    chain = store.reads.audit_chain(0, 100)
    assert [e.id for e in chain] == list(range(1, EVENTS + 3))
    assert chain[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(chain))
    assert all(recomputed(e) == e.hash for e in chain)
    assert chain[1].actor_fingerprint == f"{1:064x}"  # the Actor's fingerprint, recorded
    assert store.reads.audit_head() == (chain[-1].id, chain[-1].hash)
    report = AuditLog(store).verify()
    assert report.problem is None and report.checked == EVENTS + 2


def test_sql_cannot_change_or_delete_an_event(store: StateStore) -> None:
    write_events(store, 3)
    before = store.reads.audit_chain(0, 100)
    with sqlite3.connect(store.path) as db:
        with pytest.raises(sqlite3.IntegrityError, match="append-only: an event cannot be changed"):
            db.execute("UPDATE audit SET target = 'nothing' WHERE id = 2")
        with pytest.raises(sqlite3.IntegrityError, match="append-only: an event cannot be deleted"):
            db.execute("DELETE FROM audit")
    assert store.reads.audit_chain(0, 100) == before


def test_a_group_commit_reads_the_chain_head_once_however_many_events(
    store: StateStore,
) -> None:
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    with store.transaction(T0) as tx:
        for n in range(200):
            tx.audit("server", "x.do", f"t{n}")
        tx.audit_many([("server", "x.many", f"m{n}", "{}") for n in range(300)])
    store._db.set_trace_callback(None)
    head_reads = [s for s in statements if "FROM meta" in s and "audit_head" in s]
    head_writes = [s for s in statements if "INTO meta" in s and "audit_head" in s]
    assert len(head_reads) == 1 and len(head_writes) == 1
    # (The trace shows an executemany as one statement per row.)
    assert len([s for s in statements if s.startswith("INSERT INTO audit")]) == 500
    assert AuditLog(store).verify().problem is None


def test_work_rolled_back_in_a_group_commit_leaves_no_hole_in_the_chain(
    store: StateStore,
) -> None:
    """Each caller's work runs in a savepoint: a failed one's events go, and the next
    caller's events chain on from the last that stays."""
    write_events(store, 2)

    def good(tag: str) -> object:
        def work(tx: Transaction) -> None:
            tx.audit("server", "x.good", tag)

        return work

    def bad(tx: Transaction) -> None:
        tx.audit("server", "x.bad", "gone")
        raise RuntimeError("this caller's change fails")

    pending = [
        store.group_commit_pending(T0, w)  # type: ignore[arg-type]
        for w in (good("a"), bad, good("b"), bad, good("c"))
    ]
    for future in pending:
        future.exception(timeout=30)
    events = store.audit_log()
    assert [e.target for e in events] == ["t0", "t1", "a", "b", "c"]
    assert [e.id for e in events] == [1, 2, 3, 4, 5]
    assert AuditLog(store).verify().problem is None


def test_an_edited_event_is_named(store: StateStore) -> None:
    write_events(store)
    attacker(store, ("UPDATE audit SET actor = 'someone else' WHERE id = 5", ()))
    problem = AuditLog(store).verify().problem
    assert problem is not None and (problem.kind, problem.event_id) == ("edited", 5)


def test_an_event_edited_and_hashed_again_is_named(store: StateStore) -> None:
    """The attacker recomputes the edited event's hash: its successor still chains to
    the hash it had."""
    write_events(store)
    fields = list(row(store, 5))
    fields[5] = "a different target"
    digest = event_hash(*fields[:11])  # type: ignore[arg-type]
    attacker(store, ("UPDATE audit SET target = ?, hash = ? WHERE id = 5", (fields[5], digest)))
    problem = AuditLog(store).verify().problem
    assert problem is not None and (problem.kind, problem.event_id) == ("edited", 5)


def test_a_deleted_event_is_named(store: StateStore) -> None:
    write_events(store)
    attacker(store, ("DELETE FROM audit WHERE id = 7", ()))
    problem = AuditLog(store).verify().problem
    assert problem is not None and (problem.kind, problem.event_id) == ("missing", 7)


def test_the_newest_event_deleted_is_named(store: StateStore) -> None:
    write_events(store)
    attacker(store, ("DELETE FROM audit WHERE id = ?", (EVENTS,)))
    report = AuditLog(store).verify()
    assert report.problem is not None
    assert (report.problem.kind, report.problem.event_id) == ("missing", EVENTS)
    assert report.checked == EVENTS - 1


def test_an_event_inserted_in_the_middle_is_named(store: StateStore) -> None:
    """The attacker makes room (moves the later events up by one) and inserts an event
    properly chained to the one before it."""
    write_events(store)
    prev_hash = str(row(store, 4)[-1])
    attacker(
        store,
        ("UPDATE audit SET id = id + 1000000 WHERE id >= 5", ()),
        ("UPDATE audit SET id = id - 999999 WHERE id >= 1000000", ()),
        (INSERT, forged(5, prev_hash)),
    )
    problem = AuditLog(store).verify().problem
    assert problem is not None and (problem.kind, problem.event_id) == ("inserted", 5)


@pytest.mark.parametrize("chained", [True, False], ids=["chained", "careless"])
def test_an_event_appended_behind_keyplanes_back_is_named(store: StateStore, chained: bool) -> None:
    write_events(store)
    last_hash = str(row(store, EVENTS)[-1])
    event = forged(EVENTS + 1, last_hash if chained else "f" * 64)
    attacker(store, (INSERT, event))
    problem = AuditLog(store).verify().problem
    assert problem is not None and (problem.kind, problem.event_id) == ("inserted", EVENTS + 1)


def test_verify_reads_the_chain_in_chunks(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keyplane.server.domain import audit

    monkeypatch.setattr(audit, "CHAIN_CHUNK", 5)
    write_events(store, 23)
    assert AuditLog(store).verify().checked == 23
    attacker(store, ("UPDATE audit SET details = ? WHERE id = 16", (json.dumps({"n": 99}),)))
    problem = AuditLog(store).verify().problem
    assert problem is not None and (problem.kind, problem.event_id) == ("edited", 16)
