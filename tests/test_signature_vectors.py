"""Known-answer vectors (tests/sigkit.py) through the signature checks keyplane makes
itself: a CSR's proof of possession (csr_policy.check_request), a renewal proof
(renewal.check_renewal_proof), and message and trust-state verification
(clients.trust.verify_signature, clients.verify.verify_message, and the server's copy
for peers, peer_messages.verify_with). For each key kind keyplane accepts, the valid
signature passes and every invalid one is refused with the check's own status.

High-S: ECDSA accepts (r, n - s) as well as (r, s), and so does every check here. It
does not matter where keyplane checks: a renewal is refused by the certificate it
renews (renews once, a replay ALREADY_EXISTS), not by its proof's bytes, and nothing
keys on a signature's bytes (tests/hostile_rows.py replays a renewal with its proof's
s negated and gets the same refusal)."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from fuzz.harness import CORPUS, FIXTURES, PAYLOAD
from keyplane.clients.trust import load, verify_signature
from keyplane.clients.verify import MESSAGE_CONTEXT, MessageVerificationError, verify_message
from keyplane.server.domain import der
from keyplane.server.domain.csr_policy import check_request, parse_csr
from keyplane.server.domain.peer_messages import verify_with
from keyplane.server.domain.renewal import check_renewal_proof, renewal_message
from keyplane.server.errors import InvalidArgument, Unauthenticated
from keyplane.v1 import message_signing_service_pb2
from tests.sigkit import SigningKey, Vectors, ecdsa_damage, high_s, keys, vectors

KEYS = keys()
AUDIENCE = "pki.test"
NOW = datetime.datetime.now(datetime.UTC)


def _certificate(key: SigningKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-v")])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(hours=1))
        .sign(key, algorithm)
    )


def _csr(key: SigningKey) -> bytes:
    """Signed with the hash keyplane_sign uses for the key (SHA-384 for P-384)."""
    algorithm: hashes.HashAlgorithm | None = hashes.SHA256()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = None
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        algorithm = hashes.SHA384()
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-v")]))
        .sign(key, algorithm)
        .public_bytes(serialization.Encoding.DER)
    )


# -- renewal proofs ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(KEYS))
def renewal(request: pytest.FixtureRequest) -> tuple[x509.Certificate, bytes, int, Vectors]:
    key = KEYS[request.param]
    cert = _certificate(key)
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    made = int(NOW.timestamp())
    message = renewal_message(cert.public_bytes(serialization.Encoding.DER), csr, AUDIENCE, made)
    return cert, csr, made, vectors(key, message)


def test_every_invalid_renewal_proof_is_unauthenticated(
    renewal: tuple[x509.Certificate, bytes, int, Vectors],
) -> None:
    cert, csr, made, v = renewal
    check_renewal_proof(cert, csr, v.valid, AUDIENCE, made, NOW)
    accepted = []
    for what, proof in v.invalid.items():
        try:
            check_renewal_proof(cert, csr, proof, AUDIENCE, made, NOW)
        except Unauthenticated:
            continue
        accepted.append(what)
    assert not accepted, f"accepted as a renewal proof: {accepted}"
    assert len(v.invalid) > 500  # every bit of the signature, and the named cases
    for proof in v.malleable.values():  # high-S: valid, see the module docstring
        check_renewal_proof(cert, csr, proof, AUDIENCE, made, NOW)


def test_a_proof_for_another_audience_or_time_is_unauthenticated(
    renewal: tuple[x509.Certificate, bytes, int, Vectors],
) -> None:
    cert, csr, made, v = renewal
    with pytest.raises(Unauthenticated):
        check_renewal_proof(cert, csr, v.valid, "zone-h", made, NOW)
    with pytest.raises(Unauthenticated):
        check_renewal_proof(cert, csr, v.valid, AUDIENCE, made + 1, NOW)
    with pytest.raises(Unauthenticated):
        check_renewal_proof(cert, csr + b"\x00", v.valid, AUDIENCE, made, NOW)


# -- CSR signatures (proof of possession) -------------------------------------------------


def _with_signature(csr: bytes, signature: bytes, algorithm: bytes | None = None) -> bytes:
    _, outer, end = der.read(csr)
    (_, i0, i1), (_, a0, a1), _ = der.children(csr, outer, end)
    return der.sequence(csr[i0:i1], algorithm or csr[a0:a1], der.bit_string(signature))


@pytest.mark.parametrize("kind", list(KEYS))
def test_every_invalid_csr_signature_is_invalid_argument(kind: str) -> None:
    key = KEYS[kind]
    csr = _csr(key)
    _, outer, end = der.read(csr)
    (_, i0, i1), _, (_, s0, s1) = der.children(csr, outer, end)
    _, bits, _ = der.read(csr, s0)
    assert _with_signature(csr, csr[bits + 1 : s1]) == csr  # the rebuild is exact
    v = vectors(key, csr[i0:i1])
    check_request(parse_csr(_with_signature(csr, v.valid)))
    cases = dict(v.invalid)
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        # The algorithm says SHA-512 over a SHA-256 signature.
        sha512 = (
            der.sequence(der.oid("1.2.840.10045.4.3.4"))
            if isinstance(key, ec.EllipticCurvePrivateKey)
            else der.sequence(der.oid("1.2.840.113549.1.1.13"), b"\x05\x00")
        )
        cases["the algorithm names another hash"] = _with_signature(csr, v.valid, sha512)
    accepted = []
    for what, signature in cases.items():
        damaged = signature if what == "the algorithm names another hash" else None
        try:
            check_request(parse_csr(damaged or _with_signature(csr, signature)))
        except InvalidArgument as exc:
            assert "signature" in str(exc) or "parse" in str(exc), (what, exc)
            continue
        accepted.append(what)
    assert not accepted, f"accepted as a CSR signature: {accepted}"
    for signature in v.malleable.values():
        check_request(parse_csr(_with_signature(csr, signature)))


# -- message and trust-state verification ---------------------------------------------------


@pytest.mark.parametrize("kind", ["P-256", "P-384", "RSA-2048"])
def test_every_invalid_signature_fails_verification_on_both_sides(kind: str) -> None:
    """The client's verify_signature (messages, trust states) and the server's copy for
    peers (verify_with) give the same answers. Ed25519 is not a signing key of keyplane's
    own, so both refuse even its valid signatures."""
    key = KEYS[kind]
    v = vectors(key, MESSAGE_CONTEXT + b"content")
    public = key.public_key()
    assert verify_signature(public, v.valid, v.message)
    assert verify_with(public, v.valid, v.message)
    wrong = [
        what
        for what, signature in v.invalid.items()
        if verify_signature(public, signature, v.message)
        or verify_with(public, signature, v.message)
    ]
    assert not wrong, f"verified: {wrong}"
    edwards = ed25519.Ed25519PrivateKey.generate()
    signed = edwards.sign(v.message)
    assert not verify_signature(edwards.public_key(), signed, v.message)
    assert not verify_with(edwards.public_key(), signed, v.message)


def test_a_real_signed_message_with_a_damaged_signature_is_refused() -> None:
    """A message signed by a real server (fuzz/corpus/signed_message, with the trust
    state it verifies under): every damage that needs no key is refused as tampered."""
    trust = load((FIXTURES / "trust.bin").read_bytes())
    original = message_signing_service_pb2.SignedMessage.FromString(
        (CORPUS / "signed_message" / "message.sig").read_bytes()
    )
    payload = PAYLOAD
    verify_message(payload, original, trust)
    signer = x509.load_der_x509_certificate(original.certificate_chain[0])
    public = signer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    refused = 0
    for what, signature in ecdsa_damage(original.signature, public.curve.name).items():
        damaged = message_signing_service_pb2.SignedMessage()
        damaged.CopyFrom(original)
        damaged.signature = signature
        with pytest.raises(MessageVerificationError, match="tampered"):
            verify_message(payload, damaged, trust)
            pytest.fail(f"verified: {what}")
        refused += 1
    assert refused > 500
    malleated = message_signing_service_pb2.SignedMessage()
    malleated.CopyFrom(original)
    malleated.signature = high_s(original.signature, public.curve.name)
    verify_message(payload, malleated, trust)  # high-S: see the module docstring
