"""A real `keyplane serve` whose data dir is a small tmpfs the test mounts: filled to the
last byte while enrollments, token creation, rotation and backups are asked for, and
remounted read-only between starts. Each write refused on the full disk is
RESOURCE_EXHAUSTED, says so in one line, and leaves nothing: no certificate handed out without
its record, no token use spent, no backup work dir; what was there before is intact;
once space returns, the same server serves writes again. A read-only data dir is
refused at start in one line, and served once writable. Mounting
needs root: without it the test skips, except under CI=true, where it fails."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError, bootstrap_channel_for
from keyplane.clients.credentials import load_credential
from tests.invariants import Acknowledged, check_invariants
from tests.serverkit import KEYPLANE, ServerProcess
from tests.test_enrollment import make_csr, p256

SIZE = "16m"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at tmp_path/fs, unmounted afterwards."""
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI runs the suite as root", pytrace=False)
        pytest.skip(f"{reason} (skipped as CI is not 'true'; under CI=true this fails)")
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(mount)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def _fill(mount: Path) -> Path:
    """Write zeros until the file system has no byte left."""
    filler = mount / ".filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _refused(call: Callable[[], Any]) -> KeyplaneClientError:
    with pytest.raises(KeyplaneClientError) as caught:
        call()
    return caught.value


class Served:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.server = ServerProcess(data)
        endpoint = json.loads((data / "admin" / "endpoint.json").read_text())
        roots = (data / "admin" / "ca.pem").read_bytes()
        self.admin = KeyplaneClient.connect(self.server.listen, load_credential(data / "admin"))
        self.anonymous = KeyplaneClient(bootstrap_channel_for(endpoint["bootstrap_listen"], roots))
        self.acks = Acknowledged()
        self.token = self.admin.create_enrollment_token(uses=1000).token

    def enroll(self) -> str:
        serial = self.anonymous.enroll(make_csr(p256(), cn="disk"), self.token).serial
        self.acks.serials.add(serial)
        return serial

    def writes(self) -> dict[str, Callable[[], Any]]:
        return {
            "Enroll": self.enroll,
            "CreateEnrollmentToken": lambda: self.admin.create_enrollment_token(uses=1),
            "RotateKey": lambda: self.admin.rotate_key("message-signing"),
            "CreateBackup": lambda: b"".join(m.chunk for m in self.admin.create_backup()),
        }

    def close(self) -> None:
        self.admin.close()
        self.anonymous.close()
        assert self.server.stop() == 0
        assert "Traceback" not in self.server.output()


def _counts(data: Path) -> tuple[int, int]:
    with sqlite3.connect(f"file:{data / 'keyplane.db'}?mode=ro", uri=True) as db:
        certificates = db.execute("SELECT count(*) FROM certificates").fetchone()[0]
        keys = db.execute("SELECT count(*) FROM keys").fetchone()[0]
    return int(certificates), int(keys)


@pytest.mark.timeout(180)
def test_a_full_disk_refuses_writes_with_resource_exhausted_and_recovers(
    small_fs: Path,
) -> None:
    served = Served(small_fs)
    try:
        earlier = [served.enroll() for _ in range(3)]
        before = check_invariants(small_fs, acknowledged=served.acks)
        counts = _counts(small_fs)
        filler = _fill(small_fs)
        for rpc, write in served.writes().items():
            for _ in range(3):
                refused = _refused(write)
                assert refused.code.name == "RESOURCE_EXHAUSTED", (rpc, refused)
                assert "data dir is full" in refused.message, (rpc, refused.message)
        # Reads and signatures go on; nothing was written.
        assert served.admin.sign_message(b"while full").signature
        assert {c.serial for c in served.admin.list_certificates("agent")} >= set(earlier)
        assert _counts(small_fs) == counts
        assert not list(small_fs.glob(".backup-*"))
        filler.unlink()
        for write in served.writes().values():  # the same process serves writes again
            write()
        check_invariants(small_fs, acknowledged=served.acks, previous=before)
    finally:
        served.close()
    check_invariants(small_fs, acknowledged=served.acks)


@pytest.mark.timeout(180)
def test_a_read_only_data_dir_is_refused_at_start_and_serves_once_writable(
    small_fs: Path,
) -> None:
    """Read-only under a running server cannot be made (the kernel refuses to remount a
    file system with files open for writing), so: the data dir's file system remounted
    read-only between two starts. The start is refused in one line saying so (status
    2), nothing changed; writable again, the server serves and everything is there."""
    served = Served(small_fs)
    served.enroll()
    served.close()
    before = check_invariants(small_fs, acknowledged=served.acks)
    listing = sorted(p.name for p in small_fs.iterdir())
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True, timeout=30)
    try:
        result = subprocess.run(
            [KEYPLANE, "serve", "--data-dir", str(small_fs), "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True, timeout=30)
    assert result.returncode == 2, result.stderr
    [line] = [x for x in result.stderr.splitlines() if "refused to start" in x]
    assert "cannot be written (a read-only file system" in line
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in small_fs.iterdir()) == listing
    again = Served(small_fs)
    again.acks = served.acks
    try:
        again.enroll()
    finally:
        again.close()
    check_invariants(small_fs, acknowledged=again.acks, previous=before)
