"""`keyplane agent` against a real `keyplane serve` subprocess: enrollment, restart,
renewal, refusals, root rotation, revocation (the agent stops), and verifying signed
messages."""

from __future__ import annotations

import datetime
import json
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyplane.clients.agent import (
    EXIT_REVOKED,
    Agent,
    Issued,
    load_issued,
    new_key_and_csr,
    save_issued,
)
from keyplane.clients.bundle import load_bundle
from keyplane.clients.client import KeyplaneClient
from tests.serverkit import KEYPLANE, RunningServer, ServerProcess, run_cli

Status = dict[str, Any]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "server")
    yield process
    assert process.stop() == 0


def cli_json(server: ServerProcess, *args: str) -> Any:
    result = run_cli(*args, "--json", data_dir=server.data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def new_token(server: ServerProcess, uses: int = 1) -> str:
    token = cli_json(server, "tokens", "create", "--uses", str(uses), "--ttl", "1h")["token"]
    assert isinstance(token, str)
    return token


@pytest.fixture
def bundle(served: ServerProcess, tmp_path: Path) -> Path:
    out = tmp_path / "keyplane-init.dat"
    cli_json(served, "bundle", "download", "--out", str(out))
    return out


class AgentProcess:
    """`keyplane agent run` as a subprocess, its output in a log file beside its dir."""

    def __init__(self, data_dir: Path, bundle: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.log = data_dir.parent / f"{data_dir.name}-agent.log"
        self._log_file = self.log.open("ab")
        self.stopped = False
        self.proc = subprocess.Popen(
            [
                KEYPLANE,
                "agent",
                "run",
                "--bundle",
                str(bundle),
                "--data-dir",
                str(data_dir),
                *extra,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text()

    def status(self) -> Status | None:
        try:
            data = json.loads((self.data_dir / "status.json").read_text())
        except FileNotFoundError:
            return None
        assert isinstance(data, dict)
        return data

    def wait_for(
        self, what: str, predicate: Callable[[Status], bool], timeout: float = 30.0
    ) -> Status:
        """Poll status.json until `predicate` holds; fail with the log if it never does."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and predicate(status):
                return status
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the agent exited ({self.proc.returncode}) before {what}:\n{self.output()}"
                )
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; last status {status}\n{self.output()}")

    def wait_enrolled(self) -> Status:
        return self.wait_for(
            "enrollment and a trust state",
            lambda s: s["serial"] is not None and s["trust_state_version"] is not None,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """`sig`, then SIGKILL if it does not go; the exit code."""
        self.stopped = True
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
                raise
        finally:
            self._log_file.close()


@pytest.fixture
def agents(served: ServerProcess) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents; every one still running is stopped before the server."""
    started: list[AgentProcess] = []

    def start(data_dir: Path, bundle: Path, *extra: str) -> AgentProcess:
        agent = AgentProcess(data_dir, bundle, *extra)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if not agent.stopped:
            agent.stop()


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KEYPLANE, "agent", *args], capture_output=True, text=True, timeout=60, check=False
    )


def split_chain(data_dir: Path, out: Path) -> tuple[Path, Path]:
    """cert.pem as leaf.pem and intermediate.pem in `out`."""
    leaf, intermediate = x509.load_pem_x509_certificates((data_dir / "cert.pem").read_bytes())
    paths = (out / "leaf.pem", out / "intermediate.pem")
    for path, cert in zip(paths, (leaf, intermediate), strict=True):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def openssl_verify(roots: Path, intermediate: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(roots), "-untrusted", str(intermediate), str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def leaf_matches_key(data_dir: Path) -> bool:
    leaf = x509.load_pem_x509_certificates((data_dir / "cert.pem").read_bytes())[0]
    key = serialization.load_pem_private_key((data_dir / "key.pem").read_bytes(), None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return leaf.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def agent_certificates(server: ServerProcess) -> list[dict[str, Any]]:
    found = cli_json(server, "certs", "list", "--component", "agent")
    assert isinstance(found, list)
    return found


def test_agent_enrolls_with_a_token_and_reports_its_status(
    served: ServerProcess,
    bundle: Path,
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    root = cli_json(served, "roots", "list")["active"][0]["fingerprint"]
    data = tmp_path / "agent"
    agent = agents(
        data, bundle, "--token", new_token(served), "--fingerprint", f"sha256:{root.upper()}"
    )
    status = agent.wait_enrolled()

    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data / "key.pem").st_mode) == 0o600
    assert status["name"].startswith("agent-") and len(status["name"]) == len("agent-") + 8
    assert status["chain_root_fingerprint"] == root
    assert status["trusted_roots"] == [root]
    assert status["renewals"] == 0 and status["last_error"] is None
    assert status["endpoint"]["listen"] == served.listen

    leaf, intermediate = split_chain(data, tmp_path)
    verified = openssl_verify(data / "roots.pem", intermediate, leaf)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    cert = x509.load_pem_x509_certificate(leaf.read_bytes())
    assert f"{cert.serial_number:032x}" == status["serial"]
    common_name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert common_name == status["name"]
    assert leaf_matches_key(data)
    assert [c["serial"] for c in agent_certificates(served)] == [status["serial"]]

    shown = agent_cli("status", "--data-dir", str(data), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["serial"] == status["serial"]
    table = agent_cli("status", "--data-dir", str(data))
    assert table.returncode == 0
    assert "serial:" in table.stdout and status["serial"] in table.stdout

    assert agent.stop() == 0
    assert "PRIVATE KEY" not in agent.output()


def test_a_restart_resumes_without_enrolling_again(
    served: ServerProcess,
    bundle: Path,
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    data = tmp_path / "agent"
    token = new_token(served, uses=1)  # a second enrollment would be refused
    first = agents(data, bundle, "--token", token, "--name", "edge-7")
    assert first.wait_enrolled()["name"] == "edge-7"
    assert first.stop(signal.SIGINT) == 0
    enrolled = first.status()
    assert enrolled is not None

    renamed = agent_cli("run", "--bundle", str(bundle), "--data-dir", str(data), "--name", "edge-8")
    assert renamed.returncode == 2 and "enrolled as 'edge-7'" in renamed.stderr

    second = agents(data, bundle, "--token", token)
    resumed = second.wait_for("the restart", lambda s: s["updated"] != enrolled["updated"])
    assert resumed["serial"] == enrolled["serial"] and resumed["name"] == "edge-7"
    assert resumed["trust_state_version"] == enrolled["trust_state_version"]
    assert len(agent_certificates(served)) == 1

    # It follows the trust state again, from the version it saved.
    run_cli(
        "settings", "set", "PKIClientTLSKeyRenewalWindowHours", "5", data_dir=served.data_dir
    ).check_returncode()
    followed = second.wait_for(
        "a newer trust state",
        lambda s: (s["trust_state_version"] or 0) > enrolled["trust_state_version"],
    )
    assert followed["last_error"] is None
    assert second.proc.poll() is None
    assert second.stop() == 0


def test_the_agent_renews_at_renew_after(
    served: ServerProcess,
    bundle: Path,
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    data = tmp_path / "agent"
    # 168 h certificates renewed ~165 h in: about 3 s at this scale.
    agent = agents(data, bundle, "--token", new_token(served), "--time-scale", "200000")
    enrolled = agent.wait_enrolled()
    renewed = agent.wait_for("a renewal", lambda s: s["renewals"] >= 1)
    assert renewed["serial"] != enrolled["serial"]
    assert renewed["last_error"] is None
    assert stat.S_IMODE(os.stat(data / "key.pem").st_mode) == 0o600
    assert leaf_matches_key(data)
    serials = {c["serial"] for c in agent_certificates(served)}
    assert {enrolled["serial"], renewed["serial"]} <= serials
    assert agent.stop() == 0


def test_a_spent_or_unknown_token_stops_the_agent(
    served: ServerProcess,
    bundle: Path,
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    token = new_token(served, uses=1)
    agents(tmp_path / "first", bundle, "--token", token).wait_enrolled()

    for data, attempt in ((tmp_path / "spent", token), (tmp_path / "unknown", "kpt_nope")):
        result = agent_cli(
            "run", "--bundle", str(bundle), "--data-dir", str(data), "--token", attempt
        )
        assert result.returncode == 1, result.stderr
        assert "UNAUTHENTICATED" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (data / "key.pem").exists() and not (data / "cert.pem").exists()
        status = json.loads((data / "status.json").read_text())
        assert status["serial"] is None
        assert status["last_error"].startswith("UNAUTHENTICATED")


def test_a_bundle_that_does_not_match_the_fingerprint_is_refused(
    bundle: Path, tmp_path: Path
) -> None:
    data = tmp_path / "agent"
    result = agent_cli(
        "run", "--bundle", str(bundle), "--data-dir", str(data), "--fingerprint", "ab" * 32
    )
    assert result.returncode == 2
    assert "do not include the expected fingerprint" in result.stderr
    assert "Traceback" not in result.stderr
    assert not data.exists()

    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"not a bundle")
    result = agent_cli("run", "--bundle", str(garbage), "--data-dir", str(data))
    assert result.returncode == 2 and "does not parse" in result.stderr

    for verb in ("run", "status", "verify"):
        helped = agent_cli(verb, "--help")
        assert helped.returncode == 0 and "--data-dir" in helped.stdout
    assert "--time-scale" in agent_cli("run", "--help").stdout
    missing = agent_cli("status", "--data-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no agent" in missing.stderr


def test_root_rotation_moves_the_agent_to_the_new_root(
    served: ServerProcess,
    bundle: Path,
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    data = tmp_path / "agent"
    agent = agents(data, bundle, "--token", new_token(served))
    old_root = agent.wait_enrolled()["chain_root_fingerprint"]

    new_root = cli_json(served, "roots", "create")["fingerprint"]
    moved = agent.wait_for(
        "renewal onto the new root", lambda s: s["chain_root_fingerprint"] == new_root
    )
    assert moved["trusted_roots"] == [old_root, new_root]
    assert moved["renewals"] >= 1 and moved["last_error"] is None

    cli_json(served, "roots", "revoke", old_root, "--reason", "rotation", "--yes")
    dropped = agent.wait_for("the old root to go", lambda s: s["trusted_roots"] == [new_root])
    assert dropped["last_error"] is None
    assert dropped["chain_root_fingerprint"] == new_root

    # The certificate it holds now chains to the new root alone.
    roots = tmp_path / "new-root.pem"
    roots.write_text(cli_json(served, "roots", "show", new_root)["certificate_pem"])
    leaf, intermediate = split_chain(data, tmp_path)
    verified = openssl_verify(roots, intermediate, leaf)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    current = [c for c in agent_certificates(served) if c["serial"] == dropped["serial"]]
    assert current and current[0]["revoked"] is None
    assert agent.stop() == 0


def test_a_revoked_agent_stops_and_says_to_enroll_again(
    served: ServerProcess,
    bundle: Path,
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    data = tmp_path / "agent"
    agent = agents(data, bundle, "--token", new_token(served))
    enrolled = agent.wait_enrolled()
    assert enrolled["state"] == "enrolled"
    kept = ("agent.json", "key.pem", "cert.pem", "roots.pem", "issued.json")
    files_before = {name: (data / name).read_bytes() for name in kept}

    run_cli(
        "certs", "revoke", enrolled["serial"], "--reason", "stolen", data_dir=served.data_dir
    ).check_returncode()
    assert agent.proc.wait(timeout=30) == EXIT_REVOKED, agent.output()
    assert agent.stop() == EXIT_REVOKED
    said = f"revoked: re-enroll with a new token (certificate {enrolled['serial']}"
    assert said in agent.output()
    status = agent.status()
    assert status is not None and status["state"] == "revoked"
    assert said in status["last_error"] and status["renewals"] == 0
    # Its key and certificate are left as they were (and no renewal was tried).
    assert {name: (data / name).read_bytes() for name in kept} == files_before
    assert "renewing" not in agent.output()
    shown = agent_cli("status", "--data-dir", str(data))
    assert shown.returncode == 0
    assert "state:" in shown.stdout and "revoked" in shown.stdout and said in shown.stdout

    # It stays stopped: every start says so and exits the same way.
    again = agent_cli("run", "--bundle", str(bundle), "--data-dir", str(data))
    assert again.returncode == EXIT_REVOKED and said in again.stderr
    assert "move it aside" in again.stderr and "Traceback" not in again.stderr


def test_an_agent_revoked_while_stopped_stops_at_its_next_start(
    served: ServerProcess,
    bundle: Path,
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    data = tmp_path / "agent"
    first = agents(data, bundle, "--token", new_token(served))
    serial = first.wait_enrolled()["serial"]
    assert first.stop() == 0
    run_cli("certs", "revoke", serial, data_dir=served.data_dir).check_returncode()

    second = agents(data, bundle)
    assert second.proc.wait(timeout=30) == EXIT_REVOKED, second.output()
    assert f"revoked: re-enroll with a new token (certificate {serial}" in second.output()
    assert second.stop() == EXIT_REVOKED


def test_a_renewal_refused_as_revoked_stops_the_agent(
    server: RunningServer, admin: KeyplaneClient, tmp_path: Path
) -> None:
    bundle = load_bundle(admin.get_init_bundle().SerializeToString())
    data = tmp_path / "agent"
    data.mkdir(mode=0o700)
    stop = threading.Event()
    agent = Agent(data, bundle, "edge-1", 1.0, stop)
    assert agent.enroll(admin.create_enrollment_token().token)
    serial = agent.status()["serial"]
    admin.revoke_certificate(serial, "stolen")

    # Before it follows the trust state that says so, the server's answer to its
    # renewal is enough (the renewal thread's one step, run here).
    agent._renew_once()
    assert stop.is_set()
    assert agent.revoked is not None and serial in agent.revoked
    status = json.loads((data / "status.json").read_text())
    assert status["state"] == "revoked" and status["serial"] == serial
    assert "the renewal was refused: PERMISSION_DENIED" in status["revoked_because"]
    # A new agent over the same dir knows it without asking anyone.
    again = Agent(data, bundle, None, 1.0, threading.Event())
    assert again.revoked == agent.revoked


def test_agent_verify_accepts_a_signed_file_and_rejects_a_tampered_one(
    served: ServerProcess,
    bundle: Path,
    agents: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    data = tmp_path / "agent"
    agent = agents(data, bundle, "--token", new_token(served))
    agent.wait_enrolled()
    message = tmp_path / "policy.json"
    message.write_text('{"allow": ["updates"]}\n')
    run_cli("sign", str(message), data_dir=served.data_dir).check_returncode()
    signature = tmp_path / "policy.json.sig"

    ok = agent_cli("verify", str(message), str(signature), "--data-dir", str(data))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK: signed by ")
    as_json = agent_cli("verify", str(message), str(signature), "--data-dir", str(data), "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["valid"] is True

    message.write_text('{"allow": ["everything"]}\n')
    tampered = agent_cli("verify", str(message), str(signature), "--data-dir", str(data))
    assert tampered.returncode == 1
    assert tampered.stderr.startswith("keyplane: signature rejected: ")
    assert "tampered" in tampered.stderr

    nowhere = agent_cli("verify", str(message), str(signature), "--data-dir", str(tmp_path / "x"))
    assert nowhere.returncode == 2
    assert agent.stop() == 0


def self_signed_set(name: str) -> Issued:
    key_pem, _ = new_key_and_csr(name)
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    serial = f"{cert.serial_number:032x}"
    return Issued(key_pem, pem, pem, serial, now + datetime.timedelta(days=1), now, 0)


def test_an_interrupted_certificate_swap_is_finished_or_dropped_at_start(tmp_path: Path) -> None:
    old, new = self_signed_set("edge-1"), self_signed_set("edge-1")
    save_issued(tmp_path, old)
    staging = tmp_path / ".renewal"

    # Killed after the new set was complete and its key had moved in, before the rest.
    staging.mkdir()
    for name, data in (("key.pem", new.key_pem), ("cert.pem", new.chain_pem)):
        (staging / name).write_bytes(data)
    (staging / "roots.pem").write_bytes(new.roots_pem)
    (staging / "issued.json").write_text(json.dumps(new.issued_json()))
    (staging / "complete").write_bytes(b"")
    os.replace(staging / "key.pem", tmp_path / "key.pem")
    loaded = load_issued(tmp_path)
    assert loaded is not None and loaded.serial == new.serial
    assert loaded.key_pem == new.key_pem and leaf_matches_key(tmp_path)
    assert not staging.exists()

    # Killed while staging, before the set was complete: the current one stays.
    staging.mkdir()
    (staging / "key.pem").write_bytes(old.key_pem)
    loaded = load_issued(tmp_path)
    assert loaded is not None and loaded.serial == new.serial and leaf_matches_key(tmp_path)
    assert not staging.exists()
