"""Helpers for the CRL tests: plain HTTP to a CRL listener, CRLs parsed, and
`openssl verify -crl_check` of a chain with the CRLs fetched or downloaded."""

from __future__ import annotations

import datetime
import http.client
import subprocess
from pathlib import Path

from cryptography import x509

from keyplane.server.config import parse_address


def request(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 request to HOST:PORT."""
    host, port = parse_address(address, "address")
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def raw(address: str, data: bytes) -> bytes:
    """What the listener answers to `data` sent as is (up to 64 KiB of it)."""
    import socket

    host, port = parse_address(address, "address")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def fetch_crl(address: str, issuer_fingerprint: str) -> x509.CertificateRevocationList:
    status, headers, body = request(address, "GET", f"/crl/{issuer_fingerprint}.crl")
    assert status == 200, (status, body)
    assert headers["Content-Type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(body)


def number_of(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def serials_of(crl: x509.CertificateRevocationList) -> set[str]:
    return {f"{r.serial_number:032x}" for r in crl}


def reason_of(crl: x509.CertificateRevocationList, serial: str) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None, serial
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def distribution_point(cert: x509.Certificate) -> str | None:
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return None
    names = points[0].full_name or []
    return str(names[0].value) if names else None


def pem_blocks(chain_pem: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [b.strip() + "\n" + end + "\n" for b in chain_pem.split(end) if "BEGIN" in b]


def verify(
    workdir: Path,
    roots_pem: str,
    chain_pem: str,
    crls: list[x509.CertificateRevocationList] | None = None,
    download: bool = False,
    check_all: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`openssl verify -x509_strict -purpose sslclient -crl_check[_all]` of a chain (leaf
    first), with the given CRLs (-CRLfile) and/or -crl_download (from each certificate's
    distribution point)."""
    from cryptography.hazmat.primitives import serialization

    workdir.mkdir(parents=True, exist_ok=True)
    blocks = pem_blocks(chain_pem)
    (workdir / "roots.pem").write_text(roots_pem)
    (workdir / "leaf.pem").write_text(blocks[0])
    (workdir / "untrusted.pem").write_text("".join(blocks[1:]))
    args = ["openssl", "verify", "-x509_strict", "-purpose", "sslclient"]
    args += ["-crl_check_all" if check_all else "-crl_check"]
    args += ["-CAfile", str(workdir / "roots.pem")]
    if len(blocks) > 1:
        args += ["-untrusted", str(workdir / "untrusted.pem")]
    if crls:
        path = workdir / "crls.pem"
        path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
        args += ["-CRLfile", str(path)]
    if download:
        args += ["-crl_download"]
    args.append(str(workdir / "leaf.pem"))
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)


def near(moment: datetime.datetime, seconds: float = 120) -> bool:
    return abs((moment - datetime.datetime.now(datetime.UTC)).total_seconds()) < seconds
