"""TrustStateService: the signed trust state, once or as a stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from keyplane.server.metrics import Metrics
from keyplane.server.services.context import Context
from keyplane.v1 import trust_state_pb2, trust_state_service_pb2_grpc
from keyplane.v1 import trust_state_service_pb2 as pb

# Watchers also look at the DB this often, in case another worker published.
POLL_SECONDS = 2.0
ANSWER_CACHE_SIZE = 1000


class VersionNotifier:
    """Wakes watchers when a new trust-state version commits in this process."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def published(self, version: int) -> None:
        """Call on the event loop (use loop.call_soon_threadsafe from other threads)."""
        if version > self.version:
            self.version = version
            event, self._event = self._event, asyncio.Event()
            event.set()

    async def wait_newer(self, than: int, timeout: float) -> None:
        if self.version > than:
            return
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass


def _version_of(signed: bytes) -> int:
    body = trust_state_pb2.SignedTrustState.FromString(signed).body
    return trust_state_pb2.TrustStateBody.FromString(body).version


def _retrieve(task: asyncio.Task[_Answer]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class _Answer:
    """What a holder of one version is sent: the versions, the message, the newest number."""

    versions: list[trust_state_pb2.SignedTrustState]
    response: pb.WatchTrustStateResponse
    latest: int


class TrustStateSource(Protocol):
    """Where versions come from: the server's publisher, or a zone server's relay."""

    def versions_since(self, since: int) -> list[bytes]: ...


class TrustStateServicer(trust_state_service_pb2_grpc.TrustStateServiceServicer):
    """Serves versions from the publisher; watchers are woken by the notifier."""

    def __init__(
        self, publisher: TrustStateSource, notifier: VersionNotifier, metrics: Metrics | None = None
    ) -> None:
        self._publisher = publisher
        self._notifier = notifier
        self._watchers = metrics.watchers if metrics is not None else None
        # When a version commits, every watcher asks for the same answer at once: compute
        # it once per (held version, latest known version) and share it, message and all.
        self._answers: dict[tuple[int, int], asyncio.Task[_Answer]] = {}

    async def _answer(self, since: int) -> _Answer:
        key = (since, self._notifier.version)
        task = self._answers.get(key)
        if task is None:
            # Only answers up to the newest version are asked for again: older ones go
            # (each holds whole trust states, which grow with every revocation).
            for stale in [k for k in self._answers if k[1] < key[1]]:
                del self._answers[stale]
            if len(self._answers) > ANSWER_CACHE_SIZE:
                self._answers.clear()
            task = asyncio.ensure_future(self._load(since))
            # Every watcher waiting for it may hang up first: its error is still seen.
            task.add_done_callback(_retrieve)
            self._answers[key] = task
        try:
            return await asyncio.shield(task)
        except Exception:
            self._answers.pop(key, None)
            raise

    async def _load(self, since: int) -> _Answer:
        raw = await asyncio.to_thread(self._publisher.versions_since, since)
        versions = [trust_state_pb2.SignedTrustState.FromString(b) for b in raw]
        latest = _version_of(raw[-1]) if raw else since
        return _Answer(versions, pb.WatchTrustStateResponse(versions=versions), latest)

    async def GetTrustState(
        self, request: pb.GetTrustStateRequest, context: Context
    ) -> pb.GetTrustStateResponse:
        answer = await self._answer(request.since_version)
        return pb.GetTrustStateResponse(versions=answer.versions)

    async def WatchTrustState(
        self, request: pb.WatchTrustStateRequest, context: Context
    ) -> AsyncIterator[pb.WatchTrustStateResponse]:
        since = request.since_version
        if self._watchers is not None:
            self._watchers.inc()
        try:
            while True:
                answer = await self._answer(since)
                if answer.versions:
                    yield answer.response
                    since = answer.latest
                await self._notifier.wait_newer(since, POLL_SECONDS)
        finally:
            if self._watchers is not None:
                self._watchers.dec()
