"""Pre-generated P-256 keys and CSRs (made before any timing starts, on every core).

The server certifies a key once (a CSR for a key that holds or ever held a certificate
gets ALREADY_EXISTS), so every CSR a row sends to keyplane is for a fresh key, used once:
`make_csrs` makes as many as a row's windows can spend. A renewal proof binds the current
certificate, so `make_renewals` runs after enrollment: a new key, its CSR and the old
key's proof over it, per client."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import default_signals
from keyplane.clients.renewal import renewal_proof

# Below this many jobs, one process does them (a pool costs more than it saves).
_POOL_FROM = 256
_CHUNK = 256

Job = TypeVar("Job")
Made = TypeVar("Made")


@dataclass(frozen=True)
class ClientKeys:
    """One simulated client: its name, a CSR to enroll with and, when it will renew, the
    key that CSR certifies (PKCS#8 PEM: for mutual TLS and the renewal proof)."""

    name: str
    csr_pem: bytes
    key_pem: bytes = b""


@dataclass(frozen=True)
class Renewal:
    """What one client sends to renew, made after it enrolled: a CSR for a new key and,
    for RenewWithProof, the current key's v2 proof over it and the proof's time."""

    csr_pem: bytes
    proof: bytes = b""
    proof_time: int = 0


def _csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _on_every_core(
    work: Callable[[Job], Made], jobs: Sequence[Job], start: str = "fork"
) -> list[Made]:
    """`work` over `jobs` in a process per core, started by `start` ("fork", or "spawn"
    when the caller has gRPC channels open: a forked child that drops the parent's gRPC
    objects can spin forever)."""
    if len(jobs) < _POOL_FROM:
        return [work(job) for job in jobs]
    with multiprocessing.get_context(start).Pool(os.cpu_count() or 1, default_signals) as pool:
        return pool.map(work, jobs, chunksize=_CHUNK)


def _make_csr(name: str) -> bytes:
    return _csr(ec.generate_private_key(ec.SECP256R1()), name)


def make_csrs(prefix: str, count: int) -> list[bytes]:
    """`count` CSRs named `<prefix>-<i>`, each for a key of its own, on every core."""
    return _on_every_core(_make_csr, [f"{prefix}-{i}" for i in range(count)])


def _make_client(job: tuple[str, bool]) -> ClientKeys:
    name, with_key = job
    key = ec.generate_private_key(ec.SECP256R1())
    if not with_key:
        return ClientKeys(name, _csr(key, name))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ClientKeys(name, _csr(key, name), key_pem)


def make_clients(prefix: str, count: int, with_key: bool = False) -> list[ClientKeys]:
    """`count` clients named `<prefix>-<i>`, each with its own key, on every core; with
    `with_key`, the key comes along (for renewing later)."""
    return _on_every_core(_make_client, [(f"{prefix}-{i}", with_key) for i in range(count)])


def _make_renewal(job: tuple[str, bytes, bytes, str, int]) -> Renewal:
    name, key_pem, chain_pem, audience, proof_time = job
    renew_csr = _make_csr(name)
    if not audience:
        return Renewal(renew_csr)
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # made by _make_client
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    proof, when = renewal_proof(key, leaf, renew_csr, audience, proof_time or None)
    return Renewal(renew_csr, proof, when)


def make_renewals(
    clients: Sequence[ClientKeys],
    chains: Sequence[bytes],
    audience: str = "",
    proof_time: int = 0,
) -> list[Renewal]:
    """For each enrolled client (its certificate chain in `chains`), a CSR for a new key
    and, with an `audience` (the name of the server or zone server it renews at), the
    current key's proof over that CSR (renewal_proof v2) dated `proof_time` (Unix
    seconds; 0: when it is made); on every core, in spawned processes (the caller is
    in the middle of its gRPC calls)."""
    jobs = [
        (c.name, c.key_pem, chain, audience, proof_time)
        for c, chain in zip(clients, chains, strict=True)
    ]
    return _on_every_core(_make_renewal, jobs, "spawn")
