"""The renewal forecast: how many renewals to expect per hour, by kind, from the live
certificates and the validity and renewal-window settings; and the burst a root
rotation now would cause.

The renewal rules it follows are the ones the server and the zones apply:

- an agent renews at the time the server (or zone) told it, drawn uniformly over the
  first half of its renewal window, [not_after - W, not_after - W/2]
  (enrollment.renew_after); its new certificate is valid V from then, so its next
  renewal comes uniformly over [t + V - W, t + V - W/2];
- a zone server renews its intermediate and TLS certificate together when either has
  less than a tenth of its lifetime left (renewal.ZONE_RENEW_AT_REMAINING);
- the server rotates each of its own keys when it enters its window, at not_after - W.

Everything is a density on a minute grid, summed over all certificates: the live
certificates' expiry minutes come from one aggregate query, their first renewals are
spread with a difference array, and every later cycle follows from the renewal
equation r[m] = first[m] + (r over the minutes [m - shift - width + 1, m - shift]) /
width, one pass over the grid per kind however many certificates and cycles there are.
An agent past its renewal time counts in the first minute (it is due now).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyplane.server.domain.coverage import AGENT, ZONE_SERVER, Fleet
from keyplane.server.domain.renewal import ZONE_RENEW_AT_REMAINING
from keyplane.server.domain.settings import Setting
from keyplane.server.errors import InvalidArgument
from keyplane.server.kinds import KeyKind, KeyState, Role
from keyplane.server.store.reads import Reads

if TYPE_CHECKING:
    from keyplane.server.domain.hierarchy import Hierarchy

FORECAST_HOURS = 72
MAX_FORECAST_HOURS = 720
# An agent acts on a new root within this many seconds of seeing it, spread uniformly:
# clients/agent's SOON_MAX_SECONDS (tests/test_root_rotation.py pins the two equal).
ROTATION_SPREAD_SECONDS = 2.0
SERVER_KEY_KINDS = {
    KeyKind.SERVER_TLS: ("server-tls", "ServerTLS"),
    KeyKind.INTERMEDIATE_TLS: ("intermediate-tls", "IntermediateTLS"),
    KeyKind.MESSAGE_SIGNING: ("message-signing", "MessageSigning"),
}
KINDS = (AGENT, ZONE_SERVER, *(name for name, _ in SERVER_KEY_KINDS.values()))
ROTATION_SETTING_KINDS = ("ClientTLS", "IntermediateTLS", "ServerTLS", "MessageSigning")
MINUTE = datetime.timedelta(minutes=1)


@dataclass(frozen=True)
class Cycle:
    """A settings Kind's validity and renewal window, in minutes."""

    validity: int
    window: int


def cycles_of(values: Mapping[str, str]) -> dict[str, Cycle]:
    """The validity and window of each settings Kind, from the settings' values."""
    return {
        kind: Cycle(
            int(values[f"PKI{kind}KeyValidityHours"]) * 60,
            int(values[f"PKI{kind}KeyRenewalWindowHours"]) * 60,
        )
        for kind in ROTATION_SETTING_KINDS
    }


def is_rotation_setting(name: str) -> bool:
    return any(
        name in (f"PKI{k}KeyValidityHours", f"PKI{k}KeyRenewalWindowHours")
        for k in ROTATION_SETTING_KINDS
    )


@dataclass(frozen=True)
class Hour:
    """One hour of the forecast."""

    start: datetime.datetime
    renewals: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.renewals.values())


@dataclass(frozen=True)
class Summary:
    """A forecast's busiest hour and its totals."""

    peak_start: datetime.datetime
    peak_renewals: float
    total: float
    totals: dict[str, float]


@dataclass(frozen=True)
class Burst:
    """The renewals a root rotation now causes, per endpoint ("server", "zone NAME")."""

    spread_seconds: float
    endpoints: tuple[tuple[str, int], ...]

    @property
    def components(self) -> int:
        return sum(n for _, n in self.endpoints)

    def peak_per_second(self, components: int) -> float:
        return components / self.spread_seconds


@dataclass(frozen=True)
class Forecast:
    """What GetRotationForecast answers."""

    start: datetime.datetime
    hours: tuple[Hour, ...]
    burst: Burst

    @property
    def summary(self) -> Summary:
        peak = max(self.hours, key=lambda h: h.total)
        totals = {k: sum(h.renewals.get(k, 0.0) for h in self.hours) for k in KINDS}
        return Summary(peak.start, peak.total, sum(totals.values()), totals)


def renewals(first: list[float], shift: int, width: int) -> list[float]:
    """Every renewal of a population whose first renewals are `first` (expected per
    minute), when each renewal's successor comes `shift` to `shift + width` minutes
    later, uniformly (width 0: exactly `shift` later). One pass: the renewal equation."""
    if shift < 1:
        raise ValueError("a renewal cycle is at least a minute long")
    size = len(first)
    found = [0.0] * size
    prefix = [0.0] * (size + 1)  # prefix[i]: the renewals of the minutes before i
    for m in range(size):
        value = first[m]
        newest = m - shift
        if newest >= 0:
            if width <= 0:
                value += found[newest]
            else:
                value += (prefix[newest + 1] - prefix[max(0, newest - width + 1)]) / width
        found[m] = value
        prefix[m + 1] = prefix[m] + value
    return found


class _Grid:
    """First renewals on the minute grid, added as a difference array."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._steps = [0.0] * (size + 1)
        self.points = [0.0] * size

    def uniform(self, start: int, end: int, count: float) -> None:
        """`count` renewals spread over minutes [start, end) from now; if that has begun,
        over what is left of it; if it is over, now (they are due)."""
        if end <= 0:
            self.point(0, count)
            return
        start = max(start, 0)
        if start >= self.size:
            return
        each = count / (end - start)
        self._steps[start] += each
        self._steps[min(end, self.size)] -= each

    def point(self, minute: int, count: float) -> None:
        if minute < self.size:
            self.points[max(minute, 0)] += count

    def density(self) -> list[float]:
        found, running = [], 0.0
        for m in range(self.size):
            running += self._steps[m]
            found.append(running + self.points[m])
        return found


def forecast(
    reads: Reads,
    fqdn: str,
    now: datetime.datetime,
    hours: int,
    current: Mapping[str, str],
    proposed: Mapping[str, str] | None = None,
) -> Forecast:
    """The forecast of the next `hours` hours with the settings' values `current`; with
    `proposed`, as it would be with those: certificates already issued keep the renewal
    time they were given (the current window), every later cycle follows `proposed`,
    and the server's own keys (which it checks against the window in force) too."""
    hours = hours or FORECAST_HOURS
    if not 1 <= hours <= MAX_FORECAST_HOURS:
        raise InvalidArgument(f"a forecast covers 1 to {MAX_FORECAST_HOURS} hours")
    start = now.replace(second=0, microsecond=0)
    origin = math.floor(start.timestamp() / 60)  # epoch minutes
    size = hours * 60
    told = cycles_of(current)
    going = cycles_of(proposed if proposed is not None else current)
    fleet = Fleet(reads, fqdn, now)
    per_kind: dict[str, list[float]] = {}

    # Agents, at the server and at zones alike (zones apply the same settings).
    client, agents = told["ClientTLS"], _Grid(size)
    for _, minute, count in reads.coverage.live_expiry_minutes(Role.AGENT, now):
        begins = minute - origin - client.window
        agents.uniform(begins, begins + client.window // 2, count)
    nxt = going["ClientTLS"]
    per_kind[AGENT] = renewals(agents.density(), nxt.validity - nxt.window, nxt.window // 2)

    # Zone servers: intermediate and TLS certificate together, at the first to near expiry.
    zones = _Grid(size)
    active = {k.key_uri: k for k in reads.keys(KeyKind.ZONE_INTERMEDIATE, (KeyState.ACTIVE,))}
    for zone in fleet.zones:
        due = [_near_expiry(zone.issued_at, zone.not_after)]
        intermediate = active.get(zone.zone.key_uri)
        if intermediate is not None and intermediate.not_before and intermediate.not_after:
            due.append(_near_expiry(intermediate.not_before, intermediate.not_after))
        zones.point(math.floor(min(due).timestamp() / 60) - origin, 1.0)
    lifetime = min(going["IntermediateTLS"].validity, going["ClientTLS"].validity)
    per_kind[ZONE_SERVER] = renewals(
        zones.density(), max(1, round(lifetime * (1 - ZONE_RENEW_AT_REMAINING))), 0
    )

    # The server's own keys: the newest active one of each kind under the newest root.
    for kind, (name, settings_kind) in SERVER_KEY_KINDS.items():
        grid, cycle = _Grid(size), going[settings_kind]
        current_keys = [
            k
            for k in reads.keys(kind, (KeyState.ACTIVE,))
            if k.issuer_fingerprint == fleet.newest.fingerprint and k.not_after
        ]
        if current_keys:
            due_at = (current_keys[-1].not_after or now) - datetime.timedelta(minutes=cycle.window)
            grid.point(math.floor(due_at.timestamp() / 60) - origin, 1.0)
        per_kind[name] = renewals(grid.density(), cycle.validity - cycle.window, 0)

    found = []
    for hour in range(hours):
        window = slice(hour * 60, hour * 60 + 60)
        counts = {kind: sum(per_kind[kind][window]) for kind in KINDS}
        found.append(
            Hour(start + datetime.timedelta(hours=hour), {k: v for k, v in counts.items() if v})
        )
    return Forecast(start, tuple(found), _burst(fleet))


def _near_expiry(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    return not_after - (not_after - not_before) * ZONE_RENEW_AT_REMAINING


def _burst(fleet: Fleet) -> Burst:
    """Every live component renews at its endpoint: agents where they were issued, zone
    servers at the server."""
    by_endpoint: dict[str, int] = {"server": len(fleet.zones)}
    for issuer, count in fleet.agents_by_issuer.items():
        if issuer in fleet.issuers:
            endpoint = fleet.issuers[issuer][1]
            by_endpoint[endpoint] = by_endpoint.get(endpoint, 0) + count
    ordered = sorted(by_endpoint.items(), key=lambda e: (e[0] != "server", e[0]))
    return Burst(ROTATION_SPREAD_SECONDS, tuple(ordered))


class Forecasts:
    """The forecast over this server's state DB and settings: GetRotationForecast, and
    what a change of a validity or window setting would do (UpdateSetting's dry run)."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.h = hierarchy

    def forecast(self, hours: int = 0) -> Forecast:
        h = self.h
        with h.store.reads.snapshot() as reads:
            return forecast(reads, h.config.fqdn, h.clock.now(), hours, h.settings.values())

    def try_setting(self, name: str, value: str) -> tuple[Setting, Summary | None, Summary | None]:
        """The setting as it would be (checked, not saved) and, for a validity or window
        setting, the forecast's summary before and after."""
        h = self.h
        setting, proposed = h.settings.trial(name, value)
        if not is_rotation_setting(setting.definition.name):
            return setting, None, None
        current = h.settings.values()
        now = h.clock.now()
        with h.store.reads.snapshot() as reads:
            before = forecast(reads, h.config.fqdn, now, FORECAST_HOURS, current)
            after = forecast(reads, h.config.fqdn, now, FORECAST_HOURS, current, proposed)
        return setting, before.summary, after.summary
