"""TrustStateService: the signed trust state, once or as a stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from keyplane.server.services.root_keys import Context
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


class TrustStateSource(Protocol):
    """Where versions come from: the server's publisher, or a zone server's relay."""

    def versions_since(self, since: int) -> list[bytes]: ...


class TrustStateServicer(trust_state_service_pb2_grpc.TrustStateServiceServicer):
    """Serves versions from the publisher; watchers are woken by the notifier."""

    def __init__(self, publisher: TrustStateSource, notifier: VersionNotifier) -> None:
        self._publisher = publisher
        self._notifier = notifier
        # When a version commits, every watcher asks for the same answer at once: compute
        # it once per (held version, latest known version) and share it.
        self._answers: dict[
            tuple[int, int], asyncio.Task[list[trust_state_pb2.SignedTrustState]]
        ] = {}

    async def _versions(self, since: int) -> list[trust_state_pb2.SignedTrustState]:
        key = (since, self._notifier.version)
        task = self._answers.get(key)
        if task is None:
            if len(self._answers) > ANSWER_CACHE_SIZE:
                self._answers.clear()
            task = asyncio.ensure_future(self._load(since))
            self._answers[key] = task
        try:
            return await asyncio.shield(task)
        except Exception:
            self._answers.pop(key, None)
            raise

    async def _load(self, since: int) -> list[trust_state_pb2.SignedTrustState]:
        raw = await asyncio.to_thread(self._publisher.versions_since, since)
        return [trust_state_pb2.SignedTrustState.FromString(b) for b in raw]

    async def GetTrustState(
        self, request: pb.GetTrustStateRequest, context: Context
    ) -> pb.GetTrustStateResponse:
        return pb.GetTrustStateResponse(versions=await self._versions(request.since_version))

    async def WatchTrustState(
        self, request: pb.WatchTrustStateRequest, context: Context
    ) -> AsyncIterator[pb.WatchTrustStateResponse]:
        since = request.since_version
        while True:
            versions = await self._versions(since)
            if versions:
                yield pb.WatchTrustStateResponse(versions=versions)
                since = _version_of(versions[-1].SerializeToString())
            await self._notifier.wait_newer(since, POLL_SECONDS)
