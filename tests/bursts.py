"""Bursts of calls whose clients give up: every call gets a deadline drawn from 1 to
100 ms, and a share of them is also cancelled by the client at a random moment before
that, as load generators, flaky networks and impatient agents do. What each call that
succeeded wrote is handed to its `acknowledged` callback, so a test can check that every
acknowledged write is there afterwards."""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

MIN_DEADLINE = 0.001
MAX_DEADLINE = 0.100
CANCEL_SHARE = 0.25


@dataclass
class Call:
    """One call of a burst: `start(timeout)` starts it and returns its grpc future."""

    rpc: str
    start: Callable[[float], grpc.Future]
    acknowledged: Callable[[Any], None] | None = None


@dataclass
class Outcome:
    """What a burst did: status counts per RPC, and how many were cancelled by us."""

    codes: dict[str, Counter[str]] = field(default_factory=dict)
    cancelled_by_client: int = 0

    def count(self, rpc: str, code: str) -> None:
        self.codes.setdefault(rpc, Counter())[code] += 1

    def ok(self, rpc: str) -> int:
        return self.codes.get(rpc, Counter())["OK"]

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.codes.values())

    def summary(self) -> str:
        return "; ".join(f"{rpc}: {dict(c)}" for rpc, c in sorted(self.codes.items()))


def fire(calls: list[Call], seed: int, cancel_share: float = CANCEL_SHARE) -> Outcome:
    """Start every call (in a random order) with a random deadline, cancel some of them
    at random moments, wait for all, and record each outcome."""
    rng = random.Random(seed)
    order = list(calls)
    rng.shuffle(order)
    started: list[tuple[Call, grpc.Future]] = []
    cancels: list[tuple[float, int, grpc.Future]] = []
    outcome = Outcome()

    def cancel_due() -> None:
        now = time.monotonic()
        while cancels and cancels[0][0] <= now:
            _, _, future = heapq.heappop(cancels)
            if future.cancel():
                outcome.cancelled_by_client += 1

    for index, call in enumerate(order):
        deadline = rng.uniform(MIN_DEADLINE, MAX_DEADLINE)
        future = call.start(deadline)
        started.append((call, future))
        if rng.random() < cancel_share:
            when = time.monotonic() + rng.uniform(0, deadline)
            heapq.heappush(cancels, (when, index, future))
        cancel_due()
    while cancels:
        time.sleep(max(0.0, min(0.002, cancels[0][0] - time.monotonic())))
        cancel_due()
    for call, future in started:
        try:
            response = future.result()
        except grpc.FutureCancelledError:
            outcome.count(call.rpc, "CANCELLED")
            continue
        except grpc.RpcError as exc:
            outcome.count(call.rpc, exc.code().name)
            continue
        outcome.count(call.rpc, "OK")
        if call.acknowledged is not None:
            call.acknowledged(response)
    return outcome
