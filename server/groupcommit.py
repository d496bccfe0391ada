"""Group commit: one thread commits queued work in batches (many requests, one fsync),
for the server's state DB and the zone server's zone.db alike.

A caller's future may be cancelled at any moment (its client hung up, its deadline
passed): work whose future was cancelled before its batch began is dropped unrun, and
once a batch begins its futures can no longer be cancelled, so every piece of work is
either committed and answered or never written, whatever the caller did. Nothing a
caller does can stop the thread; if the thread stops anyway (a bug), every waiting and
later caller gets UNAVAILABLE at once and `on_death` is told, so that the process can
stop serving instead of hanging its writes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Generic, TypeVar

from keyplane.server.errors import Unavailable

log = logging.getLogger(__name__)

W = TypeVar("W")


@dataclass
class Job(Generic[W]):
    """One caller's work and the future that answers it."""

    work: W
    future: Future[object]


# What a batch commit returns per job, in order: (value, None) or (None, exception).
Outcome = tuple[object, BaseException | None]


class CommitterStopped(Unavailable):
    """The commit thread is not running; this process is about to restart."""

    reason = "WRITE_PATH_STOPPED"


def _resolve(future: Future[object], value: object, error: BaseException | None) -> None:
    """Answer a future that its batch set running; never raises."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:  # answered already (cannot happen once running); ignore
        pass


class GroupCommitter(Generic[W]):
    """A thread that hands queued jobs to `commit` in batches of up to `max_batch`.

    `commit(works)` runs the works of one batch in one transaction and returns an
    Outcome per work; if it raises, the whole batch failed and every job gets that error.
    """

    def __init__(
        self,
        name: str,
        commit: Callable[[Sequence[W]], Sequence[Outcome]],
        max_batch: int = 256,
        on_death: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self._commit = commit
        self._max_batch = max_batch
        self._on_death = on_death
        self._queue: queue.Queue[Job[W] | None] = queue.Queue()
        self._stopped = threading.Event()
        self.failure: BaseException | None = None
        # Testing only: raise in the thread after this many batches (a fault hook).
        self.die_after_batches: int | None = None
        self._batches = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the thread has stopped for any reason but `stop()`."""
        return self._thread.is_alive() or self._stopped.is_set()

    def submit(self, work: W) -> Future[object]:
        """Queue `work`; the future completes once its batch committed (or failed)."""
        future: Future[object] = Future()
        if self.failure is not None or self._stopped.is_set():
            future.set_exception(self._stopped_error())
            return future
        self._queue.put(Job(work, future))
        if not self._thread.is_alive():  # died between the check and the put
            self._fail_queued(self._stopped_error())
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then end the thread."""
        self._stopped.set()
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def _stopped_error(self) -> CommitterStopped:
        what = f" ({type(self.failure).__name__})" if self.failure is not None else ""
        return CommitterStopped(
            f"this server process cannot write right now: its {self.name} thread stopped"
            f"{what}; it restarts itself, try again in a moment"
        )

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._queue.put(None)  # seen again once this batch is done
                        break
                    batch.append(item)
                self._commit_batch(batch)
        except BaseException as exc:  # the thread must not vanish unnoticed
            self.failure = exc
            log.critical("the %s thread died: %s: %s", self.name, type(exc).__name__, exc)
            self._fail_queued(self._stopped_error())
            if self._on_death is not None:
                self._on_death(self.name, exc)

    def _commit_batch(self, batch: list[Job[W]]) -> None:
        # A job whose caller has gone before its batch begins is dropped unrun; from
        # here on no job of the batch can be cancelled, so each is answered.
        wanted = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not wanted:
            return
        self._batches += 1
        if self.die_after_batches is not None and self._batches > self.die_after_batches:
            for job in wanted:
                _resolve(job.future, None, self._stopped_error())
            raise SystemExit(f"fault hook: the {self.name} thread dies")
        try:
            outcomes = self._commit([job.work for job in wanted])
        except Exception as exc:  # the commit itself failed: nobody's work is stored
            for job in wanted:
                _resolve(job.future, None, exc)
            return
        except BaseException as exc:
            for job in wanted:
                _resolve(job.future, None, self._stopped_error())
            raise exc from None
        for job, (value, error) in zip(wanted, outcomes, strict=True):
            _resolve(job.future, value, error)

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                _resolve(job.future, None, error)
