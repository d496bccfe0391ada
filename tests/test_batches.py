"""EnrollBatch and SignMessages over real gRPC, and the CLI commands on them: every
item is checked as its single-item RPC checks it, and a refused batch stores and
spends nothing."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from keyplane.clients.client import KeyplaneClient, KeyplaneClientError
from keyplane.clients.trust import follow
from keyplane.clients.verify import MessageVerificationError, verify_message
from tests.serverkit import RunningServer, ServerProcess, openssl_verify, run_cli
from tests.test_enrollment import make_csr, p256, tamper_signature


def _count(server: RunningServer) -> int:
    return len(server.hierarchy.store.certificates("agent", 10000))


def _refused(code: grpc.StatusCode, call: object, *args: object) -> str:
    with pytest.raises(KeyplaneClientError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code == code, caught.value
    return caught.value.message


def test_enroll_batch_issues_one_recorded_certificate_per_csr_in_order(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient, tmp_path: Path
) -> None:
    names = [f"device-{i:03d}" for i in range(40)]
    token = admin.create_enrollment_token(uses=40).token
    issued = anonymous.enroll_batch([make_csr(p256(), cn=n) for n in names], token)
    assert len(issued) == 40
    roots = x509.load_pem_x509_certificates(issued[0].roots_pem.encode())
    recorded = {c.serial for c in admin.list_certificates("agent")}
    for name, one in zip(names, issued, strict=True):
        leaf, intermediate = x509.load_pem_x509_certificates(one.certificate_chain_pem.encode())
        assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name
        assert f"{leaf.serial_number:032x}" == one.serial
        assert one.serial in recorded
        leaf.verify_directly_issued_by(intermediate)
        intermediate.verify_directly_issued_by(roots[0])
    # The token's 40 uses are spent: one more CSR is refused.
    message = _refused(
        grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll_batch, [make_csr(p256())], token
    )
    assert "spent" in message or "uses" in message
    # Every certificate verifies with openssl against the roots.
    for one in issued[::13]:
        result = openssl_verify(tmp_path / one.serial, one.roots_pem, one.certificate_chain_pem)
        assert result.returncode == 0, result.stderr


def test_a_refused_batch_stores_and_spends_nothing(
    server: RunningServer, admin: KeyplaneClient, anonymous: KeyplaneClient
) -> None:
    token = admin.create_enrollment_token(uses=3).token
    good = [make_csr(p256(), cn=f"d{i}") for i in range(3)]
    before = _count(server)

    bad = [good[0], good[1], tamper_signature(good[2])]
    message = _refused(grpc.StatusCode.INVALID_ARGUMENT, anonymous.enroll_batch, bad, token)
    assert message.startswith("csrs[2]: ") and "signature does not verify" in message

    four = [*good, make_csr(p256(), cn="d3")]
    message = _refused(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll_batch, four, token)
    assert "3 uses left" in message and "needs 4" in message

    message = _refused(grpc.StatusCode.INVALID_ARGUMENT, anonymous.enroll_batch, [], token)
    assert "at least one CSR" in message
    message = _refused(
        grpc.StatusCode.INVALID_ARGUMENT, anonymous.enroll_batch, [good[0]] * 1001, token
    )
    assert "at most 1000" in message
    _refused(grpc.StatusCode.UNAUTHENTICATED, anonymous.enroll_batch, good, "kpt_unknown")
    assert _count(server) == before

    # The token still has its three uses.
    assert len(anonymous.enroll_batch(good, token)) == 3
    assert _count(server) == before + 3


def test_sign_messages_gives_one_verifiable_signature_per_payload(
    server: RunningServer, admin: KeyplaneClient
) -> None:
    payloads = [f"message {i}\n".encode() * (i + 1) for i in range(50)] + [b""]
    signed = admin.sign_messages(payloads)
    assert len(signed) == len(payloads)
    trust = follow(None, admin.get_trust_state(0), [server.hierarchy.issuing_root().fingerprint])
    for payload, one in zip(payloads, signed, strict=True):
        verified = verify_message(payload, one, trust)
        assert verified.signer_fingerprint == (
            server.hierarchy.active_key("message_signing").fingerprint
        )
    # Signatures are bound to their own payload.
    with pytest.raises(MessageVerificationError):
        verify_message(payloads[1], signed[0], trust)

    message = _refused(grpc.StatusCode.INVALID_ARGUMENT, admin.sign_messages, [])
    assert "at least one payload" in message
    message = _refused(grpc.StatusCode.INVALID_ARGUMENT, admin.sign_messages, [b"x"] * 1001)
    assert "at most 1000" in message
    message = _refused(
        grpc.StatusCode.INVALID_ARGUMENT, admin.sign_messages, [b"x" * (2 * 1024 * 1024 + 512)] * 2
    )
    assert "together" in message


def test_sign_messages_needs_the_admin_role(
    server: RunningServer, anonymous: KeyplaneClient
) -> None:
    _refused(grpc.StatusCode.UNAUTHENTICATED, anonymous.sign_messages, [b"x"])


def test_cli_signs_many_files_and_issues_certificates_in_bulk(tmp_path: Path) -> None:
    served = ServerProcess(tmp_path / "data")
    try:
        data = served.data_dir
        files = []
        for i in range(5):
            path = tmp_path / f"policy-{i}.json"
            path.write_text(json.dumps({"rule": i}))
            files.append(str(path))
        result = run_cli("sign", *files, "--json", data_dir=data)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert [r["file"] for r in report] == files
        for path in files:
            verified = run_cli("verify", path, path + ".sig", data_dir=data)
            assert verified.returncode == 0, verified.stderr
        refused = run_cli("sign", *files, "--out", str(tmp_path / "x.sig"), data_dir=data)
        assert refused.returncode != 0 and "--out names one signature file" in refused.stderr

        token = json.loads(
            run_cli("tokens", "create", "--uses", "3", "--json", data_dir=data, check=True).stdout
        )["token"]
        csrs = []
        for i in range(3):
            path = tmp_path / "csrs" / f"sensor-{i}.csr"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(make_csr(p256(), cn=f"sensor-{i}"))
            csrs.append(str(path))
        out = tmp_path / "issued"
        result = run_cli(
            "certs",
            "issue",
            *csrs,
            "--token",
            token,
            "--out-dir",
            str(out),
            "--json",
            data_dir=data,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert len(report["certificates"]) == 3
        roots = x509.load_pem_x509_certificates((out / "roots.pem").read_bytes())
        for i in range(3):
            leaf, intermediate = x509.load_pem_x509_certificates(
                (out / f"sensor-{i}.crt").read_bytes()
            )
            assert f"CN=sensor-{i}" in leaf.subject.rfc4514_string()
            intermediate.verify_directly_issued_by(roots[0])
        # The token is spent: the next run fails with the server's reason, writes nothing.
        again = run_cli("certs", "issue", csrs[0], "--token", token, data_dir=data)
        assert again.returncode == 1
        assert "UNAUTHENTICATED" in again.stderr
        # More CSRs than one call takes: written call by call, so when the token runs
        # out in the second call, the first call's 1,000 certificates are on disk.
        many = tmp_path / "many"
        many.mkdir()
        for i in range(1001):  # a key per CSR: a key is certified once
            (many / f"m{i:04d}.csr").write_bytes(make_csr(p256(), cn=f"m{i:04d}"))
        token = json.loads(
            run_cli(
                "tokens", "create", "--uses", "1000", "--json", data_dir=data, check=True
            ).stdout
        )["token"]
        paths = sorted(str(p) for p in many.glob("*.csr"))
        result = run_cli("certs", "issue", *paths, "--token", token, data_dir=data)
        assert result.returncode == 1
        assert "1000 certificates were issued and written" in result.stderr
        assert len(list(many.glob("*.crt"))) == 1000
        assert not (many / "m1000.crt").exists()
        help_text = run_cli("certs", "issue", "--help", data_dir=data).stdout
        assert "EnrollBatch" in help_text and "--token" in help_text
    finally:
        assert served.stop() == 0
