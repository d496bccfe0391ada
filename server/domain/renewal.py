"""Renewal rules, one copy for the server and every zone server: who may renew, what a
renewal proof binds, and what a renewed certificate must keep or change.

RenewWithProof carries the current certificate and a proof by its key over

    "keyplane-renew-v2\\0" || SHA-256(current certificate DER) || SHA-256(CSR bytes)
        || SHA-256(audience) || proof time (8 bytes, big-endian Unix seconds)

where the audience is the name of the server or zone server the request is sent to
(its `name` in the init bundle). So a recorded request cannot be replayed for another
certificate, another CSR, at another server, or later than PROOF_WINDOW from its time;
and since a certificate renews once, not at all after its renewal went through.
"""

from __future__ import annotations

import datetime
import hashlib
import struct

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from keyplane.plugins.keys import fingerprint
from keyplane.server.domain import authority
from keyplane.server.domain.csr_policy import SubjectKey
from keyplane.server.domain.der import UNPARSED
from keyplane.server.domain.identity import Identity
from keyplane.server.errors import InvalidArgument, Unauthenticated

RENEWAL_PROOF_CONTEXT = b"keyplane-renew-v2\0"
MAX_CHAIN_BYTES = 64 * 1024
# How far a proof's time may be from the verifier's clock, either way: room for clock
# skew and for a client that made its proof a little before sending it.
PROOF_WINDOW = datetime.timedelta(minutes=15)
# A zone server renews its intermediate and its TLS certificate (together) once either
# has less than this share of its lifetime left; the renewal forecast assumes the same.
ZONE_RENEW_AT_REMAINING = 0.1


def renewal_message(certificate_der: bytes, csr: bytes, audience: str, proof_time: int) -> bytes:
    """What a renewal proof signs (see the module docstring)."""
    return (
        RENEWAL_PROOF_CONTEXT
        + hashlib.sha256(certificate_der).digest()
        + hashlib.sha256(csr).digest()
        + hashlib.sha256(audience.encode()).digest()
        + struct.pack(">q", proof_time)
    )


def presented_certificate(chain_pem: bytes) -> x509.Certificate:
    """The leaf of a certificate chain sent in a request (RenewWithProof)."""
    if not chain_pem:
        raise Unauthenticated("RenewWithProof needs the current certificate chain (PEM)")
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise InvalidArgument(f"the certificate chain is over {MAX_CHAIN_BYTES} bytes")
    try:
        return x509.load_pem_x509_certificates(chain_pem)[0]
    except UNPARSED:
        raise InvalidArgument("the certificate chain is not PEM certificates") from None


def check_renewal_proof(
    cert: x509.Certificate,
    csr: bytes,
    proof: bytes,
    audience: str,
    proof_time: int,
    now: datetime.datetime,
) -> None:
    """That `proof` is the certificate key's signature over renewal_message(...) made
    within PROOF_WINDOW of `now`: ECDSA with SHA-256 (SHA-384 for P-384), RSA PKCS#1
    v1.5 with SHA-256, or Ed25519. UNAUTHENTICATED otherwise."""
    # Compared as seconds: a time past year 9999 (an int64 allows it) has no datetime.
    if proof_time <= 0 or abs(proof_time - now.timestamp()) > PROOF_WINDOW.total_seconds():
        raise Unauthenticated(
            "the renewal proof's time is missing or more than "
            f"{int(PROOF_WINDOW.total_seconds() // 60)} minutes from the server's clock; "
            "make a fresh proof (and check the client's clock)"
        )
    try:
        key = cert.public_key()
    except UNPARSED:
        raise InvalidArgument("the certificate's public key does not parse") from None
    message = renewal_message(
        cert.public_bytes(serialization.Encoding.DER), csr, audience, proof_time
    )
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            digest = hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256()
            key.verify(proof, message, ec.ECDSA(digest))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(proof, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(proof, message)
        else:
            raise Unauthenticated("the certificate's key type cannot sign a renewal proof")
    except InvalidSignature:
        raise Unauthenticated(
            "the renewal proof does not verify with the certificate's key: sign "
            "'keyplane-renew-v2\\0' || SHA-256(certificate DER) || SHA-256(CSR) || "
            f"SHA-256({audience!r}) || the proof time, with the current key "
            "(keyplane.clients.renewal.renewal_proof does)"
        ) from None


def check_renewal(identity: Identity, key: SubjectKey, common_name: str) -> None:
    """What every renewal must be, wherever it is made: by an agent, for the same name,
    for a new key."""
    authority.check_may_renew(identity.roles)
    if common_name != identity.common_name:
        raise InvalidArgument(
            f"the CSR's common name {common_name!r} differs from the certificate's "
            f"{identity.common_name!r}; renew keeps the same name"
        )
    current = identity.certificate.public_key()
    if fingerprint(key) == fingerprint(current):  # type: ignore[arg-type]
        raise InvalidArgument("renewal needs a new key; the CSR reuses the current one")
