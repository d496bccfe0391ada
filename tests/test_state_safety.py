"""A start never replaces state it finds: real `keyplane serve` and `keyplane zone serve`
processes on 127.0.0.1. A data dir holding part of a state is refused, with what is
missing, and left exactly as it was; a first start killed half way is finished by the
next; a port another process holds (another keyplane, or any listener) is refused
before the data dir is made, while the first keeps serving; every file is 0600 and
every directory 0700."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient, bootstrap_channel_for
from keyplane.server.datadir import MARKER
from keyplane.server.domain.faults import START_POINTS
from tests.serverkit import FQDN, KEYPLANE, ServerProcess, run_cli
from tests.test_crash_safety import assert_consistent, software_key_ids
from tests.test_enrollment import make_csr, p256
from tests.test_fleet import Process, wait_until

Snapshot = dict[str, tuple[str, int, int]]


def snapshot(path: Path) -> Snapshot:
    """Every entry under `path` (itself included): content hash, mtime and mode."""
    found: Snapshot = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        info = entry.lstat()
        digest = hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "dir"
        found[str(entry.relative_to(path))] = (digest, info.st_mtime_ns, info.st_mode)
    return found


def assert_private(path: Path) -> None:
    """Every file under `path` is 0600 and every directory 0700."""
    loose = [
        f"{entry} {stat.S_IMODE(entry.stat().st_mode):o}"
        for entry in [path, *path.rglob("*")]
        if stat.S_IMODE(entry.stat().st_mode) != (0o700 if entry.is_dir() else 0o600)
    ]
    assert not loose


def serve(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`keyplane serve` that is expected to stop by itself (refused, or killed)."""
    listen = () if "--listen" in args else ("--listen", "127.0.0.1:0")
    return subprocess.run(
        [KEYPLANE, "serve", "--data-dir", str(data), "--fqdn", FQDN, *listen, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "refused to start" in line, line
    for phrase in phrases:
        assert phrase in line, line


def root_fingerprints(data: Path) -> list[str]:
    listing = json.loads(run_cli("roots", "list", "--json", data_dir=data, check=True).stdout)
    return [root["fingerprint"] for root in listing["active"]]


def endpoint(data: Path) -> dict[str, str]:
    return json.loads((data / "admin" / "endpoint.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A data dir after one clean start and stop (copied by each test), and its root."""
    data = tmp_path_factory.mktemp("template") / "data"
    process = ServerProcess(data)
    roots = root_fingerprints(data)
    assert process.stop() == 0
    return data, roots


def copy_of(initialised: tuple[Path, list[str]], tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(initialised[0], data)
    return data


# -- a data dir with part of a state ---------------------------------------------------


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
def test_lost_keyplane_db_is_refused_and_the_old_credential_works_once_it_is_back(
    initialised: tuple[Path, list[str]], tmp_path: Path, workers: tuple[str, ...]
) -> None:
    data = copy_of(initialised, tmp_path)
    (data / "keyplane.db").rename(tmp_path / "keyplane.db")
    before = snapshot(data)
    result = serve(data, *workers)
    assert_refused(
        result, "keyplane.db is missing beside pki.db", "restore it", "nothing was changed"
    )
    assert snapshot(data) == before
    # Put back, the server starts over the same hierarchy, and the admin credential the
    # first start wrote still works.
    (tmp_path / "keyplane.db").rename(data / "keyplane.db")
    process = ServerProcess(data, *workers)
    try:
        assert root_fingerprints(data) == initialised[1]
    finally:
        assert process.stop() == 0
    assert MARKER not in os.listdir(data)


def test_lost_pki_db_is_refused_and_nothing_changes(
    initialised: tuple[Path, list[str]], tmp_path: Path
) -> None:
    data = copy_of(initialised, tmp_path)
    (data / "pki.db").rename(tmp_path / "pki.db")
    before = snapshot(data)
    assert_refused(
        serve(data), "pki.db is missing beside keyplane.db", "restore it", "nothing was changed"
    )
    assert snapshot(data) == before
    (tmp_path / "pki.db").rename(data / "pki.db")
    process = ServerProcess(data)
    try:
        assert root_fingerprints(data) == initialised[1]
    finally:
        assert process.stop() == 0


def test_a_key_file_without_its_pki_db_is_refused_and_nothing_changes(
    initialised: tuple[Path, list[str]], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    shutil.copy2(initialised[0] / "pki.db.key", data / "pki.db.key")
    before = snapshot(data)
    assert_refused(
        serve(data),
        "keyplane.db and pki.db are missing beside pki.db.key",
        "restore them",
        "move the data dir aside to start afresh",
    )
    assert snapshot(data) == before


def test_a_lost_key_file_is_refused_and_nothing_changes(
    initialised: tuple[Path, list[str]], tmp_path: Path
) -> None:
    data = copy_of(initialised, tmp_path)
    (data / "pki.db.key").rename(tmp_path / "pki.db.key")
    before = snapshot(data)
    assert_refused(
        serve(data), "pki.db.key is missing beside keyplane.db, pki.db", "no database password"
    )
    assert snapshot(data) == before
    (tmp_path / "pki.db.key").rename(data / "pki.db.key")
    assert ServerProcess(data).stop() == 0


# -- a first start cut short -----------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "point", [*START_POINTS, "root.generated", "root.recorded", "subordinate.prepared"]
)
def test_a_first_start_killed_half_way_is_finished_by_the_next(tmp_path: Path, point: str) -> None:
    data = tmp_path / "data"
    config = tmp_path / "kill.toml"
    config.write_text(f'[testing]\nkill_at = "{point}"\n')
    assert serve(data, "--config", str(config)).returncode == -signal.SIGKILL
    assert (data / MARKER).exists()
    assert (data / "pki.db").exists()

    process = ServerProcess(data)
    try:
        listing = json.loads(run_cli("roots", "list", "--json", data_dir=data, check=True).stdout)
        keys = json.loads(run_cli("keys", "list", "--json", data_dir=data, check=True).stdout)
    finally:
        assert process.stop() == 0
    assert [root["name"] for root in listing["active"]] == [f"{FQDN} Root 0"]
    assert {k["kind"] for k in keys if k["state"] == "active"} == {
        "server-tls",
        "intermediate-tls",
        "message-signing",
    }
    assert not (data / MARKER).exists()
    assert_consistent(data)
    made = software_key_ids(data)
    assert ServerProcess(data).stop() == 0
    assert software_key_ids(data) == made  # complete now: a restart makes nothing


# -- one server per port ---------------------------------------------------------------


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (from its sockets and /proc/net/tcp*:
    grpc listens on IPv6 sockets, 127.0.0.1 as ::ffff:127.0.0.1)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def workers_on(supervisor: int, port: int) -> set[int]:
    """The supervisor's worker processes that listen on `port`."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    found = set()
    for child in map(int, children):
        try:
            if port in listening_ports(child):
                found.add(child)
        except OSError:
            continue  # it just exited
    return found


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
def test_a_second_server_on_a_running_servers_ports_is_refused(
    tmp_path: Path, workers: tuple[str, ...]
) -> None:
    first = ServerProcess(tmp_path / "first", *workers)
    data = first.data_dir
    try:
        roots = root_fingerprints(data)
        bootstrap = endpoint(data)["bootstrap_listen"]
        other = tmp_path / "other"
        for option, address in (("--listen", first.listen), ("--bootstrap-listen", bootstrap)):
            args = ["--listen", "127.0.0.1:0", option, address]
            if option == "--listen":
                args = ["--listen", address]
            for again in ((), ("--workers", "2")):
                result = serve(other, *args, *again)
                assert_refused(
                    result, f"port {address} ({option})", "held by another keyplane server"
                )
                assert not other.exists()
        # The same data dir, started again while it serves: refused on its ports too.
        assert_refused(serve(data, "--listen", first.listen), f"port {first.listen}")
        # The first still serves, and only its hierarchy answers.
        for _ in range(4):
            assert root_fingerprints(data) == roots
        if workers:
            # A worker that dies is started again and rejoins the ports beside the claim.
            port = int(first.listen.rsplit(":", 1)[1])
            old = workers_on(first.proc.pid, port)
            assert len(old) == 2
            os.kill(min(old), signal.SIGKILL)
            wait_until(
                "a fresh worker on the port",
                lambda: len(workers_on(first.proc.pid, port) - old) == 1,
                30,
            )
            for _ in range(4):
                assert root_fingerprints(data) == roots
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
def test_a_port_held_by_another_program_is_refused(
    tmp_path: Path, workers: tuple[str, ...]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        data = tmp_path / "data"
        result = serve(data, "--listen", address, *workers)
        assert_refused(result, f"port {address} (--listen)", "in use by another process")
        assert not data.exists()


# -- file modes ------------------------------------------------------------------------


def test_every_file_is_private_after_a_start_and_after_writes(tmp_path: Path) -> None:
    process = ServerProcess(tmp_path / "data")
    data = process.data_dir
    try:
        assert_private(data)
        token = run_cli("tokens", "create", "--uses", "3", data_dir=data, check=True).stdout
        csrs = []
        for i in range(3):
            csr = tmp_path / f"agent-{i}.csr"
            csr.write_bytes(make_csr(p256(), cn=f"agent-{i}"))
            csrs.append(str(csr))
        run_cli(
            "certs",
            "issue",
            *csrs,
            "--token",
            token.strip(),
            "--out-dir",
            str(tmp_path / "out"),
            data_dir=data,
            check=True,
        )
        run_cli("roots", "create", data_dir=data, check=True)
        assert_private(data)
    finally:
        assert process.stop() == 0
    assert_private(data)
    # Files made looser by someone else are tightened at the next start.
    (data / "keyplane.db").chmod(0o644)
    (data / "admin" / "ca.pem").chmod(0o644)
    data.chmod(0o755)
    assert ServerProcess(data).stop() == 0
    assert_private(data)


# -- the zone server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("upstream") / "server")
    try:
        yield server
    finally:
        server.stop()


_zone_numbers = itertools.count()


def zone_args(server: ServerProcess, tmp_path: Path, data: Path) -> list[str]:
    """What a zone's first start needs: a data dir, a name of its own, the bundle and a
    fresh token (the token last)."""
    token = run_cli(
        "tokens", "create", "--role", "zone-server", data_dir=server.data_dir, check=True
    ).stdout.strip()
    bundle = tmp_path / "bundle.dat"
    run_cli("bundle", "download", "--out", str(bundle), data_dir=server.data_dir, check=True)
    name = f"zone{next(_zone_numbers)}"
    return ["--data-dir", str(data), "--name", name, "--bundle", str(bundle), "--token", token]


def zone_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KEYPLANE, "zone", "serve", *args], capture_output=True, text=True, timeout=60, check=False
    )


class Zone:
    """A running `keyplane zone serve` and its listeners."""

    def __init__(self, log: Path, *args: str) -> None:
        self.process = Process(log, "zone", "serve", *args)
        wait_until("the zone server", lambda: "bootstrap listener on" in self.process.output(), 60)
        output = self.process.output()
        self.listen = re.findall(r"listening on (\S+)", output)[-1]
        self.bootstrap = re.findall(r"bootstrap listener on (\S+)", output)[-1]

    def enroll(self, server: ServerProcess, tmp_path: Path, count: int) -> None:
        """Enroll `count` agents through this zone's bootstrap listener."""
        bundle = tmp_path / "agents.dat"
        run_cli("bundle", "download", "--out", str(bundle), data_dir=server.data_dir, check=True)
        roots = load_bundle(bundle.read_bytes()).roots_pem()
        token = json.loads(
            run_cli(
                "tokens",
                "create",
                "--uses",
                str(count),
                "--json",
                data_dir=server.data_dir,
                check=True,
            ).stdout
        )["token"]
        with KeyplaneClient(bootstrap_channel_for(self.bootstrap, roots), timeout=30) as client:
            for i in range(count):
                client.enroll(make_csr(p256(), cn=f"meter-{i}"), token)

    def stop(self) -> int:
        return self.process.stop()


@pytest.mark.timeout(180)
def test_zone_refuses_a_partial_data_dir_and_is_private(
    upstream: ServerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "zone"
    args = zone_args(upstream, tmp_path, data)
    name = args[3]
    zone = Zone(tmp_path / "zone.log", *args)
    try:
        assert_private(data)
        zone.enroll(upstream, tmp_path, 3)
        assert_private(data)
    finally:
        assert zone.stop() == 0
    assert_private(data)
    assert not (data / MARKER).exists()
    for lost, beside in (("zone.db", "pki.db"), ("pki.db", "zone.db")):
        (data / lost).rename(tmp_path / lost)
        before = snapshot(data)
        result = zone_serve("--data-dir", str(data), "--name", name)
        assert result.returncode == 2, result.stderr
        assert f"{lost} is missing beside {beside}" in result.stderr
        assert "enroll afresh" in result.stderr and "nothing was changed" in result.stderr
        assert "Traceback" not in result.stderr
        assert snapshot(data) == before
        (tmp_path / lost).rename(data / lost)
    # Whole again, it serves as before: no enrollment needed.
    zone = Zone(tmp_path / "zone-again.log", "--data-dir", str(data), "--name", name)
    assert zone.stop() == 0


@pytest.mark.timeout(180)
def test_a_second_zone_on_a_running_zones_ports_is_refused(
    upstream: ServerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "zone"
    first_args = zone_args(upstream, tmp_path, data)
    zone = Zone(tmp_path / "zone.log", *first_args, "--workers", "2")
    try:
        other = tmp_path / "other"
        args = zone_args(upstream, tmp_path, other)
        for option, address in (("--listen", zone.listen), ("--bootstrap-listen", zone.bootstrap)):
            result = zone_serve(*args, option, address)
            assert result.returncode == 2, result.stderr
            assert f"port {address} ({option})" in result.stderr
            assert "held by another keyplane server" in result.stderr
            assert "Traceback" not in result.stderr
            assert not other.exists()
        # Its own data dir, started again while it serves: the ports it enrolled with.
        result = zone_serve(*first_args[:4])
        assert result.returncode == 2 and "held by another keyplane server" in result.stderr
        # The first zone still serves.
        zone.enroll(upstream, tmp_path, 2)
    finally:
        assert zone.stop() == 0


def test_a_zone_port_held_by_another_program_is_refused(
    upstream: ServerProcess, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        data = tmp_path / "zone"
        result = zone_serve(*zone_args(upstream, tmp_path, data), "--listen", address)
        assert result.returncode == 2, result.stderr
        assert f"port {address} (--listen) is in use by another process" in result.stderr
        assert not data.exists()


@pytest.mark.timeout(180)
def test_a_zone_whose_first_enrollment_failed_is_finished_by_the_next_start(
    upstream: ServerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "zone"
    args = zone_args(upstream, tmp_path, data)
    spoilt = [*args[:-1], "not-a-token"]
    result = zone_serve(*spoilt)
    assert result.returncode == 1 and "cannot enroll" in result.stderr
    assert (data / MARKER).exists()
    zone = Zone(tmp_path / "zone.log", *args)
    try:
        assert not (data / MARKER).exists()
        zone.enroll(upstream, tmp_path, 1)
    finally:
        assert zone.stop() == 0
    assert_private(data)
