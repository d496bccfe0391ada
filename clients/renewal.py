"""The proof a component signs to renew with RenewWithProof: its current key's signature
over what the renewal is (the current certificate, the new CSR, the server it is sent
to and the moment), so the request authenticates itself over any connection and cannot
be replayed for another certificate, another CSR, at another server, or much later."""

from __future__ import annotations

import hashlib
import struct
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

# Must match the server's RENEWAL_PROOF_CONTEXT (keyplane.server.domain.renewal).
RENEWAL_PROOF_CONTEXT = b"keyplane-renew-v2\0"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def renewal_message(certificate_der: bytes, csr: bytes, audience: str, proof_time: int) -> bytes:
    """RENEWAL_PROOF_CONTEXT || SHA-256(certificate DER) || SHA-256(CSR) ||
    SHA-256(audience) || proof time (8 bytes, big-endian Unix seconds)."""
    return (
        RENEWAL_PROOF_CONTEXT
        + hashlib.sha256(certificate_der).digest()
        + hashlib.sha256(csr).digest()
        + hashlib.sha256(audience.encode()).digest()
        + struct.pack(">q", proof_time)
    )


def renewal_proof(
    current_key: SigningKey,
    certificate: x509.Certificate | bytes,
    csr: bytes,
    audience: str,
    proof_time: int | None = None,
) -> tuple[bytes, int]:
    """(proof, proof time) for renewing `certificate` (the current one, an object or
    DER) with `csr` (the bytes sent) at the server or zone server named `audience` (its
    name in the init bundle): ECDSA with SHA-256 (SHA-384 for P-384), RSA PKCS#1 v1.5
    with SHA-256, or Ed25519, by the current key."""
    der = (
        certificate
        if isinstance(certificate, bytes)
        else certificate.public_bytes(serialization.Encoding.DER)
    )
    when = int(time.time()) if proof_time is None else proof_time
    message = renewal_message(der, csr, audience, when)
    if isinstance(current_key, ec.EllipticCurvePrivateKey):
        digest = hashes.SHA384() if current_key.curve.name == "secp384r1" else hashes.SHA256()
        return current_key.sign(message, ec.ECDSA(digest)), when
    if isinstance(current_key, rsa.RSAPrivateKey):
        return current_key.sign(message, padding.PKCS1v15(), hashes.SHA256()), when
    return current_key.sign(message), when
