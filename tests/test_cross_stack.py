"""Every kind of certificate keyplane issues, read and verified by the stacks its users
run: OpenSSL (`openssl verify -x509_strict` with the right purpose), Go's crypto/x509 (a
small program, as Kubernetes, Vault, step and cfssl would parse and verify), NSS
(`certutil -V`, as Firefox and NSS-based services would) and cryptography's verifier;
plus TLS handshakes with plain `openssl s_client` and `s_server`, both ways."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.verification import PolicyBuilder, Store

from keyplane.clients.client import KeyplaneClient
from keyplane.server.domain import authority, certs
from keyplane.server.kinds import KeyKind
from tests.serverkit import FQDN, RunningServer, running_server
from tests.test_enrollment import make_csr, p256
from tests.zonekit import enroll_fake_zone, key_pem

HERE = Path(__file__).resolve().parent
TOOLS = {
    "openssl": "openssl",
    "go": "golang-go",
    "certutil": "libnss3-tools",
    "cfssl": "golang-cfssl",
}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed ({TOOLS[name]}); make test installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(f"{message} (skipped as CI is not 'true'; under CI=true this fails)")
    return found


@dataclass
class Kind:
    """One kind of certificate, with its chain and what it is for."""

    name: str
    leaf: x509.Certificate
    intermediates: list[x509.Certificate]
    usage: str  # server, client, ca, documentsigning
    dns: str | None = None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _chain(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


@pytest.fixture(scope="module")
def go_verify(tmp_path_factory: pytest.TempPathFactory) -> str:
    go = _tool("go")
    work = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GOPATH": str(work / "path")}
    binary = work / "verify"
    subprocess.run(
        [go, "build", "-o", str(binary), str(HERE / "crossstack" / "verify.go")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
        cwd=work,
    )
    return str(binary)


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, list[Kind]]]:
    with running_server(tmp_path_factory.mktemp("stacks") / "data") as server:
        h = server.hierarchy
        root = certs.load_pem(h.issuing_root().certificate_pem)
        roots_pem = (server.admin_dir / "ca.pem").read_bytes()
        kinds = [Kind("root", root, [], "ca")]
        server_tls = certs.load_pem(h.active_key(KeyKind.SERVER_TLS).certificate_pem)
        kinds.append(Kind("server TLS", server_tls, [], "server", FQDN))
        intermediate = certs.load_pem(h.active_key(KeyKind.INTERMEDIATE_TLS).certificate_pem)
        kinds.append(Kind("intermediate", intermediate, [], "ca"))
        signing = certs.load_pem(h.active_key(KeyKind.MESSAGE_SIGNING).certificate_pem)
        kinds.append(Kind("message signing", signing, [], "documentsigning"))
        with server.admin_client() as admin:
            token = admin.create_enrollment_token(uses=2).token
            zone_token = admin.create_enrollment_token(role="zone-server").token
            for role in ("operator", "auditor"):
                key = p256()
                made = admin.create_identity(f"{role}-1", role, make_csr(key, cn=f"{role}-1"))
                kinds.append(Kind(role, _chain(made.certificate_pem)[0], [], "client"))
        with KeyplaneClient(server.bootstrap_channel()) as anonymous:
            for cn in ("meter-1", "web01.corp.example.com"):
                agent = anonymous.enroll(make_csr(p256(), cn=cn), token)
                leaf, inter = _chain(agent.certificate_chain_pem)
                kinds.append(Kind(f"agent {cn}", leaf, [inter], "client"))
        admin_cert = x509.load_pem_x509_certificate((server.admin_dir / "admin.pem").read_bytes())
        kinds.append(Kind("admin", admin_cert, [], "client"))
        zone = enroll_fake_zone(server.bootstrap, roots_pem, zone_token, "zone1")
        kinds.append(Kind("zone intermediate", zone.intermediate, [], "ca"))
        zone_tls = _chain(zone.tls_chain_pem)[0]
        kinds.append(Kind("zone server TLS", zone_tls, [], "server", "zone1"))
        kinds.append(Kind("zone server as a client", zone_tls, [], "client"))
        # An agent certificate as zone servers issue it (zone/issuing.py does the same).
        now = datetime.datetime.now(datetime.UTC)
        for cn in ("meter-2", "host.example.com"):
            zone_agent = certs.build_client_certificate(
                zone.intermediate_key,
                zone.intermediate,
                p256().public_key(),
                cn,
                "agent",
                now,
                datetime.timedelta(hours=4),
                names=[authority.AGENT_DNS_NAME],
            )
            kinds.append(Kind(f"zone agent {cn}", zone_agent, [zone.intermediate], "client"))
        server.extra = {"roots": roots_pem, "zone_tls_key": key_pem(zone.tls_key), "zone": zone}  # type: ignore[attr-defined]
        yield server, kinds


def _files(work: Path, roots: bytes, kind: Kind) -> tuple[Path, Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "roots.pem").write_bytes(roots)
    (work / "inter.pem").write_bytes(b"".join(_pem(c) for c in kind.intermediates))
    (work / "leaf.pem").write_bytes(_pem(kind.leaf))
    return work / "roots.pem", work / "inter.pem", work / "leaf.pem"


OPENSSL_PURPOSE = {"server": "sslserver", "client": "sslclient", "ca": "any"}


def test_openssl_verifies_every_kind(
    issued: tuple[RunningServer, list[Kind]], tmp_path: Path
) -> None:
    server, kinds = issued
    openssl = _tool("openssl")
    for kind in kinds:
        roots, inter, leaf = _files(
            tmp_path / kind.name.replace(" ", "_"), server.extra["roots"], kind
        )  # type: ignore[attr-defined]
        purpose = OPENSSL_PURPOSE.get(kind.usage, "any")
        args = [openssl, "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(roots)]
        if kind.intermediates:
            args += ["-untrusted", str(inter)]
        if kind.dns:
            args += ["-verify_hostname", kind.dns]
        result = subprocess.run([*args, str(leaf)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (kind.name, result.stdout, result.stderr)


def test_go_parses_and_verifies_every_kind(
    issued: tuple[RunningServer, list[Kind]], go_verify: str, tmp_path: Path
) -> None:
    server, kinds = issued
    for kind in kinds:
        roots, inter, leaf = _files(
            tmp_path / kind.name.replace(" ", "_"), server.extra["roots"], kind
        )  # type: ignore[attr-defined]
        args = [go_verify, str(roots), str(inter), str(leaf), kind.usage]
        if kind.dns:
            args.append(kind.dns)
        result = subprocess.run(args, capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "OK", (kind.name, result.stdout)


def test_nss_verifies_every_kind(issued: tuple[RunningServer, list[Kind]], tmp_path: Path) -> None:
    server, kinds = issued
    certutil = _tool("certutil")
    db = f"sql:{tmp_path / 'nssdb'}"
    (tmp_path / "nssdb").mkdir()
    subprocess.run([certutil, "-N", "-d", db, "--empty-password"], check=True, timeout=30)
    nicks: dict[bytes, str] = {}  # NSS keeps a certificate once, under its first name

    def add(cert: x509.Certificate, nick: str, trust: str) -> str:
        der = certs.to_der(cert)
        if der not in nicks:
            path = tmp_path / f"{nick}.pem"
            path.write_bytes(_pem(cert))
            add_args = ["-A", "-d", db, "-n", nick, "-t", trust, "-a", "-i", str(path)]
            subprocess.run([certutil, *add_args], check=True, timeout=30)
            nicks[der] = nick
        return nicks[der]

    for i, root in enumerate(x509.load_pem_x509_certificates(server.extra["roots"])):  # type: ignore[attr-defined]
        add(root, f"root{i}", "CT,C,C")  # a CA trusted for server and client certificates
    for n, kind in enumerate(kinds):
        for j, inter in enumerate(kind.intermediates):
            add(inter, f"i{n}-{j}", ",,")
        nick = add(kind.leaf, f"leaf{n}", ",,")
        if kind.usage == "documentsigning":
            # NSS has no usage for document signing: it must parse it (naming the EKU)
            # and chain it to the root.
            shown = subprocess.run(
                [certutil, "-L", "-d", db, "-n", nick], capture_output=True, text=True
            )
            assert shown.returncode == 0 and "1.3.6.1.5.5.7.3.36" in shown.stdout, shown
            chain = subprocess.run(
                [certutil, "-O", "-d", db, "-n", nick], capture_output=True, text=True
            )
            assert chain.returncode == 0 and "Root 0" in chain.stdout, chain
            continue
        usage = {"server": "V", "client": "C", "ca": "L"}[kind.usage]
        result = subprocess.run(
            [certutil, "-V", "-d", db, "-n", nick, "-u", usage],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0 and "is valid" in result.stdout, (kind.name, result)


def test_cryptography_verifies_every_kind(issued: tuple[RunningServer, list[Kind]]) -> None:
    server, kinds = issued
    store = Store(x509.load_pem_x509_certificates(server.extra["roots"]))  # type: ignore[attr-defined]
    for kind in kinds:
        if kind.usage == "client":
            PolicyBuilder().store(store).build_client_verifier().verify(
                kind.leaf, kind.intermediates
            )
        elif kind.usage == "server":
            verifier = (
                PolicyBuilder().store(store).build_server_verifier(x509.DNSName(kind.dns or ""))
            )
            verifier.verify(kind.leaf, kind.intermediates)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_openssl_tls_both_ways_with_keyplane_certificates(
    issued: tuple[RunningServer, list[Kind]], tmp_path: Path
) -> None:
    """openssl s_client presents an agent certificate to keyplane's own mutual-TLS
    listener; openssl s_server serves a zone server's certificate and requires a client
    certificate, which an agent certificate passes."""
    server, _ = issued
    openssl = _tool("openssl")
    roots = tmp_path / "roots.pem"
    roots.write_bytes(server.extra["roots"])  # type: ignore[attr-defined]
    with server.admin_client() as admin:
        token = admin.create_enrollment_token().token
    key = p256()
    with KeyplaneClient(server.bootstrap_channel()) as anonymous:
        agent = anonymous.enroll(make_csr(key, cn="tls-agent"), token)
    (tmp_path / "agent.pem").write_text(agent.certificate_chain_pem)
    (tmp_path / "agent.key").write_bytes(key_pem(key))
    host, _, port = server.listen.rpartition(":")
    client = subprocess.run(
        [openssl, "s_client", "-connect", f"{host}:{port}", "-cert", str(tmp_path / "agent.pem"),
         "-cert_chain", str(tmp_path / "agent.pem"), "-key", str(tmp_path / "agent.key"),
         "-CAfile", str(roots), "-verify_return_error", "-verify_ip", "127.0.0.1",
         "-alpn", "h2"],
        # s_client prints what the server sends after the handshake: HTTP/2 frames
        # (a PING's payload is random bytes), not text.
        input="", capture_output=True, text=True, errors="replace", timeout=30,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in client.stdout, client.stdout + client.stderr
    # openssl as the server: a zone server's certificate, client certificates required.
    zone = server.extra["zone"]  # type: ignore[attr-defined]
    (tmp_path / "zone.pem").write_text(zone.tls_chain_pem)
    (tmp_path / "zone.key").write_bytes(server.extra["zone_tls_key"])  # type: ignore[attr-defined]
    port = _free_port()
    s_server = subprocess.Popen(
        [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(tmp_path / "zone.pem"),
         "-key", str(tmp_path / "zone.key"), "-CAfile", str(roots), "-Verify", "2",
         "-verify_return_error", "-naccept", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert s_server.stdout is not None
        seen = ""
        while "ACCEPT" not in seen:  # it says so once it listens
            line = s_server.stdout.readline()
            assert line, seen
            seen += line
        client = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-cert",
             str(tmp_path / "agent.pem"), "-cert_chain", str(tmp_path / "agent.pem"), "-key",
             str(tmp_path / "agent.key"), "-CAfile", str(roots), "-verify_return_error",
             "-verify_hostname", "zone1"],
            input="", capture_output=True, text=True, errors="replace", timeout=30,
        )  # fmt: skip
        assert "Verify return code: 0 (ok)" in client.stdout, client.stdout + client.stderr
        out, _ = s_server.communicate(timeout=30)
        assert "verify error" not in out and "tls-agent" in out, out
    finally:
        if s_server.poll() is None:
            s_server.kill()


def test_go_refuses_the_old_message_signing_eku_and_cfssl_reads_the_new(
    issued: tuple[RunningServer, list[Kind]], go_verify: str, tmp_path: Path
) -> None:
    """Why the EKU changed: Go cannot even parse a certificate with keyplane's first EKU
    (an OID arc wider than 64 bits); `cfssl certinfo` reads today's."""
    _, kinds = issued
    signing = next(k for k in kinds if k.usage == "documentsigning")
    key = p256()
    now = datetime.datetime.now(datetime.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(signing.leaf.subject)
        .issuer_name(signing.leaf.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([certs.LEGACY_MESSAGE_SIGNING_EKU]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "old.pem").write_bytes(_pem(old))
    (tmp_path / "empty.pem").write_bytes(b"")
    result = subprocess.run(
        [go_verify, str(tmp_path / "old.pem"), str(tmp_path / "empty.pem"),
         str(tmp_path / "old.pem"), "parse"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "invalid extended key usages" in result.stdout, result.stdout
    cfssl = _tool("cfssl")
    (tmp_path / "signing.pem").write_bytes(_pem(signing.leaf))
    info = subprocess.run(
        [cfssl, "certinfo", "-cert", str(tmp_path / "signing.pem")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert info.returncode == 0 and '"serial_number"' in info.stdout, info.stderr
