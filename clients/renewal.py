"""The proof a component signs to renew with RenewWithProof: its current key's signature
over a fixed context and the CSR bytes, so the request authenticates itself over any
connection."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

# Must match the server's RENEWAL_PROOF_CONTEXT (keyplane.server.domain.enrollment).
RENEWAL_PROOF_CONTEXT = b"keyplane-renew-v1\0"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def renewal_proof(current_key: SigningKey, csr: bytes) -> bytes:
    """Sign RENEWAL_PROOF_CONTEXT + `csr` (the bytes sent) with the current key: ECDSA
    with SHA-256 (SHA-384 for P-384), RSA PKCS#1 v1.5 with SHA-256, or Ed25519."""
    message = RENEWAL_PROOF_CONTEXT + csr
    if isinstance(current_key, ec.EllipticCurvePrivateKey):
        digest = hashes.SHA384() if current_key.curve.name == "secp384r1" else hashes.SHA256()
        return current_key.sign(message, ec.ECDSA(digest))
    if isinstance(current_key, rsa.RSAPrivateKey):
        return current_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return current_key.sign(message)
