"""Processes the harness starts and always stops: `keyplane serve`, `keyplane zone serve`,
`cfssl serve`, SoftHSM tokens, and the CLI. Everything binds 127.0.0.1 only."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import progress
from keyplane.clients.client import KeyplaneClient
from keyplane.clients.credentials import Credential, load_credential

KEYPLANE = str(Path(sys.executable).with_name("keyplane"))
FQDN = "bench.keyplane.test"
HOST = "127.0.0.1"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=10)


class LoggedProcess:
    """A subprocess whose stdout and stderr go to a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self._file = log.open("ab")
        self.proc = subprocess.Popen(
            args,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_for(self, what: str, ready: Any, timeout: float = 60.0) -> None:
        """Poll `ready()` until it is true; fail with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited early ({what}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        try:
            return _stop(self.proc)
        finally:
            self._file.close()


class ServerProcess(LoggedProcess):
    """`keyplane serve` on 127.0.0.1 with kernel-chosen ports (from admin/endpoint.json)."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        config: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        endpoint = data_dir / "admin" / "endpoint.json"
        endpoint.unlink(missing_ok=True)
        args = [KEYPLANE, "serve", "--data-dir", str(data_dir), "--listen", f"{HOST}:0"]
        args += ["--fqdn", FQDN, "--log-level", "WARNING"]
        if config is not None:
            args += ["--config", str(config)]
        super().__init__([*args, *extra], data_dir.parent / f"{data_dir.name}-serve.log", env)
        try:
            self.wait_for("keyplane serve to start", endpoint.exists, 120)
            note = json.loads(endpoint.read_text())
        except BaseException:
            self.stop()
            raise
        self.listen: str = note["listen"]
        self.bootstrap: str = note["bootstrap_listen"]

    @property
    def admin_dir(self) -> Path:
        return self.data_dir / "admin"

    def credential(self) -> Credential:
        return load_credential(self.admin_dir)

    def roots_pem(self) -> bytes:
        return (self.admin_dir / "ca.pem").read_bytes()

    def admin(self) -> KeyplaneClient:
        return KeyplaneClient.connect(self.listen, self.credential())

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.data_dir, *args, check=check)

    def aio_admin_channel(self) -> grpc.aio.Channel:
        """A grpc.aio mutual-TLS channel with the admin credential (create it on a loop)."""
        cred = self.credential()
        creds = grpc.ssl_channel_credentials(
            root_certificates=cred.root_certificates_pem,
            private_key=cred.private_key_pem,
            certificate_chain=cred.certificate_chain_pem,
        )
        return grpc.aio.secure_channel(self.listen, creds)

    def aio_bootstrap_channel(self) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.roots_pem())
        return grpc.aio.secure_channel(self.bootstrap, creds)

    def diagnosis(self) -> str:
        """Open files against the limit, and the last error in the log (for a failure)."""
        try:
            files = len(list(Path(f"/proc/{self.pid}/fd").iterdir()))
            limit = next(
                line.split()[3]
                for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines()
                if line.startswith("Max open files")
            )
        except (OSError, StopIteration):
            files, limit = -1, "?"
        errors = [
            line
            for line in self.output().splitlines()
            if "Error" in line.split(":")[0] or " ERROR " in line
        ]
        last = errors[-1].strip() if errors else "none"
        return f"server: {files} open files (limit {limit}); last error in its log: {last}"

    def pids(self) -> list[int]:
        """The server process and its descendants (worker processes, if any)."""
        return [self.pid, *descendants(self.pid)]

    def signed_since(self, since: float) -> list[float]:
        """When (time.time()) each certificate recorded since `since` was signed, sorted;
        from the state DB, read-only beside the running server (WAL lets a reader in)."""
        cutoff = datetime.datetime.fromtimestamp(since - 1, datetime.UTC).isoformat()
        db = sqlite3.connect(f"file:{self.data_dir / 'keyplane.db'}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute(
                "SELECT issued_at FROM certificates WHERE issued_at >= ?", (cutoff,)
            ).fetchall()
        finally:
            db.close()
        times = (datetime.datetime.fromisoformat(row[0]).timestamp() for row in rows)
        return sorted(t for t in times if t >= since)

    def signed_since_settled(self, since: float, timeout: float = 10.0) -> list[float]:
        """signed_since once the count stops growing: the server finishes the calls it had
        begun when their client hung up (and drops those whose commit had not begun)."""
        signed = self.signed_since(since)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.25)
            again = self.signed_since(since)
            if len(again) == len(signed):
                break
            signed = again
        return signed

    def errors_logged_since(self, offset: int) -> list[str]:
        """The error lines the server logged past `offset` (a size its log had)."""
        with self.log.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return [
            line.strip()
            for line in text.splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
        ]


def run_cli(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The `keyplane` CLI against the server whose data dir is `data_dir`."""
    env = {**os.environ, "KEYPLANE_DATA_DIR": str(data_dir)}
    env.pop("KEYPLANE_SERVER", None)
    env.pop("KEYPLANE_CREDENTIALS", None)
    result = subprocess.run(
        [KEYPLANE, *args], capture_output=True, text=True, env=env, check=False, timeout=300
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"keyplane {' '.join(args)} failed: {result.stderr.strip()}")
    return result


class ZoneProcess(LoggedProcess):
    """`keyplane zone serve`, enrolled on its first start with a bundle and a token."""

    def __init__(
        self, data_dir: Path, bundle: Path, token: str, *extra: str, name: str = "zone1"
    ) -> None:
        args = [KEYPLANE, "zone", "serve", "--data-dir", str(data_dir), "--name", name]
        args += ["--bundle", str(bundle), "--token", token, "--log-level", "WARNING"]
        args += ["--listen", f"{HOST}:0", "--bootstrap-listen", f"{HOST}:0", *extra]
        super().__init__(args, data_dir.parent / f"{data_dir.name}-zone.log")
        try:
            self.wait_for("the zone server to listen", lambda: "listening on" in self.output())
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        """The zone server process and its descendants (worker processes, if any)."""
        return [self.pid, *descendants(self.pid)]


class CfsslProcess(LoggedProcess):
    """`cfssl serve` with a fresh P-256 CA, bound to 127.0.0.1 on a free port."""

    def __init__(self, workdir: Path) -> None:
        cfssl = shutil.which("cfssl")
        if cfssl is None:
            raise RuntimeError(
                "cfssl is not installed: make bench-deps (apt-get install golang-cfssl)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        request = {"CN": "cfssl bench CA", "key": {"algo": "ecdsa", "size": 256}}
        made = subprocess.run(
            [cfssl, "genkey", "-initca", "-"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        ca = json.loads(made.stdout)
        (workdir / "ca.pem").write_text(ca["cert"])
        key_file = workdir / "ca-key.pem"
        key_file.touch(mode=0o600)
        key_file.write_text(ca["key"])
        self.port = free_port()
        args = [cfssl, "serve", "-address", HOST, "-port", str(self.port)]
        args += ["-ca", str(workdir / "ca.pem"), "-ca-key", str(key_file), "-loglevel", "4"]
        super().__init__(args, workdir / "cfssl-serve.log")
        self.version = subprocess.run(
            [cfssl, "version"], capture_output=True, text=True, check=False
        ).stdout.split("\n")[0]
        try:
            self.wait_for("cfssl serve to listen", self._listening, 30)
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                return True
        except OSError:
            return False


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def proc_status_kib(pid: int, field: str) -> int:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM), in KiB; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (from /proc/<pid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


class SoftHsm:
    """A SoftHSM configuration of its own (a temp token dir) with initialised tokens."""

    PIN = "bench-user-pin-4821"
    SO_PIN = "bench-so-pin-9317"

    def __init__(self, root: Path) -> None:
        util = shutil.which("softhsm2-util")
        if util is None or not Path(SOFTHSM_MODULE).is_file():
            raise RuntimeError("SoftHSM is not installed: make system-test-deps (softhsm2)")
        self.util = util
        self.root = root
        tokens = root / "tokens"
        tokens.mkdir(parents=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        self.pin_file = root / "hsm-pin"
        self.pin_file.touch(mode=0o600)
        self.pin_file.write_text(self.PIN + "\n")

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def init_token(self, label: str) -> None:
        args = [self.util, "--init-token", "--free", "--label", label]
        args += ["--pin", self.PIN, "--so-pin", self.SO_PIN]
        subprocess.run(
            args, capture_output=True, check=True, timeout=60, env={**os.environ, **self.env}
        )

    def options(self, label: str) -> dict[str, str]:
        return {"module": SOFTHSM_MODULE, "token": label, "pin_file": str(self.pin_file)}


def stop_all(processes: list[LoggedProcess]) -> None:
    """Stop every process, newest first, even if one stop fails."""
    for process in reversed(processes):
        try:
            process.stop()
        except Exception as exc:  # keep stopping the rest
            progress(f"could not stop {process.args[0]}: {exc}")
