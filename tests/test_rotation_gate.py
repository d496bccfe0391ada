"""Root coverage and the revocation gate on a real server, with agents holding real
certificates that renew with RenewWithProof: coverage moves from 0 to 100 % as they
renew onto a new root, the gate follows PKIRootRevocationMinCoverage, and what the dry
run says is what the revocation does to the store. And every other credential playing
the attacker: operators and auditors read coverage but cannot revoke, dry-run or force;
agents and zone servers read nothing of it; a zone server reports renewals and
sightings of its own certificates only; a peer's admin is nobody here."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.credentials import load_credential
from keyplane.clients.renewal import renewal_proof
from keyplane.server.domain.clock import ManualClock
from keyplane.server.services.convert import timestamp
from keyplane.v1 import zone_service_pb2
from tests.peerkit import establish, two_servers, wait_until
from tests.serverkit import FQDN, RunningServer
from tests.test_enrollment import make_csr, p256
from tests.test_roles import new_identity, snapshot_state
from tests.zonekit import FakeZone, enroll_fake_zone, key_pem, mtls_channel

AGENTS = 10
_DER = Encoding.DER


def _refused(code: grpc.StatusCode, call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    assert caught.value.code == code, caught.value
    return caught.value.message


def _enroll(
    admin: KeyplaneClient, anonymous: KeyplaneClient, names: Sequence[str]
) -> list[tuple[str, ec.EllipticCurvePrivateKey, str]]:
    token = admin.create_enrollment_token(uses=len(names)).token
    agents = []
    for name in names:
        key = p256()
        agents.append(
            (name, key, anonymous.enroll(make_csr(key, name), token).certificate_chain_pem)
        )
    return agents


def _renew(
    anonymous: KeyplaneClient, name: str, key: ec.EllipticCurvePrivateKey, chain: str
) -> str:
    csr = make_csr(p256(), name)
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    proof, made = renewal_proof(key, leaf, csr, FQDN)
    return anonymous.renew_with_proof(csr, chain, proof, made).certificate_chain_pem


def _revoked_with_root(server: RunningServer) -> set[str]:
    return {
        c.serial
        for c in server.hierarchy.store.certificates(None, 100_000)
        if (c.revoke_reason or "").startswith("issuing root revoked")
    }


def test_coverage_moves_from_0_to_100_percent_and_the_gate_follows_the_setting(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    names = [f"sensor-{n}" for n in range(AGENTS)]
    agents = _enroll(admin, anonymous, names)
    root0 = admin.list_root_keys().active[0].fingerprint
    assert admin.get_root_coverage().share == 1.0  # one root: everyone is under the newest
    root1 = admin.create_root_key().fingerprint

    coverage = admin.get_root_coverage(straggler_limit=3)
    assert coverage.newest_root_fingerprint == root1 and coverage.share == 0.0
    assert (coverage.live.agents, coverage.moved.agents, coverage.stragglers_total) == (10, 0, 10)
    # The slowest first: the oldest certificates, the first enrolled.
    assert [s.name for s in coverage.stragglers] == names[:3]
    assert {s.root_fingerprint for s in coverage.stragglers} == {root0}

    for done, (name, key, chain) in enumerate(agents, start=1):
        _renew(anonymous, name, key, chain)
        coverage = admin.get_root_coverage()
        assert coverage.moved.agents == done and coverage.live.agents == AGENTS
        assert coverage.share == pytest.approx(done / AGENTS)
        assert [s.name for s in coverage.stragglers] == names[done:]
        if done == AGENTS - 1:
            # 90 % moved: below 0.99, refused, the straggler named, nothing changed.
            before = snapshot_state(server)
            message = _refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                admin.revoke_root_key, root0, "rotation", True,
            )  # fmt: skip
            assert "90.0%" in message and "sensor-9 (agent)" in message
            assert snapshot_state(server) == before
            # The share asked for is a setting: at 0.9 the dry run passes.
            admin.update_setting("PKIRootRevocationMinCoverage", "0.9")
            assert admin.revoke_root(root0, dry_run=True).plan.verdict == 1  # passes
            admin.update_setting("PKIRootRevocationMinCoverage", "1")
            plan = admin.revoke_root(root0, dry_run=True).plan
            assert plan.verdict == 2 and plan.stranded_total == 1  # refused
            assert [s.name for s in plan.first_stranded] == ["sensor-9"]

    # 100 %: passes even at 1, and the revocation does what the dry run said.
    assert admin.get_root_coverage().share == 1.0
    dry = admin.revoke_root(root0, dry_run=True)
    assert dry.plan.dry_run and dry.plan.verdict == 1 and dry.root_key.fingerprint == root0
    unrevoked = {
        c.serial
        for c in server.hierarchy.store.certificates(None, 100_000)
        if c.revoked_at is None and c.issuer_fingerprint in {k.fingerprint for k in dry.plan.keys}
    }
    done = admin.revoke_root(root0, "rotation", True)
    assert done.root_key.state == 2  # revoked
    assert not done.plan.dry_run
    done.plan.dry_run = True
    assert done.plan == dry.plan
    # Every certificate it counted is revoked now, and no other.
    assert _revoked_with_root(server) == unrevoked
    assert len(unrevoked) == dry.plan.certificates_total
    assert {c.name: c.count for c in dry.plan.certificates}["agent"] == AGENTS
    revoked_keys = {
        k.fingerprint
        for kind in ("root", "server_tls", "intermediate_tls", "message_signing")
        for k in server.hierarchy.store.keys(kind)
        if k.state == "revoked"
    }
    assert revoked_keys == {k.fingerprint for k in dry.plan.keys}
    [event] = [e for e in server.hierarchy.store.audit_log(10_000) if e.action == "root.revoke"]
    assert event.details["forced"] is False
    # The admin credential went with Root 0; the one the server wrote under Root 1 reads on.
    with server.admin_client() as fresh:
        assert fresh.get_root_coverage().live.agents == AGENTS  # the renewed ones live on


def test_force_revokes_below_the_threshold_and_is_audited_as_forced(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    _enroll(admin, anonymous, ["pump-1", "pump-2"])
    root0 = admin.list_root_keys().active[0].fingerprint
    admin.create_root_key()
    dry = admin.revoke_root(root0, dry_run=True, force=True)
    assert dry.plan.verdict == 3 and dry.plan.coverage == 0.0  # forced
    assert admin.list_root_keys().active[0].fingerprint == root0  # a dry run changes nothing
    # Force needs what every revocation needs: a reason and the confirmation.
    _refused(grpc.StatusCode.INVALID_ARGUMENT, admin.revoke_root, root0, "", True, force=True)
    _refused(grpc.StatusCode.FAILED_PRECONDITION, admin.revoke_root, root0, "x", False, force=True)
    done = admin.revoke_root(root0, "key compromised", True, force=True)
    assert done.plan.verdict == 3 and done.plan.stranded_total == 2
    [event] = [e for e in server.hierarchy.store.audit_log(10_000) if e.action == "root.revoke"]
    assert event.details["forced"] is True and event.details["reason"] == "key compromised"
    assert event.details["stranded"] == {"agent": 2, "zone-server": 0, "peer": 0}
    with server.admin_client() as fresh:
        assert fresh.get_root_coverage().live.total == 0  # both agents' certificates went


def test_operators_and_auditors_read_coverage_but_cannot_revoke_dry_run_or_force(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    _enroll(admin, anonymous, ["valve-1"])
    root0 = admin.list_root_keys().active[0].fingerprint
    admin.create_root_key()
    before = snapshot_state(server)
    for role in ("operator", "auditor"):
        person = new_identity(admin, f"{role}@example.org", role)
        before = snapshot_state(server)
        with person.client(server) as client:
            assert client.get_root_coverage().live.agents == 1
            assert len(client.get_rotation_forecast(24).hours) == 24
            for kwargs in (
                {"dry_run": True},
                {"reason": "compromised", "confirm": True, "force": True},
            ):
                message = _refused(
                    grpc.StatusCode.PERMISSION_DENIED, client.revoke_root, root0, **kwargs
                )
                assert "admin role" in message
            _refused(
                grpc.StatusCode.PERMISSION_DENIED,
                client.change_setting, "PKIRootRevocationMinCoverage", "0", dry_run=True,
            )  # fmt: skip
            _refused(
                grpc.StatusCode.PERMISSION_DENIED,
                client.update_setting, "PKIRootRevocationMinCoverage", "0",
            )  # fmt: skip
        assert snapshot_state(server) == before
    assert admin.get_setting("PKIRootRevocationMinCoverage").value == "0.99"


def test_agents_and_zone_servers_read_nothing_of_coverage_or_the_forecast(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    roots = (server.admin_dir / "ca.pem").read_bytes()
    [(_, key, chain)] = _enroll(admin, anonymous, ["meter-1"])
    zone = enroll_fake_zone(
        server.bootstrap, roots, admin.create_enrollment_token(role="zone-server").token
    )
    root0 = admin.list_root_keys().active[0].fingerprint
    before = snapshot_state(server)
    channels = {
        "agent": mtls_channel(server.listen, chain.encode(), key_pem(key), roots),
        "zone": zone.channel(server.listen, roots),
    }
    for channel in channels.values():
        with KeyplaneClient(channel) as client:
            for call, args, kwargs in (
                (client.get_root_coverage, (), {}),
                (client.get_rotation_forecast, (), {}),
                (client.revoke_root, (root0,), {"dry_run": True}),
                (client.revoke_root, (root0, "x", True), {"force": True}),
                (client.change_setting, ("PKIClientTLSKeyValidityHours", "1"), {"dry_run": True}),
            ):
                _refused(grpc.StatusCode.PERMISSION_DENIED, call, *args, **kwargs)
    # And nobody at all, on the bootstrap listener.
    for call, args, kwargs in (
        (anonymous.get_root_coverage, (), {}),
        (anonymous.get_rotation_forecast, (), {}),
        (anonymous.revoke_root, (root0,), {"dry_run": True}),
    ):
        _refused(grpc.StatusCode.UNAUTHENTICATED, call, *args, **kwargs)
    assert snapshot_state(server) == before


def _sighting(serial: str, at: datetime.datetime) -> zone_service_pb2.CertificateSighting:
    return zone_service_pb2.CertificateSighting(serial=serial, seen_time=timestamp(at))


def _report(zone: FakeZone, client: KeyplaneClient, renews: str = "", cn: str = "x") -> str:
    cert, _ = zone.mint(cn, ["agent"])
    client.report_issued_certificates(
        [
            zone_service_pb2.IssuedCertificateReport(
                certificate_der=cert.public_bytes(_DER),
                component="agent",
                renews_serial=renews,
            )
        ]
    )
    return f"{cert.serial_number:032x}"


def test_a_zone_reports_renewals_and_sightings_of_its_own_certificates_only(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient, clock: ManualClock
) -> None:
    roots = (server.admin_dir / "ca.pem").read_bytes()
    [(_, _, chain)] = _enroll(admin, anonymous, ["at-server"])
    server_serial = f"{x509.load_pem_x509_certificates(chain.encode())[0].serial_number:032x}"
    zones = [
        enroll_fake_zone(
            server.bootstrap,
            roots,
            admin.create_enrollment_token(role="zone-server").token,
            name=name,
        )
        for name in ("zone-a", "zone-b")
    ]
    store = server.hierarchy.store
    with (
        KeyplaneClient(zones[0].channel(server.listen, roots)) as zone_a,
        KeyplaneClient(zones[1].channel(server.listen, roots)) as zone_b,
    ):
        own = _report(zones[0], zone_a, cn="a-1")
        other = _report(zones[1], zone_b, cn="b-1")
        assert admin.get_root_coverage().live.agents == 3
        before = snapshot_state(server)
        # Zone A claims the server's agent, or zone B's, renewed: refused whole, so the
        # certificate it reports with it is not recorded either, and nobody is marked.
        for victim in (server_serial, other):
            cert, _ = zones[0].mint("a-2", ["agent"])
            message = _refused(
                grpc.StatusCode.PERMISSION_DENIED,
                zone_a.report_issued_certificates,
                [
                    zone_service_pb2.IssuedCertificateReport(
                        certificate_der=cert.public_bytes(_DER),
                        component="agent",
                        renews_serial=victim,
                    )
                ],
            )
            assert "not issued by this zone server" in message
            assert store.certificate(f"{cert.serial_number:032x}") is None
            # Or seen, to make a dead agent look alive.
            _refused(
                grpc.StatusCode.PERMISSION_DENIED,
                zone_a.report_sightings, [_sighting(victim, clock.now())],
            )  # fmt: skip
        assert store.certificate(server_serial).renewed_to is None
        assert store.certificate(other).renewed_to is None
        assert store.reads.coverage.last_seen([server_serial, other]) == {}
        assert admin.get_root_coverage().live.agents == 3
        assert snapshot_state(server) == before
        # Nonsense is refused as such.
        _refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            zone_a.report_sightings, [_sighting("not hex", clock.now())],
        )  # fmt: skip
        _refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            zone_a.report_sightings, [_sighting(own, clock.now())] * 10_001,
        )  # fmt: skip
        # Its own: a sighting from its future is kept as now; a renewal retires the old.
        zone_a.report_sightings([_sighting(own, clock.now() + datetime.timedelta(days=9))])
        assert store.reads.coverage.last_seen([own])[own] <= clock.now()
        renewed = _report(zones[0], zone_a, renews=own, cn="a-1")
        assert store.certificate(own).renewed_to == renewed
        assert admin.get_root_coverage().live.agents == 3  # a-1 once, under its new serial


def test_a_peer_counts_under_the_root_it_holds_and_its_admin_is_nobody_here(
    tmp_path: Path,
) -> None:
    with two_servers(tmp_path) as (a, b):
        establish(a, b)
        with a.admin() as admin:
            coverage = admin.get_root_coverage()
            assert coverage.live.peers == 1 and coverage.moved.peers == 1
            root0 = coverage.newest_root_fingerprint
            root1 = admin.create_root_key().fingerprint
            # B holds A's new root once it has taken A's new trust state.
            wait_until(
                "B to accept A's new root",
                lambda: admin.get_root_coverage().moved.peers == 1,
                30,
            )
            plan = admin.revoke_root(root0, dry_run=True).plan
            [peer] = plan.peers
            assert peer.fqdn == b.fqdn and peer.root_removed == root0
            assert list(peer.roots_remaining) == [root1] and peer.holds_newest_root
            assert plan.verdict == 1
        # B's admin holds a certificate B's root issued: no role at A, whatever it says.
        b_admin = load_credential(b.data_dir / "admin")
        before = snapshot_state(a.server)
        events = len(a.server.hierarchy.store.audit_log(100_000))
        with KeyplaneClient(
            mtls_channel(
                a.listen,
                b_admin.certificate_chain_pem,
                b_admin.private_key_pem,
                a.roots_pem() + b.roots_pem(),
            )
        ) as stranger:
            for call, args, kwargs in (
                (stranger.get_root_coverage, (), {}),
                (stranger.revoke_root, (root0,), {"dry_run": True}),
                (stranger.revoke_root, (root0, "x", True), {"force": True}),
            ):
                _refused(grpc.StatusCode.PERMISSION_DENIED, call, *args, **kwargs)
        # Nothing changed; the audit log holds the refusals (and the peer link's pulls,
        # which go on meanwhile).
        assert snapshot_state(a.server)[1:] == before[1:]

        def added() -> list[str]:
            return [e.action for e in a.server.hierarchy.store.audit_log(100_000)[events:]]

        # Refusals are recorded without making the call wait: soon after, then.
        wait_until("the refusals to be recorded", lambda: added().count("access.refused") == 3)
        assert set(added()) <= {"access.refused", "trust.peer_update"}


def test_who_was_seen_is_written_in_batches_not_per_call(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient, clock: ManualClock
) -> None:
    [(_, key, chain)] = _enroll(admin, anonymous, ["seen-1"])
    serial = f"{x509.load_pem_x509_certificates(chain.encode())[0].serial_number:032x}"
    admin.create_root_key()
    roots = (server.admin_dir / "ca.pem").read_bytes()  # both roots now
    server.hierarchy.write_sightings()  # what the admin's calls noted so far
    store = server.hierarchy.store
    with KeyplaneClient(mtls_channel(server.listen, chain.encode(), key_pem(key), roots)) as agent:
        for _ in range(5):
            agent.get_trust_state()
        # Noted in memory only: nothing written yet.
        assert store.reads.coverage.last_seen([serial]) == {}
        [straggler] = admin.get_root_coverage().stragglers
        assert straggler.last_seen_time == straggler.issue_time
        clock.advance(datetime.timedelta(minutes=5))
        agent.get_trust_state()
    assert server.hierarchy.write_sightings() >= 1  # one transaction for the batch
    seen = store.reads.coverage.last_seen([serial])[serial]
    assert seen == clock.now()
    [straggler] = admin.get_root_coverage().stragglers
    assert straggler.last_seen_time.ToDatetime(tzinfo=datetime.UTC) == seen
    # A later batch never moves it back.
    assert server.hierarchy.write_sightings() >= 0
    assert store.reads.coverage.last_seen([serial])[serial] == seen
