"""Pre-generated P-256 keys and CSRs (made before any timing starts, on every core)."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import default_signals
from keyplane.clients.renewal import renewal_proof


@dataclass(frozen=True)
class ClientKeys:
    """One simulated client: its name, a CSR to enroll with, and for renewal the key that
    CSR certifies (PEM, for mutual TLS), a CSR for a second, new key, and the first key's
    proof over that CSR (for RenewWithProof)."""

    name: str
    csr_pem: bytes
    key_pem: bytes = b""
    renew_csr_pem: bytes = b""
    renew_proof: bytes = b""


def _csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _make(job: tuple[str, bool]) -> ClientKeys:
    name, renewable = job
    key = ec.generate_private_key(ec.SECP256R1())
    if not renewable:
        return ClientKeys(name, _csr(key, name))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    renew_key = ec.generate_private_key(ec.SECP256R1())
    renew_csr = _csr(renew_key, name)
    return ClientKeys(name, _csr(key, name), key_pem, renew_csr, renewal_proof(key, renew_csr))


def make_clients(prefix: str, count: int, renewable: bool = False) -> list[ClientKeys]:
    """`count` clients named `<prefix>-<i>`, each with its own key(s), on every core."""
    jobs = [(f"{prefix}-{i}", renewable) for i in range(count)]
    if count < 256:
        return [_make(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1, default_signals) as pool:
        return pool.map(_make, jobs, chunksize=256)
