"""The renewal forecast against what happens: agents with real certificates renew with
RenewWithProof at the time the server told them while the injected clock runs through a
day, and the renewals counted per hour are what GetRotationForecast said at the start.
A settings dry run shows the forecast a change would make and saves nothing."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.renewal import renewal_proof
from keyplane.server.domain.clock import ManualClock
from keyplane.server.domain.forecast import ROTATION_SPREAD_SECONDS
from keyplane.zone.runtime import ZoneOptions, ZoneServer
from tests.serverkit import FQDN, RunningServer, run_cli
from tests.test_enrollment import make_csr, p256

AGENTS = 60
# Validity 6 h, window 1 h: each agent renews 5 h to 5.5 h after its certificate was
# issued, so a day holds four renewals of each, in windows the forecast must place.
VALIDITY_HOURS = 6
WINDOW_HOURS = 1


@dataclass
class Agent:
    name: str
    key: ec.EllipticCurvePrivateKey
    chain: str
    renew_after: datetime.datetime


def _issued(name: str, key: ec.EllipticCurvePrivateKey, issued: object) -> Agent:
    renew_after = issued.renew_after.ToDatetime(tzinfo=datetime.UTC)  # type: ignore[attr-defined]
    return Agent(name, key, issued.certificate_chain_pem, renew_after)  # type: ignore[attr-defined]


def _renew(client: KeyplaneClient, agent: Agent, now: datetime.datetime) -> Agent:
    key = p256()
    csr = make_csr(key, cn=agent.name)
    leaf = x509.load_pem_x509_certificates(agent.chain.encode())[0]
    proof, made = renewal_proof(agent.key, leaf, csr, FQDN, int(now.timestamp()))
    return _issued(agent.name, key, client.renew_with_proof(csr, agent.chain, proof, made))


def _hours(forecast: object) -> list[float]:
    return [h.total for h in forecast.hours]  # type: ignore[attr-defined]


def test_the_forecast_matches_the_renewals_of_a_day(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient, clock: ManualClock
) -> None:
    admin.update_setting("PKIClientTLSKeyRenewalWindowHours", str(WINDOW_HOURS))
    admin.update_setting("PKIClientTLSKeyValidityHours", str(VALIDITY_HOURS))
    token = admin.create_enrollment_token(uses=AGENTS).token
    agents = []
    for n in range(AGENTS):
        key = p256()
        agents.append(
            _issued(f"meter-{n}", key, anonymous.enroll(make_csr(key, f"meter-{n}"), token))
        )
    forecast = admin.get_rotation_forecast(24)
    start = forecast.start_time.ToDatetime(tzinfo=datetime.UTC)
    expected = _hours(forecast)
    assert len(expected) == 24

    # The day, a minute at a time: every agent renews once its renewal time has come.
    observed = [0] * 24
    for minute in range(24 * 60):
        now = start + datetime.timedelta(minutes=minute)
        if now > clock.now():
            clock.advance(now - clock.now())
        for i, agent in enumerate(agents):
            if agent.renew_after <= now:
                agents[i] = _renew(anonymous, agent, now)
                observed[minute // 60] += 1

    # Four renewals of every agent in the day, and the forecast says so.
    assert sum(observed) == 4 * AGENTS
    assert sum(expected) == pytest.approx(4 * AGENTS, abs=0.5)
    # Each cycle in its window of hours: the first all in hour 5 (issued at hour 0,
    # renewed 5 h to 5.5 h later), the next in 10-11, 15-16, 20-22 as the jitter adds up.
    for first, last in ((5, 5), (9, 11), (14, 17), (19, 23)):
        window = slice(first, last + 1)
        assert sum(observed[window]) == AGENTS, (first, observed)
        assert sum(expected[window]) == pytest.approx(AGENTS, abs=0.5), (first, expected)
    # Nothing outside them, in the forecast either.
    quiet = [
        h
        for h in range(24)
        if not any(a <= h <= b for a, b in ((5, 5), (9, 11), (14, 17), (19, 23)))
    ]
    assert all(observed[h] == 0 for h in quiet)
    assert all(expected[h] < 0.5 for h in quiet), expected
    # Within a window the forecast is the expectation of the jitter: the third cycle
    # comes 15 h plus three jitters of 0 to 30 min in, before 16 h for five in six
    # (the Irwin-Hall distribution).
    assert expected[15] == pytest.approx(AGENTS * 5 / 6, rel=0.05)
    assert abs(observed[15] - expected[15]) < AGENTS / 4


def test_the_rotation_burst_counts_every_live_agent(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    token = admin.create_enrollment_token(uses=5).token
    for n in range(5):
        anonymous.enroll(make_csr(p256(), f"pump-{n}"), token)
    burst = admin.get_rotation_forecast().root_rotation_burst
    assert burst.components == 5
    assert burst.spread_seconds == ROTATION_SPREAD_SECONDS
    assert [(e.endpoint, e.components) for e in burst.endpoints] == [("server", 5)]
    assert burst.peak_per_second == pytest.approx(5 / ROTATION_SPREAD_SECONDS)
    # What the command line prints of it, and of coverage.
    env = {"KEYPLANE_SERVER": server.listen}
    out = run_cli("rotation", "forecast", data_dir=server.config.data_dir, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("next 72 hours: 0.0 renewals")
    assert "a root rotation now: 5 components renew within 2 s" in out.stdout
    out = run_cli("roots", "coverage", data_dir=server.config.data_dir, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("5 of 5 live components under the newest root (100.0%")
    out = run_cli(
        "rotation", "forecast", "--hours", "721", data_dir=server.config.data_dir, env=env
    )
    assert out.returncode == 1
    assert out.stderr.strip() == ("keyplane: INVALID_ARGUMENT: a forecast covers 1 to 720 hours")


def test_a_settings_dry_run_shows_the_forecast_and_saves_nothing(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    admin.update_setting("PKIClientTLSKeyRenewalWindowHours", str(WINDOW_HOURS))
    admin.update_setting("PKIClientTLSKeyValidityHours", str(VALIDITY_HOURS))
    token = admin.create_enrollment_token(uses=20).token
    for n in range(20):
        anonymous.enroll(make_csr(p256(), f"valve-{n}"), token)
    now = admin.get_rotation_forecast(72).summary
    events = len(server.hierarchy.store.audit_log(10000))
    # Halving the validity: the certificates issued keep their renewal time (5 h to
    # 5.5 h in), every later cycle comes after 2 h to 2.5 h instead of 5 h to 5.5 h.
    answer = admin.change_setting("PKIClientTLSKeyValidityHours", "3", dry_run=True)
    assert answer.dry_run and answer.setting.value == "3"
    assert answer.forecast_before.total == pytest.approx(now.total)
    assert now.total == pytest.approx(20 * (1 + (72 - 5.25) / 5.25), rel=0.1)
    assert answer.forecast_after.total == pytest.approx(20 * (1 + (72 - 5.25) / 2.25), rel=0.1)
    # Nothing saved, nothing audited.
    assert admin.get_setting("PKIClientTLSKeyValidityHours").value == str(VALIDITY_HOURS)
    assert admin.get_rotation_forecast(72).summary.total == pytest.approx(now.total)
    assert len(server.hierarchy.store.audit_log(10000)) == events
    # What set would refuse, a dry run refuses the same way.
    with pytest.raises(KeyplaneClientError) as refused:
        admin.change_setting("PKIClientTLSKeyRenewalWindowHours", "6", dry_run=True)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # A setting that is not about rotation: checked, no forecast.
    answer = admin.change_setting("PKIRootRevocationMinCoverage", "0.5", dry_run=True)
    assert answer.setting.value == "0.5" and not answer.HasField("forecast_after")
    assert admin.get_setting("PKIRootRevocationMinCoverage").value == "0.99"
    env = {"KEYPLANE_SERVER": server.listen}
    out = run_cli(
        "settings", "set", "PKIClientTLSKeyValidityHours", "3", "--dry-run",
        data_dir=server.config.data_dir, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "dry run: not saved" in out.stdout and "the next 72 hours now" in out.stdout
    assert admin.get_setting("PKIClientTLSKeyValidityHours").value == str(VALIDITY_HOURS)


def test_a_zone_server_renews_its_tls_certificate_when_the_forecast_says(
    server: RunningServer, admin: KeyplaneClient, clock: ManualClock, tmp_path: Path
) -> None:
    # The zone's TLS certificate has the agents' validity (168 h), its intermediate 30
    # days: both are renewed together once either has a tenth of its lifetime left.
    token = admin.create_enrollment_token(role="zone-server").token
    zone = ZoneServer(ZoneOptions(tmp_path / "zone", "zone1", "127.0.0.1:0", "127.0.0.1:0"), clock)
    try:
        zone.prepare(admin.get_init_bundle().SerializeToString(), None, token)
        [record] = server.hierarchy.store.zones()
        first = record.tls_serial
        forecast = admin.get_rotation_forecast(200)
        due = [
            h for h, hour in enumerate(forecast.hours)
            for k in hour.renewals if k.kind == "zone-server"
        ]  # fmt: skip
        assert due == [151]  # 168 h less a tenth
        assert forecast.summary.total == pytest.approx(1.0)
        clock.advance(datetime.timedelta(hours=151))
        assert zone.upstream.needs_renewal() is None
        clock.advance(datetime.timedelta(hours=1))
        assert zone.upstream.needs_renewal() == "its TLS certificate nears expiry"
        zone.upstream.maybe_renew()
        [record] = server.hierarchy.store.zones()
        assert record.tls_serial != first
        assert server.hierarchy.store.certificate(first).renewed_to == record.tls_serial
        coverage = admin.get_root_coverage()
        assert coverage.live.zone_servers == 1 and coverage.moved.zone_servers == 1
        assert zone.upstream.needs_renewal() is None
    finally:
        zone.close()


def test_a_forecast_longer_than_30_days_is_refused(admin: KeyplaneClient) -> None:
    with pytest.raises(KeyplaneClientError) as refused:
        admin.get_rotation_forecast(721)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "720 hours" in refused.value.message
    assert len(admin.get_rotation_forecast(720).hours) == 720
