"""The group commit over a real keyplane.db: work whose caller hung up before its batch
began is never run; work whose batch began is answered and stored, whatever the caller
does; a storm of cancellations leaves the thread running; a dead thread answers every
caller at once instead of leaving them waiting."""

from __future__ import annotations

import datetime
import random
import threading
from concurrent.futures import CancelledError, Future
from pathlib import Path

import pytest

from keyplane.server.groupcommit import CommitterStopped
from keyplane.server.store import StateStore, Transaction

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def _token_writer(name: str) -> object:
    def write(tx: Transaction) -> str:
        tx.insert_token(name, "agent", 1, NOW + datetime.timedelta(days=1), "test")
        return name

    return write


def _stored(store: StateStore, name: str) -> bool:
    return store.token_uses_left(name) is not None


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    opened = StateStore(tmp_path / "keyplane.db")
    yield opened  # type: ignore[misc]
    opened.close()


def test_work_cancelled_before_its_batch_never_runs(store: StateStore) -> None:
    release = threading.Event()
    entered = threading.Event()
    ran: list[str] = []

    def blocking(tx: Transaction) -> None:
        entered.set()
        release.wait(10)

    first = store.group_commit_pending(NOW, blocking)
    assert entered.wait(10)

    def second_work(tx: Transaction) -> None:
        ran.append("second")
        tx.insert_token("second", "agent", 1, NOW + datetime.timedelta(days=1), "test")

    second = store.group_commit_pending(NOW, second_work)
    assert second.cancel()  # its caller hung up while it waited for the commit
    # The first one's batch has begun: it can no longer be cancelled.
    assert not first.cancel()
    release.set()
    assert first.result(10) is None
    with pytest.raises(CancelledError):
        second.result(10)
    # The thread goes on: later work is committed.
    assert store.group_commit(NOW, _token_writer("third")) == "third"  # type: ignore[arg-type]
    assert ran == [] and not _stored(store, "second") and _stored(store, "third")
    assert store.committer.alive


def test_a_storm_of_cancellations_leaves_every_answer_true(store: StateStore) -> None:
    futures: list[tuple[str, Future[object]]] = []
    lock = threading.Lock()
    rng = random.Random(9)

    def client(index: int) -> None:
        for i in range(250):
            name = f"t-{index}-{i}"
            future = store.group_commit_pending(NOW, _token_writer(name))  # type: ignore[arg-type]
            if rng.random() < 0.5:
                future.cancel()
            with lock:
                futures.append((name, future))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    cancelled = committed = 0
    for name, future in futures:
        if future.cancelled():
            cancelled += 1
            assert not _stored(store, name), f"{name} was cancelled but stored"
        else:
            assert future.result(30) == name
            assert _stored(store, name), f"{name} was answered but not stored"
            committed += 1
    assert cancelled > 100 and committed > 100
    assert store.committer.alive


def test_a_dead_commit_thread_answers_every_caller_at_once(store: StateStore) -> None:
    store.committer.die_after_batches = 0
    first = store.group_commit_pending(NOW, _token_writer("never"))  # type: ignore[arg-type]
    with pytest.raises(CommitterStopped):
        first.result(10)
    store.committer._thread.join(10)
    assert not store.committer.alive
    # Later callers are told at once, not left waiting for a thread that is gone.
    with pytest.raises(CommitterStopped) as caught:
        store.group_commit(NOW, _token_writer("later"))  # type: ignore[arg-type]
    assert caught.value.code.name == "UNAVAILABLE"
    assert "restarts itself" in str(caught.value)
    assert not _stored(store, "never") and not _stored(store, "later")
