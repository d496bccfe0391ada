"""A real `keyplane serve` SIGKILLed at a random moment of each rotation kind (root,
each subordinate, a zone's intermediate), of a backup and of a database password
change, on both backends, again and again on one data dir: after every restart every
invariant holds (tests/invariants.py) with everything acknowledged before, the server
serves, and what the interrupted call would have done is all there or not at all."""

from __future__ import annotations

import fcntl
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from keyplane.clients import backup_archive
from keyplane.plugins.keys import fingerprint
from keyplane.v1 import zone_service_pb2, zone_service_pb2_grpc
from tests.faultkit import KillChain, backend, fault_runs, fault_timeout
from tests.invariants import check_invariants
from tests.serverkit import ServerProcess
from tests.softhsm import SoftHsmToken
from tests.test_enrollment import make_csr, p256
from tests.zonekit import FakeZone, enroll_fake_zone

__all__ = ["backend"]

SUBORDINATES = ("server-tls", "intermediate-tls", "message-signing")


def _report(name: str, chain: KillChain) -> None:
    print(f"{name}: {chain.close()}")  # shown with -rP


def _active_roots(chain: KillChain) -> list[str]:
    with chain.admin() as admin:
        return [r.fingerprint for r in admin.list_root_keys().active]


@pytest.mark.timeout(fault_timeout())
def test_sigkill_during_root_rotations(backend: SoftHsmToken | None, tmp_path: Path) -> None:
    """A root rotation (create the next root, revoke the old one) killed anywhere: at
    most two roots active, the new root there if its creation was answered, the old
    one revoked (and published revoked) if its revocation was answered."""
    chain = KillChain(tmp_path, backend, seed=101)

    def rotate() -> None:
        with chain.admin() as admin:
            active = [r.fingerprint for r in admin.list_root_keys().active]
            if len(active) < 2:  # a kill may have left the next root made, the old not revoked
                created = admin.create_root_key()
                chain.acks.keys.add(created.fingerprint)
            old = active[0]
            admin.revoke_root_key(old, "rotation", confirm=True)
            chain.acks.revoked_keys.add(old)

    chain.measure(rotate)
    for _ in range(fault_runs()):
        chain.kill_during(rotate)
        assert 1 <= len(_active_roots(chain)) <= 2
    _report("root rotation", chain)


@pytest.mark.timeout(fault_timeout())
@pytest.mark.parametrize("kind", SUBORDINATES)
def test_sigkill_during_subordinate_rotations(
    kind: str, backend: SoftHsmToken | None, tmp_path: Path
) -> None:
    """Each subordinate kind rotated and killed anywhere: exactly one active key of the
    kind after the restart, the rotated-to key recorded if the rotation was answered."""
    # The TLS listener's key stays in software (the TLS stack takes it in clear).
    on_token = ("root", "message_signing" if kind == "server-tls" else kind.replace("-", "_"))
    chain = KillChain(tmp_path, backend, seed=SUBORDINATES.index(kind), hsm_kinds=on_token)

    def rotate() -> None:
        with chain.admin() as admin:
            chain.acks.keys.add(admin.rotate_key(kind).fingerprint)

    chain.measure(rotate)
    for _ in range(fault_runs()):
        chain.kill_during(rotate)
        with chain.admin() as admin:
            active = [k for k in admin.list_keys(kind) if k.state == 2]  # KEY_STATE_ACTIVE
            assert len(active) == 1, active
    _report(f"{kind} rotation", chain)


def _renewed(zone: FakeZone, response: Any, intermediate_key: Any, tls_key: Any) -> FakeZone:
    chain_pem = response.intermediate_chain_pem
    return FakeZone(
        zone.name,
        intermediate_key,
        x509.load_pem_x509_certificates(chain_pem.encode())[0],
        chain_pem,
        tls_key,
        response.tls_certificate.certificate_chain_pem,
    )


@pytest.mark.timeout(fault_timeout())
def test_sigkill_during_zone_intermediate_renewals(
    backend: SoftHsmToken | None, tmp_path: Path
) -> None:
    """A zone renewing its intermediate (RenewZoneServer over its mutual TLS) while the
    server is killed: the renewed intermediate recorded if answered, and the zone can
    renew again with whichever credential it holds."""
    chain = KillChain(tmp_path, backend, seed=202)
    with chain.admin() as admin:
        token = admin.create_enrollment_token(uses=1, role="zone-server").token
    zone = enroll_fake_zone(chain.bootstrap, chain.roots_pem(), token, name="killed-zone")
    chain.acks.zones.add("killed-zone")
    holder: dict[str, Any] = {"zone": zone}

    def renew() -> None:
        current = holder["zone"]
        # As a zone server does: the keys of an unanswered renewal are asked for again.
        if "pending" not in holder:
            holder["pending"] = (p256(), p256())
        intermediate_key, tls_key = holder["pending"]
        request = zone_service_pb2.RenewZoneServerRequest(
            intermediate_csr=make_csr(intermediate_key, cn=current.name),
            tls_csr=make_csr(tls_key, cn=current.name),
        )
        with current.channel(chain.server.listen, chain.roots_pem()) as channel:
            response = zone_service_pb2_grpc.ZoneServiceStub(channel).RenewZoneServer(
                request, timeout=30
            )
        renewed = _renewed(current, response, intermediate_key, tls_key)
        holder["zone"] = renewed
        del holder["pending"]
        chain.acks.keys.add(fingerprint(renewed.intermediate.public_key()))  # type: ignore[arg-type]

    chain.measure(renew)
    for _ in range(fault_runs()):
        chain.kill_during(renew)
    renew()  # whichever credential the zone holds still works
    _report("zone intermediate renewal", chain)


def _leftovers(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if p.name.startswith(".backup-"))


@pytest.mark.timeout(fault_timeout())
def test_sigkill_during_backups(backend: SoftHsmToken | None, tmp_path: Path) -> None:
    """A backup streamed while the server is killed: an answered archive passes every
    offline check and the restarted server verifies its manifest; no work dir of a
    killed backup (copies of both databases) stays in the data dir."""
    chain = KillChain(tmp_path, backend, seed=303)
    archives: list[bytes] = []

    def backup() -> None:
        with chain.admin() as admin:
            archive = b"".join(m.chunk for m in admin.create_backup())
        archives.append(archive)

    chain.measure(backup)
    for run in range(fault_runs()):
        before = len(archives)
        answered, _ = chain.kill_during(backup)
        assert answered == (len(archives) > before)
        assert _leftovers(chain.data) == [], f"run {run}: a killed backup's work dir stayed"
    with chain.admin() as admin:
        for i, archive in enumerate(archives):
            path = tmp_path / f"archive-{i}.tar"
            path.write_bytes(archive)
            checked = backup_archive.check_archive(path)
            verified = admin.verify_backup(checked.manifest_bytes)
            assert verified.backup_trust_state_version > 0
            assert not verified.missing_from_live, f"archive {i}: keys lost since"
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                assert backup_archive.MANIFEST in tar.getnames()
    _report("backup", chain)


@pytest.mark.timeout(fault_timeout())
def test_sigkill_during_password_changes(backend: SoftHsmToken | None, tmp_path: Path) -> None:
    """PKIDatabasePassword changed again and again while the server is killed: it
    starts each time with the password file (the change finished or undone), the file
    holds the new password if the change was answered, and every key is there."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    password = secrets / "pki-db-password"
    password.write_text("password 0000 first\n")
    chain = KillChain(
        tmp_path, backend, seed=404, config=f'[backends.software]\npassword_file = "{password}"\n'
    )
    counter = iter(range(1, 10_000))
    asked: dict[str, str] = {}
    used = ["password 0000 first"]

    def change() -> None:
        new = f"password {next(counter):04d} changed"
        used.append(new)
        asked["new"], asked["old"] = new, password.read_text().strip()
        with chain.admin() as admin:
            admin.update_setting("PKIDatabasePassword", new)

    chain.measure(change)
    for _ in range(fault_runs()):
        answered, _ = chain.kill_during(change)
        now = password.read_text().strip()
        assert now == asked["new"] if answered else now in (asked["old"], asked["new"])
        assert not list(secrets.glob("*.new"))
    log = chain.server.output()
    assert not [p for p in used if p in log], "a password is in the server's log"
    _report("password change", chain)


def test_a_killed_backups_work_dir_goes_at_the_next_start_and_a_live_one_stays(
    tmp_path: Path,
) -> None:
    """The work dir a backup killed half-way left (copies of both databases) is removed
    when the server starts again, unless a live process is making a backup (it holds
    backups.lock shared): then nothing is touched."""
    data = tmp_path / "data"
    assert ServerProcess(data).stop() == 0
    left = data / ".backup-killed"
    left.mkdir(mode=0o700)
    (left / "keyplane.db").write_bytes((data / "keyplane.db").read_bytes())
    fd = os.open(data / "backups.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as another worker making a backup now
        assert ServerProcess(data).stop() == 0
        assert left.exists()
    finally:
        os.close(fd)
    server = ServerProcess(data)
    assert server.stop() == 0
    assert _leftovers(data) == []
    assert "removed 1 work dir(s) of backups" in server.output()
    check_invariants(data)
